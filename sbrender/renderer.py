"""The renderer interface: load once, render a job, describe yourself.

The daemon talks only to this interface. ``DiffusersRenderer`` (in
``sbrender.pipeline``) is the real one; tests of queue mechanics may plug in
another, but every capability is also shown through the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from .errors import RenderError
from .jobs import Job

# Called after each denoising step with (step, total); returning True stops the render.
StepCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class RenderOutput:
    images: list[Image.Image]
    seeds: list[int]
    scheduler: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # recorded in the result, e.g. a black image


class Renderer(Protocol):
    def load(self) -> float:
        """Load the model; returns the seconds it took. Raises ``ModelError``."""

    def describe(self) -> dict[str, Any]:
        """Model, device, dtype and library versions, for results and logs."""

    def render(self, job: Job, seeds: list[int], on_step: StepCallback | None = None) -> RenderOutput:
        """Render ``job.count`` images with the given seeds. Raises ``RenderError``."""

    def render_batch(self, items: list[tuple[Job, list[int]]],
                     on_step: StepCallback | None = None) -> list[RenderOutput | RenderError]:
        """Render jobs that share size, steps, sampler and CFG in one call (used when
        ``perf.batch_size`` > 1): per job its images, or the error that spoils only
        that job. Raises ``RenderError`` when the whole call fails."""
