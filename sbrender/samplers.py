"""Samplers and schedules as AUTOMATIC1111 1.9+ names them -> a diffusers scheduler.

Torch-free on purpose: the CLI validates names without loading diffusers. The
renderer looks the class up by name and swaps it in with ``from_config``.

A1111 1.9 split the old names ("DPM++ 2M Karras") into a sampler ("DPM++ 2M")
and a schedule type ("Karras"). Both forms are read here: an old name carries
its schedule, which an explicit schedule other than ``Automatic`` overrides (as
A1111's ``get_sampler_and_scheduler`` does). ``Automatic`` is the sampler's own
default in A1111 (Karras for DPM++ 2M, Exponential for the SDE samplers), so a
pasted "Sampler: DPM++ 2M" renders with the sigmas A1111 would use. Samplers
that diffusers cannot serve are refused by name, never swapped for another.
Adding a sampler or a schedule means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """One row: the A1111 name, the diffusers class, its options, and the schedule
    A1111's ``Automatic`` picks for this sampler."""

    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    automatic: str = "Automatic"
    # Two denoiser calls per step: A1111 schedules prompt editing over twice the steps.
    second_order: bool = False


_SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", automatic="Karras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, automatic="Exponential"),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"},
            automatic="Exponential"),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}, automatic="Exponential"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler", second_order=True),
    Sampler("DPM2", "KDPM2DiscreteScheduler", automatic="Karras", second_order=True),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", automatic="Karras", second_order=True),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),  # as SD1.5 ships it (PRK fails under 4 steps)
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("LCM", "LCMScheduler"),  # for LCM-LoRAs and LCM-distilled models: 4-8 steps, CFG 1-2
)

# A1111 1.10 samplers with no diffusers scheduler that renders them: refused with this reason.
UNSERVED: dict[str, str] = {
    "DPM++ SDE": "diffusers' DPMSolverSDEScheduler draws one Brownian noise per call, not per seed",
    "DPM++ 2S a": "diffusers has no DPM++ 2S ancestral scheduler",
    "DPM fast": "diffusers has no DPM fast scheduler",
    "DPM adaptive": "diffusers has no adaptive-step DPM scheduler",
    "Restart": "diffusers has no Restart sampler",
    "DDIM CFG++": "diffusers has no CFG++ scheduler",
}

# A1111's schedule types (label, API name) -> the class options that give them.
# "Uniform" is the class's own spacing; "Automatic" resolves per sampler.
SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Beta": {"use_beta_sigmas": True},
}
# A1111 1.10 schedule types with no diffusers option that gives them: refused by name.
UNSERVED_SCHEDULES = ("Polyexponential", "Normal", "Simple", "DDIM", "Align Your Steps", "Align Your Steps GITS",
                      "Align Your Steps 11", "Align Your Steps 32", "KL Optimal", "Turbo")
API_NAMES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
              "sgm_uniform": "SGM Uniform", "beta": "Beta"}
# Classes that take a sigma schedule (use_karras_sigmas and the like); the others only their own.
_SIGMA_CLASSES = frozenset({"DPMSolverMultistepScheduler", "KDPM2DiscreteScheduler",
                            "KDPM2AncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                            "LMSDiscreteScheduler", "UniPCMultistepScheduler"})


@dataclass(frozen=True)
class Choice:
    """A sampler with its schedule, resolved: what a job renders with and what its
    infotext says (``Sampler: DPM++ 2M, Schedule type: Karras``)."""

    sampler: Sampler
    schedule: str  # an A1111 label; "Automatic" only where A1111 itself writes it

    @property
    def name(self) -> str:
        return self.sampler.name

    @property
    def scheduler(self) -> str:
        return self.sampler.scheduler

    @property
    def options(self) -> dict[str, Any]:
        return {**self.sampler.options, **SCHEDULES[self.schedule]}

    @property
    def key(self) -> tuple[str, str]:
        return self.sampler.name, self.schedule


def _fold(name: str) -> str:
    return " ".join(name.split()).casefold()


_BY_NAME: dict[str, Sampler] = {_fold(s.name): s for s in SAMPLERS}
# A diffusers class name alone means that class with its own defaults: the first row naming it.
_BY_CLASS: dict[str, Sampler] = {}
for _s in SAMPLERS:
    _BY_CLASS.setdefault(_s.scheduler.casefold(), _s)
_SCHEDULE_BY_KEY = {**{_fold(k): k for k in SCHEDULES}, **API_NAMES}


def names() -> list[str]:
    """Every sampler name A1111 1.9+ lists that sbrender renders, in table order."""
    return [s.name for s in SAMPLERS]


def legacy_names() -> list[str]:
    """The pre-1.9 names with a schedule in them ("DPM++ 2M Karras"), still accepted."""
    return [f"{s.name} {schedule}" for s in SAMPLERS if s.scheduler in _SIGMA_CLASSES
            for schedule in ("Karras", "Exponential")]


def schedules() -> list[str]:
    return list(SCHEDULES)


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown sampler {name!r}; use one of: {', '.join(names())} "
                    "(an older name with its schedule, such as DPM++ 2M Karras, or a diffusers scheduler class "
                    "name such as EulerDiscreteScheduler, works too)")


def _split(name: str) -> tuple[Sampler, str]:
    """A sampler name -> its row and the schedule the name itself carries ("Automatic" if none)."""
    key = _fold(name)
    if key in _BY_NAME:
        return _BY_NAME[key], "Automatic"
    if key in _BY_CLASS:
        return _BY_CLASS[key], "Uniform"  # the class as diffusers configures it
    for suffix in ("karras", "exponential"):
        base = key.removesuffix(" " + suffix)
        if base != key and base in _BY_NAME and _BY_NAME[base].scheduler in _SIGMA_CLASSES:
            return _BY_NAME[base], _SCHEDULE_BY_KEY[suffix]
    for unserved, why in UNSERVED.items():
        if key in (_fold(unserved), _fold(unserved + " Karras")):
            raise KeyError(f"sampler {name!r} cannot be rendered by sbrender: {why}; use one of: "
                           f"{', '.join(names())}")
    raise _unknown(name)


def schedule(name: str) -> str:
    """An A1111 schedule type by its label or API name (any letter case). Raises ``KeyError``."""
    try:
        return _SCHEDULE_BY_KEY[_fold(name)]
    except KeyError:
        folded = _fold(name).replace("_", " ")
        if any(folded == _fold(u) for u in UNSERVED_SCHEDULES):
            raise KeyError(f"schedule type {name!r} cannot be rendered by sbrender: diffusers has no option that "
                           f"gives it; use one of: {', '.join(SCHEDULES)}") from None
        raise KeyError(f"unknown schedule type {name!r}; use one of: {', '.join(SCHEDULES)}") from None


def resolve(sampler: str, scheduler: str = "Automatic") -> Choice:
    """The sampler and schedule a job renders with. ``scheduler`` other than
    ``Automatic`` wins over a schedule in an old sampler name. Raises ``KeyError``
    with what to write instead."""
    row, carried = _split(sampler)
    wanted = schedule(scheduler)
    label = carried if wanted == "Automatic" else wanted
    if label == "Automatic":
        label = row.automatic
    if SCHEDULES[label] and label != "SGM Uniform" and row.scheduler not in _SIGMA_CLASSES:  # Karras, ...
        raise KeyError(f"sampler {row.name} takes no {label} schedule in diffusers; use Automatic, Uniform "
                       "or SGM Uniform with it")
    return Choice(row, label)


def canonical(name: str) -> str:
    """A sampler name in the table's own spelling ("euler" -> "Euler"), an older
    name keeping its schedule ("dpm++ 2m karras" -> "DPM++ 2M Karras"). Raises ``KeyError``."""
    row, carried = _split(name)
    key = _fold(name)
    if key == _fold(row.name):
        return row.name
    if key == row.scheduler.casefold():
        return row.scheduler
    return f"{row.name} {carried}"


def lookup(name: str) -> Choice:
    """``resolve`` with the schedule the name carries. Raises ``KeyError``."""
    return resolve(name)
