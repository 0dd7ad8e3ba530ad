"""The renderer interface: load once, render a job, describe yourself.

The daemon talks only to this interface. ``DiffusersRenderer`` (in
``sbrender.pipeline``) is the real one; tests of queue mechanics may plug in
another, but every capability is also shown through the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from .errors import RenderError
from .jobs import Entry, Job

# Called after each denoising step with (step, total); returning True stops the render.
StepCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class RenderOutput:
    images: list[Image.Image]
    seeds: list[int]
    scheduler: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # recorded in the result, e.g. a black image
    # How the prompt was encoded, recorded in the result: {"chunks": k, "negative_chunks": m,
    # "loras": [{"name", "te", "unet", "hash", "sha256"}, ...] when the job used LoRAs}
    prompt: dict[str, Any] = field(default_factory=dict)
    # The model it was rendered with (``ModelRef.to_dict``), with "vae" {name, hash, sha256} for a
    # VAE file and "loaded_s" when it was loaded for this call; {}: the renderer's described model.
    model: dict[str, Any] = field(default_factory=dict)


class Renderer(Protocol):
    def load(self) -> float:
        """Load the model; returns the seconds it took. Raises ``ModelError``."""

    def describe(self) -> dict[str, Any]:
        """Model, device, dtype and library versions, for results and logs."""

    def batch_key(self, entry: Entry) -> Hashable | None:
        """Entries with equal keys may share one pipeline call (``render_batch``);
        None renders alone. New job fields that change the call join the key here."""

    def render(self, job: Job, seeds: list[int], on_step: StepCallback | None = None) -> RenderOutput:
        """Render ``job.count`` images with the given seeds. Raises ``RenderError``."""

    def render_batch(self, items: list[tuple[Job, list[int]]],
                     on_step: StepCallback | None = None) -> list[RenderOutput | RenderError]:
        """Render jobs that share size, steps, sampler, CFG and clip skip in one call (used when
        ``perf.batch_size`` > 1): per job its images, or the error that spoils only
        that job. Raises ``RenderError`` when the whole call fails."""


def call_key(entry: Entry) -> Hashable | None:
    """What must be equal for jobs to share one diffusers call: size, steps,
    sampler and schedule, CFG, clip skip, the LoRA set (names and both weights, in order:
    one set is active per call), the model and the VAE, and for img2img the steps its strength
    runs (txt2img and img2img never share a call). None for an entry that is not a renderable job."""
    if not isinstance(entry, Job):
        return None
    return (entry.width, entry.height, entry.steps, entry.sampler, entry.scheduler, entry.guidance_scale,
            entry.clip_skip, entry.lora_set, entry.model, entry.vae, entry.img2img_key)


def only(outs: list[RenderOutput | RenderError]) -> RenderOutput:
    """The output of a one-job ``render_batch``, its error raised: ``render`` in
    terms of ``render_batch``."""
    (out,) = outs
    if isinstance(out, RenderError):
        raise out
    return out
