"""The job schema: what a job may say, the defaults it gets, and the message a bad one earns."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from sbrender import ids
from sbrender.config import load_settings
from sbrender.errors import JobError
from sbrender.jobs import SEED_MAX, BadJob, Job, Rules, build_job, parse_entries, parse_job_bytes

RULES = Rules()


def job(rules: Rules = RULES, **fields: Any) -> Job:
    return build_job("cat-42", {"prompt": "a cat on a mat", **fields}, rules)


def refused(rules: Rules = RULES, **fields: Any) -> JobError:
    with pytest.raises(JobError) as info:
        job(rules, **fields)
    return info.value


# --- a single job ---------------------------------------------------------------------


def test_omitted_fields_take_the_rules_defaults() -> None:
    rules = Rules(negative_prompt="blurry", steps=12, guidance_scale=4.5, width=256, height=320,
                  sampler="Euler a")
    got = build_job("cat-42", {"prompt": "a cat"}, rules, source="cat-42.yaml")
    assert got == Job(id="cat-42", prompt="a cat", negative_prompt="blurry", steps=12, guidance_scale=4.5,
                      width=256, height=320, seed=None, count=1, sampler="Euler a", priority=0, metadata={},
                      source="cat-42.yaml")


def test_rules_come_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"SBRENDER_DEFAULTS_STEPS": "9", "SBRENDER_LIMITS_MAX_COUNT": "2",
                                  "SBRENDER_DEFAULTS_SAMPLER": "euler",
                                  "SBRENDER_DEFAULTS_CLIP_SKIP": "2"})
    rules = Rules.from_settings(settings)
    assert (rules.steps, rules.max_count, rules.sampler) == (9, 2, "Euler")
    assert job(rules).clip_skip == 2 and job(RULES).clip_skip == 1
    assert "limits.max_count" in str(refused(rules, count=3))


def test_given_fields_override_the_defaults() -> None:
    got = job(negative_prompt="dogs", steps=20, guidance_scale=5, width=640, height=448, seed=7, count=3,
              sampler="DDIM", priority=-5, clip_skip=2, metadata={"row": 42})
    assert got.params() == {"prompt": "a cat on a mat", "negative_prompt": "dogs", "steps": 20,
                            "guidance_scale": 5.0, "width": 640, "height": 448, "seed": 7, "count": 3,
                            "sampler": "DDIM", "scheduler": "Automatic", "priority": -5, "clip_skip": 2}
    assert got.metadata == {"row": 42}


def test_cfg_scale_is_an_alias_of_guidance_scale() -> None:
    assert job(cfg_scale=9.5).guidance_scale == 9.5
    for both in ({"cfg_scale": 9.5, "guidance_scale": 8}, {"guidance_scale": 8, "cfg_scale": 9.5}):
        assert refused(**both).message == "both guidance_scale and its alias cfg_scale are given; keep one"


def test_an_unknown_field_is_named_with_the_allowed_ones() -> None:
    err = refused(stepz=20)
    assert err.message == "unknown field: stepz"
    assert err.field == "stepz"
    assert "allowed fields: prompt, negative_prompt, steps" in str(err)


def test_several_unknown_fields_are_all_named() -> None:
    assert refused(stepz=20, colour="red").message == "unknown fields: stepz, colour"


def test_a_missing_prompt_is_named() -> None:
    with pytest.raises(JobError, match="prompt is missing") as info:
        build_job("x", {"steps": 20}, RULES)
    assert info.value.field == "prompt"


@pytest.mark.parametrize("document, kind", [("a cat", "a string"), (["a cat"], "a list"), (None, "null"),
                                            (42, "an integer")])
def test_a_job_that_is_not_a_mapping(document: Any, kind: str) -> None:
    with pytest.raises(JobError, match=f"a job must be a mapping of fields, not {kind}"):
        build_job("x", document, RULES)


def test_field_names_must_be_strings() -> None:
    with pytest.raises(JobError, match="field names must be strings, not an integer 1"):
        build_job("x", {"prompt": "a", 1: 2}, RULES)


@pytest.mark.parametrize("name, value, message", [
    ("prompt", 42, "prompt must be a string, not an integer"),
    ("prompt", "", "prompt must not be empty"),
    ("prompt", "   \n", "prompt must not be empty"),
    ("negative_prompt", ["ugly"], "negative_prompt must be a string, not a list"),
    ("steps", "20", "steps must be an integer, not a string"),
    ("steps", True, "steps must be an integer, not a boolean"),
    ("steps", 20.5, "steps must be an integer, not a number"),
    ("steps", None, "steps must be an integer, not null"),
    ("guidance_scale", "7", "guidance_scale must be a number, not a string"),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number, not nan"),
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number, not inf"),
    ("width", [512], "width must be an integer, not a list"),
    ("height", {"px": 512}, "height must be an integer, not a mapping"),
    ("seed", "42", "seed must be an integer, not a string"),
    ("seed", 1.5, "seed must be an integer, not a number"),
    ("count", None, "count must be an integer, not null"),
    ("sampler", 3, "sampler must be a string, not an integer"),
    ("priority", "high", "priority must be an integer, not a string"),
    ("clip_skip", "2", "clip_skip must be an integer, not a string"),
    ("metadata", "row 42", "metadata must be a mapping, not a string"),
    ("metadata", [1, 2], "metadata must be a mapping, not a list"),
])
def test_a_value_of_the_wrong_type_names_the_field(name: str, value: Any, message: str) -> None:
    err = refused(**{name: value})
    assert err.message == message
    assert err.field == name


@pytest.mark.parametrize("name, value, message", [
    ("steps", 0, "steps is 0, outside the allowed range 1 to 150 (limits.max_steps)"),
    ("steps", 151, "steps is 151, outside the allowed range 1 to 150 (limits.max_steps)"),
    ("guidance_scale", -0.5, "guidance_scale is -0.5, outside the allowed range 0 to 30"),
    ("guidance_scale", 30.5, "guidance_scale is 30.5, outside the allowed range 0 to 30"),
    ("width", 56, "width is 56, outside the allowed range 64 to 2048 (limits.min_side, limits.max_side)"),
    ("height", 2056, "height is 2056, outside the allowed range 64 to 2048 (limits.min_side, limits.max_side)"),
    ("seed", -2, "seed is -2, outside the allowed range 0 to 4294967295 (or -1/null for a random seed)"),
    ("seed", 2**32, "seed is 4294967296, outside the allowed range 0 to 4294967295 (or -1/null for a random seed)"),
    ("count", 0, "count is 0, outside the allowed range 1 to 16 (limits.max_count)"),
    ("count", 17, "count is 17, outside the allowed range 1 to 16 (limits.max_count)"),
    ("clip_skip", 0, "clip_skip is 0, outside the allowed range 1 to 12 (1 = the last layer, as in A1111)"),
    ("clip_skip", 13, "clip_skip is 13, outside the allowed range 1 to 12 (1 = the last layer, as in A1111)"),
    ("priority", 1_000_001, "priority is 1000001, outside the allowed range -1000000 to 1000000"),
    ("priority", -1_000_001, "priority is -1000001, outside the allowed range -1000000 to 1000000"),
])
def test_a_value_out_of_range_names_the_field_and_the_range(name: str, value: Any, message: str) -> None:
    err = refused(**{name: value})
    assert err.message == message
    assert err.field == name


@pytest.mark.parametrize("name, value", [
    ("steps", 1), ("steps", 150), ("guidance_scale", 0), ("guidance_scale", 30), ("width", 64), ("height", 2048),
    ("seed", 0), ("seed", SEED_MAX), ("count", 16), ("priority", -1_000_000), ("priority", 1_000_000),
])
def test_the_ends_of_each_range_are_allowed(name: str, value: Any) -> None:
    assert job(**{name: value}).params()[name] == value


def test_ranges_follow_the_rules() -> None:
    rules = Rules(steps=10, width=128, height=128, max_steps=10, min_side=128, max_side=256, max_count=2)
    assert refused(rules, steps=11).message.endswith("range 1 to 10 (limits.max_steps)")
    assert "range 128 to 256" in refused(rules, width=120).message
    assert "range 1 to 2" in refused(rules, count=3).message
    assert job(rules, steps=10, width=128, height=256, count=2).steps == 10


@pytest.mark.parametrize("name, value, suggestion", [("width", 513, 512), ("height", 100, 96), ("width", 70, 64)])
def test_sides_must_be_multiples_of_8(name: str, value: int, suggestion: int) -> None:
    err = refused(**{name: value})
    assert err.message == f"{name} must be a multiple of 8, not {value} (try {suggestion})"
    assert err.field == name


def test_a_whole_float_is_taken_as_an_integer() -> None:
    got = job(steps=20.0, width=512.0)
    assert (got.steps, got.width) == (20, 512)
    assert isinstance(got.steps, int)


@pytest.mark.parametrize("fields", [{}, {"seed": None}, {"seed": -1}])
def test_an_omitted_null_or_minus_one_seed_means_random(fields: dict[str, Any]) -> None:
    assert job(**fields).seed is None


def test_a_seed_of_zero_is_a_seed() -> None:
    assert job(seed=0).seed == 0


def test_seed_plus_count_must_stay_within_the_seed_range() -> None:
    assert job(seed=SEED_MAX - 1, count=2).seed == SEED_MAX - 1
    err = refused(seed=SEED_MAX - 1, count=3)
    assert err.message == f"seed + count - 1 must not exceed {SEED_MAX}"
    assert err.field == "seed"


def test_sampler_names_are_normalised() -> None:
    assert job(sampler="euler a").sampler == "Euler a"
    assert job(sampler="EulerDiscreteScheduler").sampler == "Euler"


def test_a1111_split_form_and_older_names_resolve_to_sampler_and_schedule() -> None:
    def pair(**fields: Any) -> tuple[str, str]:
        got = job(**fields)
        return got.sampler, got.scheduler

    assert pair() == ("DPM++ 2M", "Karras")  # the default: A1111's Automatic for DPM++ 2M
    assert pair(sampler="DPM++ 2M", scheduler="Karras") == ("DPM++ 2M", "Karras")
    assert pair(sampler="DPM++ 2M", schedule_type="exponential") == ("DPM++ 2M", "Exponential")
    assert pair(sampler="dpm++ 2m karras") == ("DPM++ 2M", "Karras")
    assert pair(sampler="DPM++ 2M Karras", scheduler="Uniform") == ("DPM++ 2M", "Uniform")  # explicit wins
    assert pair(sampler="DPM++ 2M SDE") == ("DPM++ 2M SDE", "Exponential")
    assert pair(sampler="Euler a") == ("Euler a", "Automatic")
    assert pair(sampler="EulerDiscreteScheduler") == ("Euler", "Uniform")
    params = job(sampler="DPM++ 2M", scheduler="karras").params()
    assert (params["sampler"], params["scheduler"]) == ("DPM++ 2M", "Karras")


def test_a_default_schedule_does_not_carry_over_to_a_jobs_own_sampler() -> None:
    rules = Rules(sampler="DPM++ 2M", scheduler="Karras")
    assert (job(rules).sampler, job(rules).scheduler) == ("DPM++ 2M", "Karras")
    got = job(rules, sampler="Euler a")  # Euler a takes no Karras: the job gets Euler a's own
    assert (got.sampler, got.scheduler) == ("Euler a", "Automatic")


@pytest.mark.parametrize("fields, field, message", [
    ({"sampler": "DPM++ SDE Karras"}, "sampler", "sampler 'DPM++ SDE Karras' cannot be rendered by sbrender: "),
    ({"sampler": "Euler a", "scheduler": "Karras"}, "scheduler", "sampler Euler a takes no Karras schedule"),
    ({"scheduler": "Polyexponential"}, "scheduler", "schedule type 'Polyexponential' cannot be rendered by sbrender"),
    ({"scheduler": "Karas"}, "scheduler", "unknown schedule type 'Karas'; use one of: "),
    ({"scheduler": 2}, "scheduler", "scheduler must be a string, not an integer"),
    ({"sampler": "Euler", "scheduler": "Karras", "schedule_type": "Karras"}, "scheduler",
     "both scheduler and its alias schedule_type are given"),
])
def test_a_sampler_or_schedule_that_cannot_be_served_is_refused(fields: dict[str, Any], field: str,
                                                                 message: str) -> None:
    err = refused(**fields)
    assert err.field == field
    assert err.message.startswith(message), err.message


def test_an_unknown_sampler_lists_the_choices() -> None:
    err = refused(sampler="Eular")
    assert err.field == "sampler"
    assert err.message.startswith("unknown sampler 'Eular'; use one of: DPM++ 2M, DPM++ 2M SDE")


# --- metadata -------------------------------------------------------------------------


def test_metadata_is_kept_as_given() -> None:
    metadata = {"row": 42, "tags": ["a", "b"], "nested": {"ok": True, "none": None, "ratio": 0.25}, "ü": "ß"}
    assert job(metadata=metadata).metadata == metadata
    assert job(metadata=None).metadata == {}


@pytest.mark.parametrize("metadata", [
    {"when": datetime.date(2026, 1, 1)},  # YAML turns 2026-01-01 into a date
    {"blob": b"\x00\x01"},  # YAML !!binary
    {"tags": {"a", "b"}},  # YAML !!set
    {"big": float("inf")},
    {"bad": float("nan")},
    {1: "one"},  # YAML `1: one`; JSON would silently turn the key into "1"
    {"nested": {2: "two"}},
])
def test_metadata_that_would_not_survive_json_is_refused(metadata: dict[Any, Any]) -> None:
    err = refused(metadata=metadata)
    assert err.field == "metadata"
    assert err.message.startswith("metadata must hold only strings, numbers, booleans, null, lists and mappings")


# --- text limits ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_prompts_have_a_length_limit(name: str) -> None:
    rules = Rules(max_prompt_chars=10)
    assert build_job("x", {"prompt": "a cat", name: "x" * 10}, rules).params()[name] == "x" * 10
    with pytest.raises(JobError) as info:
        build_job("x", {"prompt": "a cat", name: "x" * 11}, rules)
    err = info.value
    assert err.message == f"{name} has 11 characters, more than the limit of 10"
    assert "limits.max_prompt_chars" in str(err)


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_nul_characters_are_refused(name: str) -> None:
    err = refused(**{name: "a cat\x00rm -rf /"})
    assert err.message == f"{name} must not contain NUL characters"
    assert err.field == name


# --- batch files ----------------------------------------------------------------------


def test_a_bare_list_is_a_batch_with_numbered_ids() -> None:
    entries = parse_entries("cats.yaml", [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}], RULES)
    assert [(e.id, e.prompt) for e in entries if isinstance(e, Job)] == [
        ("cats-001", "one"), ("cats-002", "two"), ("cats-003", "three")]
    assert {e.source for e in entries} == {"cats.yaml"}


def test_a_batch_mapping_shares_its_defaults() -> None:
    document = {"defaults": {"steps": 10, "cfg_scale": 3, "negative_prompt": "dogs"},
                "jobs": [{"prompt": "one"}, {"prompt": "two", "steps": 30}]}
    one, two = parse_entries("cats.json", document, RULES)
    assert isinstance(one, Job) and isinstance(two, Job)
    assert (one.id, one.steps, one.guidance_scale, one.negative_prompt) == ("cats-001", 10, 3.0, "dogs")
    assert (two.id, two.steps, two.guidance_scale) == ("cats-002", 30, 3.0)


def test_batch_ids_widen_to_keep_their_order() -> None:
    entries = parse_entries("big.yaml", [{"prompt": f"n{i}"} for i in range(1000)], RULES)
    names = [e.id for e in entries]
    assert names[0] == "big-0001" and names[-1] == "big-1000"
    assert names == sorted(names)


def test_a_bad_job_in_a_batch_fails_alone() -> None:
    document = [{"prompt": "one"}, {"prompt": "two", "steps": 0, "priority": 5}, {"prompt": "three"}]
    one, two, three = parse_entries("cats.yaml", document, RULES)
    assert isinstance(one, Job) and isinstance(three, Job)
    assert isinstance(two, BadJob)
    assert two.id == "cats-002"
    assert two.priority == 5  # a failed job still takes its place in the queue
    assert str(two.error) == "job 2 of the batch: steps is 0, outside the allowed range 1 to 150 (limits.max_steps)"


def test_a_job_that_is_not_a_mapping_fails_alone_in_a_batch() -> None:
    entries = parse_entries("cats.yaml", ["a cat", {"prompt": "a dog"}], RULES)
    assert isinstance(entries[0], BadJob)
    assert str(entries[0].error).startswith("job 1 of the batch: a job must be a mapping of fields, not a string")
    assert isinstance(entries[1], Job)


def test_a_bad_shared_default_fails_the_whole_file() -> None:
    with pytest.raises(JobError, match="steps is 0, outside the allowed range"):
        parse_entries("cats.yaml", {"defaults": {"steps": 0}, "jobs": [{"prompt": "one"}]}, RULES)
    with pytest.raises(JobError, match="defaults: unknown field: stepz"):
        parse_entries("cats.yaml", {"defaults": {"stepz": 1}, "jobs": [{"prompt": "one"}]}, RULES)
    with pytest.raises(JobError, match="defaults must be a mapping, not a list"):
        parse_entries("cats.yaml", {"defaults": [1], "jobs": [{"prompt": "one"}]}, RULES)


def test_a_batch_mapping_holds_only_defaults_and_jobs() -> None:
    with pytest.raises(JobError, match="a batch file holds only 'defaults' and 'jobs', not: prompt"):
        parse_entries("cats.yaml", {"jobs": [{"prompt": "one"}], "prompt": "two"}, RULES)


@pytest.mark.parametrize("document", [[], {"jobs": []}, {"jobs": None}, {"jobs": {"prompt": "a"}}])
def test_a_batch_needs_a_non_empty_list_of_jobs(document: Any) -> None:
    with pytest.raises(JobError, match="jobs must be a non-empty list of jobs"):
        parse_entries("cats.yaml", document, RULES)


def test_a_batch_has_a_size_limit() -> None:
    rules = Rules(max_batch_jobs=3)
    assert len(parse_entries("b.yaml", [{"prompt": "x"}] * 3, rules)) == 3
    with pytest.raises(JobError) as info:
        parse_entries("b.yaml", [{"prompt": "x"}] * 4, rules)
    assert info.value.message == "a batch holds 4 jobs, more than the limit of 3"
    assert "limits.max_batch_jobs" in str(info.value)


def test_a_file_level_problem_is_one_bad_job_under_the_file_id() -> None:
    entries = parse_job_bytes("cats.yaml", b"jobs: []\n", RULES)
    assert [(type(e), e.id) for e in entries] == [(BadJob, "cats")]


def test_a_single_job_file_is_parsed_from_bytes() -> None:
    (entry,) = parse_job_bytes("cat-42.yaml", b"prompt: a cat\nsteps: 4\n", RULES)
    assert isinstance(entry, Job)
    assert (entry.id, entry.prompt, entry.steps, entry.source) == ("cat-42", "a cat", 4, "cat-42.yaml")


@pytest.mark.parametrize("name", ["my cat.yaml", "-cat.yaml", "_cat.json", "chat-noir-été.yaml",
                                  "x" * 200 + ".yaml", ".yaml", "a;rm -rf ~.yml"])
def test_a_bad_file_name_fails_under_a_safe_derived_id(name: str) -> None:
    (entry,) = parse_job_bytes(name, b"prompt: a perfectly good job\n", RULES)
    assert isinstance(entry, BadJob)
    assert ids.id_problem(entry.id) is None
    assert entry.id == ids.safe_id_for(name)
    assert entry.error.message.startswith(f"file name {name!r} is not a usable job id")
    assert "rename it" in str(entry.error)
