"""The sampler table: names people use -> a diffusers scheduler class and its options.

Torch-free on purpose: the CLI validates sampler names without loading diffusers.
The renderer looks the class up by name and swaps it in with ``from_config``.
Adding a sampler means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """One row: the A1111 name, the diffusers class name and the options it needs."""

    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler"),
    Sampler("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", _KARRAS),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("LMS Karras", "LMSDiscreteScheduler", _KARRAS),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
)

_BY_KEY: dict[str, Sampler] = {s.name.casefold(): s for s in SAMPLERS}
# A diffusers class name alone means that class with its default options: the
# first row that names it without options.
for _s in SAMPLERS:
    if not _s.options:
        _BY_KEY.setdefault(_s.scheduler.casefold(), _s)


def names() -> list[str]:
    """Every accepted A1111 name, in table order."""
    return [s.name for s in SAMPLERS]


def lookup(name: str) -> Sampler:
    """The row for an A1111 name or a diffusers class name (any letter case).

    Raises ``KeyError`` with the list of accepted names.
    """
    try:
        return _BY_KEY[" ".join(name.split()).casefold()]
    except KeyError:
        raise KeyError(
            f"unknown sampler {name!r}; use one of: {', '.join(names())} "
            "(or a diffusers scheduler class name such as EulerDiscreteScheduler)"
        ) from None
