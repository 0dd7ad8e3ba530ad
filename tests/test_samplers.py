"""The sampler table: A1111 names people type -> real diffusers schedulers with the right options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
from diffusers import DPMSolverMultistepScheduler

from sbrender import samplers
from sbrender.config import load_settings
from sbrender.samplers import SAMPLERS, Sampler

# numpy 2 complains about how diffusers builds its sigma arrays, thousands of times.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]

ROWS = [pytest.param(row, id=row.name) for row in SAMPLERS]
CLASSES = sorted({row.scheduler for row in SAMPLERS})
# The options any row may set; a row that does not set one must get the class default.
OPTION_DEFAULTS = {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}


def sd15_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler an SD 1.5 model folder ships (the one the tiny-random model uses)."""
    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1)


# --- the table ----------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_every_name_looks_up_in_any_letter_case(row: Sampler) -> None:
    for spelling in (row.name, row.name.lower(), row.name.upper(), f"  {row.name.replace(' ', '   ')} "):
        assert samplers.lookup(spelling) is row


def test_names_are_distinct_ignoring_case() -> None:
    assert len({name.casefold() for name in samplers.names()}) == len(SAMPLERS)
    assert samplers.names()[:2] == ["DPM++ 2M", "DPM++ 2M Karras"]


@pytest.mark.parametrize("scheduler", CLASSES)
def test_a_diffusers_class_name_means_that_class_with_no_options(scheduler: str) -> None:
    expected = next(row for row in SAMPLERS if row.scheduler == scheduler and not row.options)
    for spelling in (scheduler, scheduler.lower()):
        row = samplers.lookup(spelling)
        assert row is expected
        assert row.options == {}


def test_a_class_name_never_picks_a_karras_row() -> None:
    assert samplers.lookup("DPMSolverMultistepScheduler").name == "DPM++ 2M"
    assert samplers.lookup("KDPM2DiscreteScheduler").name == "DPM2"


@pytest.mark.parametrize("name", ["Eulr", "", "DPM++ 3M", "Euler  b", "DPMSolverSDEScheduler"])
def test_an_unknown_name_lists_every_choice(name: str) -> None:
    with pytest.raises(KeyError) as info:
        samplers.lookup(name)
    message = info.value.args[0]
    assert message.startswith(f"unknown sampler {name!r}; use one of: ")
    for known in samplers.names():
        assert known in message


# --- through real diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_every_row_names_a_diffusers_scheduler(row: Sampler) -> None:
    cls = getattr(diffusers, row.scheduler)
    assert issubclass(cls, diffusers.SchedulerMixin)


@pytest.mark.parametrize("row", ROWS)
def test_from_config_gives_the_rows_class_with_its_options(row: Sampler) -> None:
    cls = getattr(diffusers, row.scheduler)
    scheduler = cls.from_config(sd15_scheduler().config, **row.options)
    assert type(scheduler) is cls
    for key, value in row.options.items():
        assert scheduler.config[key] == value, key
    for key, default in OPTION_DEFAULTS.items():
        if key not in row.options and key in scheduler.config:
            assert scheduler.config[key] == default, key
    # The model's noise schedule carries over: otherwise the images would be wrong.
    assert scheduler.config["beta_schedule"] == "scaled_linear"
    # And it can plan a short render.
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_karras_rows_really_space_the_sigmas_differently() -> None:
    karras, plain = (diffusers.LMSDiscreteScheduler.from_config(sd15_scheduler().config,
                                                                **samplers.lookup(name).options)
                     for name in ("LMS Karras", "LMS"))
    karras.set_timesteps(8)
    plain.set_timesteps(8)
    assert karras.sigmas.shape == plain.sigmas.shape
    assert not karras.sigmas.allclose(plain.sigmas)


def test_switching_samplers_does_not_carry_options_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renderer builds each sampler from the model's scheduler, not from the
    previous job's: "DPM++ 2M" after "DPM++ 2M Karras" must not be Karras."""
    from sbrender.pipeline import DiffusersRenderer

    monkeypatch.chdir(tmp_path)
    renderer = DiffusersRenderer(load_settings(env={"SBRENDER_DEVICE": "cpu"}))
    # Only the scheduler slot of a pipeline is used here; loading one is the e2e tests' job.
    renderer.pipe = SimpleNamespace(scheduler=sd15_scheduler())
    for name in ("DPM++ 2M SDE Karras", "DPM++ 2M", "Euler", "DPM++ 2M Karras"):
        described = renderer._use_sampler(name)
        row = samplers.lookup(name)
        scheduler = renderer.pipe.scheduler
        assert type(scheduler).__name__ == row.scheduler
        assert described == {"name": row.name, "class": row.scheduler, "options": row.options}
        for key, default in OPTION_DEFAULTS.items():
            if key in scheduler.config:
                assert scheduler.config[key] == row.options.get(key, default), (name, key)
