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
# Every sampler with every schedule type it takes.
# The options any row may set; a row that does not set one must get the class default.
OPTION_DEFAULTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "algorithm_type": "dpmsolver++",
                   "solver_order": 2}


def sd15_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler an SD 1.5 model folder ships (the one the tiny-random model uses)."""
    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1)


# --- the table ----------------------------------------------------------------------------


def choices() -> list[samplers.Choice]:
    """Every sampler with every schedule type diffusers gives it."""
    out = []
    for row in SAMPLERS:
        for schedule in samplers.schedules():
            try:
                out.append(samplers.resolve(row.name, schedule))
            except KeyError:
                pass
    return out


CHOICES = [pytest.param(c, id=f"{c.name}/{c.schedule}") for c in choices()]


@pytest.mark.parametrize("row", ROWS)
def test_every_name_looks_up_in_any_letter_case(row: Sampler) -> None:
    for spelling in (row.name, row.name.lower(), row.name.upper(), f"  {row.name.replace(' ', '   ')} "):
        assert samplers.lookup(spelling).sampler is row


def test_names_are_a1111_1_9_names_and_distinct_ignoring_case() -> None:
    assert len({name.casefold() for name in samplers.names()}) == len(SAMPLERS)
    assert samplers.names()[:2] == ["DPM++ 2M", "DPM++ 2M SDE"]
    assert not any(name.endswith(("Karras", "Exponential")) for name in samplers.names())


@pytest.mark.parametrize("sampler, schedule", [
    ("DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "Exponential"), ("DPM++ 3M SDE", "Exponential"),
    ("DPM2", "Karras"), ("DPM2 a", "Karras"), ("Euler a", "Automatic"), ("Euler", "Automatic"),
    ("UniPC", "Automatic"), ("DDIM", "Automatic"), ("LCM", "Automatic")])
def test_automatic_is_the_schedule_a1111_picks_for_the_sampler(sampler: str, schedule: str) -> None:
    """A1111 1.9+ resolves an unset schedule to the sampler's own and writes that label."""
    assert samplers.resolve(sampler).schedule == schedule
    assert samplers.resolve(sampler, "Automatic").schedule == schedule


@pytest.mark.parametrize("old, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"), ("LMS Karras", "LMS", "Karras"),
    ("dpm2 a karras", "DPM2 a", "Karras")])
def test_older_names_carry_their_schedule(old: str, sampler: str, schedule: str) -> None:
    assert samplers.resolve(old).key == (sampler, schedule)
    # An explicit schedule wins over the one in the old name, as in A1111.
    assert samplers.resolve(old, "Uniform").key == (sampler, "Uniform")


@pytest.mark.parametrize("spelling, label", [("karras", "Karras"), ("sgm_uniform", "SGM Uniform"),
                                             ("SGM uniform", "SGM Uniform"), ("EXPONENTIAL", "Exponential")])
def test_schedule_types_by_label_or_a1111_api_name(spelling: str, label: str) -> None:
    assert samplers.schedule(spelling) == label


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2S a", "Restart", "DPM fast"])
def test_a1111_samplers_diffusers_cannot_serve_are_refused_by_name(name: str) -> None:
    with pytest.raises(KeyError) as info:
        samplers.resolve(name)
    assert info.value.args[0].startswith(f"sampler {name!r} cannot be rendered by sbrender: ")


def test_a_schedule_the_class_cannot_take_is_refused() -> None:
    with pytest.raises(KeyError, match="Euler a takes no Karras schedule"):
        samplers.resolve("Euler a", "Karras")
    with pytest.raises(KeyError, match="schedule type 'Polyexponential' cannot be rendered by sbrender"):
        samplers.resolve("Euler", "Polyexponential")
    with pytest.raises(KeyError, match="schedule type 'align_your_steps' cannot be rendered"):
        samplers.resolve("Euler", "align_your_steps")
    with pytest.raises(KeyError, match="unknown schedule type 'Karas'"):
        samplers.resolve("Euler", "Karas")


@pytest.mark.parametrize("scheduler", CLASSES)
def test_a_diffusers_class_name_means_that_class_as_diffusers_configures_it(scheduler: str) -> None:
    expected = next(row for row in SAMPLERS if row.scheduler == scheduler)
    for spelling in (scheduler, scheduler.lower()):
        choice = samplers.lookup(spelling)
        assert choice.sampler is expected and choice.schedule == "Uniform"
        assert choice.options == expected.options


@pytest.mark.parametrize("name", ["Eulr", "", "DPM++ 3M", "Euler  b", "DPMSolverSDEScheduler", "Euler a Karras"])
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


@pytest.mark.parametrize("row", CHOICES)
def test_from_config_gives_the_rows_class_with_its_options(row: samplers.Choice) -> None:
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
                                                                **samplers.resolve("LMS", name).options)
                     for name in ("Karras", "Automatic"))
    karras.set_timesteps(8)
    plain.set_timesteps(8)
    assert karras.sigmas.shape == plain.sigmas.shape
    assert not karras.sigmas.allclose(plain.sigmas)


def test_switching_samplers_does_not_carry_options_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renderer builds each sampler from the model's scheduler, not from the
    previous job's: "DPM++ 2M" Uniform after Karras must not be Karras."""
    from sbrender.pipeline import DiffusersRenderer

    monkeypatch.chdir(tmp_path)
    renderer = DiffusersRenderer(load_settings(env={"SBRENDER_DEVICE": "cpu"}))
    # Only the scheduler slot of a pipeline is used here; loading one is the e2e tests' job.
    scheduler = sd15_scheduler()
    renderer.current = SimpleNamespace(pipe=SimpleNamespace(scheduler=scheduler), schedulers={},
                                       base_scheduler_config=scheduler.config)
    for name, schedule in (("DPM++ 2M SDE", "Karras"), ("DPM++ 2M", "Uniform"), ("Euler", "Automatic"),
                           ("DPM++ 2M", "Karras"), ("DPM++ 2M", "Exponential")):
        described = renderer._use_sampler(name, schedule)
        row = samplers.resolve(name, schedule)
        scheduler = renderer.pipe.scheduler
        assert type(scheduler).__name__ == row.scheduler
        assert described == {"name": row.name, "schedule": schedule, "class": row.scheduler, "options": row.options}
        for key, default in OPTION_DEFAULTS.items():
            if key in scheduler.config:
                assert scheduler.config[key] == row.options.get(key, default), (name, key)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_every_sampler_and_schedule_renders_through_the_real_pipeline(model_cache: Path) -> None:
    """Each choice through the tiny model, 3 steps at 64x64: finite images; a
    schedule changes the image; the old name and the split form are the same render."""
    import numpy as np

    from sbrender.jobs import Job
    from sbrender.pipeline import DiffusersRenderer

    settings = load_settings(None, env={}, overrides={"model": "tiny-random", "cache": str(model_cache)})
    renderer = DiffusersRenderer(settings)
    renderer.load()

    def render(sampler: str, scheduler: str = "Automatic") -> np.ndarray:
        job = Job(id="s", prompt="a lighthouse", negative_prompt="", steps=3, guidance_scale=7.0, width=64,
                  height=64, seed=5, count=1, sampler=sampler, priority=0, scheduler=scheduler)
        out = renderer.render(job, [5])
        assert out.scheduler["schedule"] == samplers.resolve(sampler, scheduler).schedule
        return np.asarray(out.images[0], dtype=int)

    for choice in choices():
        assert np.isfinite(render(choice.name, choice.schedule)).all(), choice
    assert (render("DPM++ 2M Karras") == render("DPM++ 2M", "Karras")).all()
    assert (render("DPM++ 2M") == render("DPM++ 2M", "Karras")).all()  # Automatic is Karras here
    assert np.abs(render("DPM++ 2M", "Uniform") - render("DPM++ 2M", "Karras")).max() > 0
