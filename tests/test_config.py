"""Settings: defaults < config file < SBRENDER_* environment < command-line flags, and the
messages a bad setting earns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sbrender.config import BY_KEY, SETTINGS, load_settings, read_config_file
from sbrender.errors import ConfigError

REPO_CONFIG = Path(__file__).parent.parent / "config" / "sbrender.yaml"
PATH_KEYS = ("inbox", "outbox", "state", "embeddings_dir", "loras_dir")


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ./config/sbrender.yaml to pick up unless a test writes one."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def config_file(folder: Path, data: dict[str, Any] | str, name: str = "sbrender.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def refused(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    return info.value


# --- layers -------------------------------------------------------------------------------


def test_with_nothing_set_every_value_is_the_built_in_default(empty_cwd: Path) -> None:
    settings = load_settings(env={})
    assert settings.config_file is None
    for s in SETTINGS:
        expected = str(empty_cwd / s.default) if s.key in PATH_KEYS else s.default
        assert settings[s.key] == expected, s.key
        assert settings.sources[s.key] == "default"


def test_the_config_folder_of_the_working_directory_is_read(empty_cwd: Path) -> None:
    (empty_cwd / "config").mkdir()
    path = config_file(empty_cwd / "config", {"defaults": {"steps": 12}})
    settings = load_settings(env={})
    assert settings["defaults.steps"] == 12
    assert settings.config_file is not None and settings.config_file.resolve() == path.resolve()
    assert settings.sources["defaults.steps"].startswith("config file ")


LAYERS = {
    "file": ({"defaults": {"steps": 12}}, {}, {}),
    "env": ({"defaults": {"steps": 12}}, {"SBRENDER_DEFAULTS_STEPS": "13"}, {}),
    "flag": ({"defaults": {"steps": 12}}, {"SBRENDER_DEFAULTS_STEPS": "13"}, {"defaults.steps": 14}),
}


@pytest.mark.parametrize("top, expected, source", [
    ("file", 12, "config file "),
    ("env", 13, "environment variable SBRENDER_DEFAULTS_STEPS"),
    ("flag", 14, "command-line flag for defaults.steps"),
])
def test_each_layer_beats_the_ones_below(tmp_path: Path, top: str, expected: int, source: str) -> None:
    data, env, overrides = LAYERS[top]
    settings = load_settings(config_file(tmp_path, data), env=env, overrides=overrides)
    assert settings["defaults.steps"] == expected
    assert settings.sources["defaults.steps"].startswith(source)


def test_layers_mix_key_by_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"defaults": {"steps": 12, "width": 256}, "log": {"level": "debug"}})
    settings = load_settings(path, env={"SBRENDER_DEFAULTS_WIDTH": "320"}, overrides={"log.level": "error"})
    assert (settings["defaults.steps"], settings["defaults.width"], settings["log.level"]) == (12, 320, "error")
    assert settings["defaults.height"] == 512


def test_a_flag_left_unset_does_not_override(tmp_path: Path) -> None:
    settings = load_settings(env={"SBRENDER_DEVICE": "cpu"}, overrides={"device": None})
    assert settings["device"] == "cpu"


def test_sbrender_config_names_the_file_and_an_explicit_file_beats_it(tmp_path: Path) -> None:
    from_env = config_file(tmp_path, {"defaults": {"steps": 5}}, "env.yaml")
    explicit = config_file(tmp_path, {"defaults": {"steps": 6}}, "explicit.yaml")
    assert load_settings(env={"SBRENDER_CONFIG": str(from_env)})["defaults.steps"] == 5
    assert load_settings(explicit, env={"SBRENDER_CONFIG": str(from_env)})["defaults.steps"] == 6


def test_other_environment_variables_are_ignored() -> None:
    settings = load_settings(env={"HOME": "/nowhere", "STEPS": "3", "SBRENDERX": "1"})
    assert settings["defaults.steps"] == 28


def test_relative_folders_are_made_absolute(empty_cwd: Path) -> None:
    settings = load_settings(env={"SBRENDER_INBOX": "spool/in"})
    assert settings.inbox == empty_cwd / "spool" / "in"


def test_relative_model_and_model_config_paths_are_made_absolute(empty_cwd: Path) -> None:
    (empty_cwd / "sd15-config").mkdir()
    (empty_cwd / "dreamshaper.safetensors").write_bytes(b"")
    settings = load_settings(env={"SBRENDER_MODEL": "dreamshaper.safetensors", "SBRENDER_MODEL_CONFIG": "sd15-config"})
    assert settings.model == str(empty_cwd / "dreamshaper.safetensors")
    assert settings["model_config"] == str(empty_cwd / "sd15-config")
    assert settings.sources["model_config"] == "environment variable SBRENDER_MODEL_CONFIG"


# --- bad files and names ------------------------------------------------------------------


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    err = refused(config_file=tmp_path / "nope.yaml", env={})
    assert err.message.startswith("cannot read config file")
    assert "nope.yaml" in err.message


@pytest.mark.parametrize("text, message", [
    ("defaults: [1, 2\n", "is not valid YAML"),
    ("- model\n", "must hold a mapping of settings, not list"),
    ("just words\n", "must hold a mapping of settings, not str"),
])
def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, message: str) -> None:
    assert message in refused(config_file=config_file(tmp_path, text), env={}).message


def test_an_empty_config_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(config_file(tmp_path, ""), env={})["defaults.steps"] == 28


@pytest.mark.parametrize("data, unknown, suggestion", [
    ({"defaults": {"stepz": 3}}, "defaults.stepz", "defaults.steps"),
    ({"modle": "x"}, "modle", "model"),
    ({"limits": {"max_step": 3}}, "limits.max_step", "limits.max_steps"),
    ({"watch": {"mode": "auto", "setle_seconds": 1}}, "watch.setle_seconds", "watch.settle_seconds"),
])
def test_an_unknown_key_in_the_file_gets_a_suggestion(tmp_path: Path, data: dict[str, Any], unknown: str,
                                                      suggestion: str) -> None:
    path = config_file(tmp_path, data)
    err = refused(config_file=path, env={})
    assert err.message == f"unknown setting {unknown} in config file {path.absolute()}"
    assert err.hint == f"did you mean {suggestion}?"


def test_an_unknown_environment_variable_gets_a_suggestion() -> None:
    err = refused(env={"SBRENDER_DEFAULTS_STEPSS": "3"})
    assert err.message == "unknown setting SBRENDER_DEFAULTS_STEPSS in the environment"
    assert err.hint == "did you mean SBRENDER_DEFAULTS_STEPS?"


def test_an_unknown_name_with_no_near_match_lists_them_all() -> None:
    err = refused(env={"SBRENDER_" + "Q" * 40: "3"})
    assert err.hint is not None and err.hint.startswith("known settings: SBRENDER_MODEL, SBRENDER_OFFLINE")


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, why", [
    ("defaults.steps", "abc", "expected an integer"),
    ("defaults.steps", "0", "expected a value from 1 to 10000"),
    ("defaults.guidance_scale", "lots", "expected a number"),
    ("limits.max_file_bytes", "1", "expected a value from 64 to 1073741824"),
    ("device", "gpu", "expected one of: auto, cuda, cpu, mps"),
    ("offline", "maybe", "expected true or false"),
    ("defaults.sampler", "Eulr", "unknown sampler 'Eulr'; use one of: DPM++ 2M"),
    ("model", "  ", "expected a non-empty string"),
])
def test_a_bad_value_names_the_key_the_source_and_what_is_accepted(tmp_path: Path, key: str, value: str,
                                                                   why: str) -> None:
    env_name = "SBRENDER_" + key.replace(".", "_").upper()
    err = refused(env={env_name: value})
    assert err.message.startswith(
        f"bad value {value!r} for setting {key} (from environment variable {env_name}): {why}")
    assert err.hint is not None and err.hint.startswith(f"{key}: ")

    *parents, leaf = key.split(".")
    data: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        data = {parent: data}
    path = config_file(tmp_path, data)
    err = refused(config_file=path, env={})
    assert err.message.startswith(f"bad value {value!r} for setting {key} (from config file {path.absolute()}): {why}")

    err = refused(env={}, overrides={key: value})
    assert err.message.startswith(f"bad value {value!r} for setting {key} (from command-line flag for {key}): {why}")


def test_yaml_types_in_the_file_are_checked_too(tmp_path: Path) -> None:
    err = refused(config_file=config_file(tmp_path, "defaults:\n  steps: [28]\n"), env={})
    assert "bad value [28] for setting defaults.steps" in err.message
    assert "expected an integer" in err.message


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "On"])
def test_true_from_the_environment(text: str) -> None:
    assert load_settings(env={"SBRENDER_OFFLINE": text})["offline"] is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", " OFF"])
def test_false_from_the_environment(text: str) -> None:
    assert load_settings(env={"SBRENDER_OFFLINE": "true", "SBRENDER_SAFETY_CHECKER": text})["safety_checker"] is False


@pytest.mark.parametrize("text", ["", "2", "y", "enabled"])
def test_anything_else_is_not_a_bool(text: str) -> None:
    assert "expected true or false" in refused(env={"SBRENDER_OFFLINE": text}).message


def test_numbers_from_the_environment_are_parsed() -> None:
    settings = load_settings(env={"SBRENDER_DEFAULTS_STEPS": " 12 ", "SBRENDER_WATCH_RESCAN_SECONDS": "0.25",
                                  "SBRENDER_LOG_LEVEL": "DEBUG"})
    assert (settings["defaults.steps"], settings["watch.rescan_seconds"], settings["log.level"]) == (12, 0.25, "debug")


@pytest.mark.parametrize("layer", ["file", "env", "flag"])
def test_the_old_runwayml_model_name_is_accepted(tmp_path: Path, layer: str) -> None:
    old = "runwayml/stable-diffusion-v1-5"
    kwargs: dict[str, Any] = {"env": {}}
    if layer == "file":
        kwargs["config_file"] = config_file(tmp_path, {"model": old})
    elif layer == "env":
        kwargs["env"] = {"SBRENDER_MODEL": old}
    else:
        kwargs["overrides"] = {"model": old}
    assert load_settings(**kwargs).model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --- settings that must agree -------------------------------------------------------------


@pytest.mark.parametrize("env, message", [
    ({"SBRENDER_DEFAULTS_WIDTH": "500"},
     "setting defaults.width = 500 (from environment variable SBRENDER_DEFAULTS_WIDTH) must be a multiple of 8"),
    ({"SBRENDER_DEFAULTS_HEIGHT": "1020"},
     "setting defaults.height = 1020 (from environment variable SBRENDER_DEFAULTS_HEIGHT) must be a multiple of 8"),
    ({"SBRENDER_LIMITS_MIN_SIDE": "1024", "SBRENDER_LIMITS_MAX_SIDE": "512"},
     "setting limits.min_side = 1024 (from environment variable SBRENDER_LIMITS_MIN_SIDE) "
     "must not exceed limits.max_side (512)"),
    ({"SBRENDER_DEFAULTS_WIDTH": "32"},
     "setting defaults.width = 32 (from environment variable SBRENDER_DEFAULTS_WIDTH) "
     "must be from limits.min_side (64) to limits.max_side (2048)"),
    ({"SBRENDER_LIMITS_MAX_SIDE": "256"},
     "setting defaults.width = 512 (from default) must be from limits.min_side (64) to limits.max_side (256)"),
    ({"SBRENDER_DEFAULTS_STEPS": "200"},
     "setting defaults.steps = 200 (from environment variable SBRENDER_DEFAULTS_STEPS) "
     "must not exceed limits.max_steps (150)"),
    ({"SBRENDER_LIMITS_MAX_STEPS": "20"},
     "setting defaults.steps = 28 (from default) must not exceed limits.max_steps (20)"),
])
def test_settings_that_contradict_each_other_are_refused(env: dict[str, str], message: str) -> None:
    err = refused(env=env)
    assert err.message == message


def test_settings_that_agree_at_the_edges_are_accepted() -> None:
    settings = load_settings(env={"SBRENDER_DEFAULTS_STEPS": "200", "SBRENDER_LIMITS_MAX_STEPS": "200",
                                  "SBRENDER_LIMITS_MIN_SIDE": "512", "SBRENDER_LIMITS_MAX_SIDE": "512"})
    assert (settings["defaults.steps"], settings["defaults.width"]) == (200, 512)


# --- the repository's own config file -----------------------------------------------------


def test_the_shipped_config_file_lists_every_setting() -> None:
    assert sorted(read_config_file(REPO_CONFIG)) == sorted(BY_KEY)


def test_the_shipped_config_file_gives_exactly_the_built_in_defaults() -> None:
    from_file = load_settings(REPO_CONFIG, env={})
    built_in = load_settings(env={})
    assert dict(from_file.values) == dict(built_in.values)
    raw = read_config_file(REPO_CONFIG)
    for s in SETTINGS:
        assert s.parse(raw[s.key]) == s.parse(s.default), s.key
        assert type(s.parse(raw[s.key])) is type(s.parse(s.default)), s.key
