"""Settings: one table, four layers.

Precedence, lowest first: built-in defaults < config file (``--config`` or
``SBRENDER_CONFIG``, else ``./config/sbrender.yaml`` when it exists) <
``SBRENDER_*`` environment variables < command-line flags. Every setting is a
row of ``SETTINGS``; its environment variable is ``SBRENDER_`` plus the dotted
key in capitals with ``_`` for ``.`` (``limits.max_steps`` ->
``SBRENDER_LIMITS_MAX_STEPS``). A bad value is refused with the key, where it
came from and what would be accepted.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import redisqueue, samplers
from .errors import ConfigError
from .models import BUILTINS

DEFAULT_CONFIG_FILE = Path("config") / "sbrender.yaml"
ENV_PREFIX = "SBRENDER_"
CONFIG_ENV = "SBRENDER_CONFIG"
NOT_SETTINGS = {CONFIG_ENV, "SBRENDER_TEST_FAULTS"}  # SBRENDER_* variables that are not settings

Parser = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _any_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(kind: type, low: float, high: float) -> Parser:
    def parse(value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError("expected an integer")
            value = int(value)
        if not low <= value <= high:
            # In full: ":g" would print the file size limit as 1.07374e+09.
            raise ValueError(f"expected a value from {_plain(low)} to {_plain(high)}")
        return kind(value)

    return parse


def _choice(*options: str, on: str | None = None) -> Parser:
    """One of ``options``; with ``on``, YAML's bare on/off (booleans) mean ``on``/"off"."""
    def parse(value: Any) -> str:
        if on is not None and isinstance(value, bool):
            value = on if value else "off"
        if not isinstance(value, str) or value.strip().lower() not in options:
            raise ValueError(f"expected one of: {', '.join(options)}")
        return value.strip().lower()

    return parse


def _sizes(value: Any) -> list[int]:
    """Batch sizes: a list, or "1,8,16"; "auto" (or empty) for the built-in choice."""
    if isinstance(value, str):
        text = value.strip().lower()
        value = [] if text in ("", "auto") else [part for part in text.replace(" ", ",").split(",") if part]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected auto or batch sizes such as 1,8,16")
    parse = _number(int, 1, 64)
    try:
        return sorted({parse(v) for v in value})
    except ValueError as err:
        raise ValueError(f"expected auto or batch sizes from 1 to 64 such as 1,8,16 ({err})") from None


def _queue(value: Any) -> str:
    """"files" (the spool folders) or a Redis URL."""
    text = _text(value)
    return "files" if text.lower() == "files" else redisqueue.check_url(text)


def _sampler(value: Any) -> str:
    try:
        return samplers.canonical(_text(value))
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def _schedule(value: Any) -> str:
    try:
        return samplers.schedule(_text(value))
    except KeyError as err:
        raise ValueError(err.args[0]) from None


@dataclass(frozen=True)
class Setting:
    """A row of the table: dotted key, built-in default, parser, one line of help."""

    key: str
    default: Any
    parse: Parser
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "stable-diffusion-v1-5/stable-diffusion-v1-5", _text,
            "Hugging Face repo id, local diffusers folder, .safetensors checkpoint, or a built-in: "
            "tiny-random, sd15-random (random weights, noise)"),
    Setting("offline", False, _bool, "load only local files: never contact the Hugging Face hub"),
    Setting("model_config", "", _any_text,
            "for a .safetensors checkpoint: a diffusers folder of its architecture (configs only), "
            "or such a repo id in the HF cache"),
    Setting("embeddings_dir", "embeddings", _text,
            "textual-inversion embeddings, as in A1111's embeddings folder (subfolders too): .safetensors, "
            "and .pt/.bin that load weights-only; used in prompts by file name"),
    Setting("models_dir", "models", _text,
            "more models a job may pick with model: (A1111's models/Stable-diffusion): .safetensors SD1.x "
            "checkpoints (they take model_config's configs) and diffusers folders, subfolders too"),
    Setting("models.keep_loaded", 2, _number(int, 1, 64),
            "models kept warm on the device at once; the least recently used one leaves first"),
    Setting("models.max_memory_mb", 0, _number(int, 0, 16_777_216),
            "also keep the warm models' weights within this many MB (components they share counted once); "
            "0: no limit"),
    Setting("vae_dir", "vae", _text, "VAE files a job may pick with vae: (A1111's models/VAE): .safetensors"),
    Setting("vae", "Automatic", _text,
            "the VAE of jobs that name none: Automatic (a VAE named like the checkpoint, else the model's own), "
            "None (the model's own), or a file stem in vae_dir"),
    Setting("device", "auto", _choice("auto", "cuda", "cpu", "mps"), "auto: cuda, else mps, else cpu"),
    Setting("dtype", "auto", _choice("auto", "float16", "bfloat16", "float32"),
            "auto: float16 on cuda and mps, float32 on cpu"),
    Setting("safety_checker", False, _bool, "run the SD1.5 safety checker (black images for NSFW)"),
    Setting("cache", "", _any_text, "built-in models and checkpoint hashes; empty: $XDG_CACHE_HOME/sbrender"),
    Setting("loras_dir", "loras", _text,
            "folder of LoRA files (.safetensors, subfolders too), named in prompts as <lora:NAME:WEIGHT>"),
    Setting("loras_cache", 8, _number(int, 1, 1000),
            "LoRA files kept loaded (least recently used dropped first); each holds its weights in memory"),
    Setting("metrics_dir", "", _any_text,
            "Prometheus textfile folder (node_exporter); empty: <state>/metrics; 'off': no metrics"),
    Setting("perf.batch_size", 1, _number(int, 1, 64),
            "images rendered together in one pipeline call, across jobs of the same settings; 1: off"),
    Setting("perf.attention", "sdpa", _choice("sdpa", "classic"),
            "sdpa: PyTorch scaled_dot_product_attention (flash/memory-efficient kernels); classic: plain matmuls"),
    Setting("perf.channels_last", False, _bool, "UNet and VAE in channels_last memory format (faster convolutions on GPUs)"),
    Setting("perf.fuse_qkv", False, _bool, "fuse the attention q, k, v projections into one matmul"),
    Setting("perf.tf32", True, _bool, "allow TF32 matmuls and convolutions on CUDA (affects float32 only)"),
    Setting("perf.cudnn_benchmark", True, _bool,
            "let cuDNN time its convolution kernels once per image size and keep the fastest"),
    Setting("perf.compile", "off", _choice("off", "default", "reduce-overhead", "max-autotune", on="default"),
            "torch.compile the UNet and VAE decoder with this mode; compiled and warmed up before ready"),
    Setting("perf.compile_buckets", [], _sizes,
            "with perf.compile: the batch sizes compiled before ready (static shapes, e.g. 1,2,4,8); a batch of "
            "another size is split into these; auto: 1 and perf.batch_size"),
    Setting("perf.compile_cache", "", _any_text,
            "with perf.compile: folder for torch's compile caches, kept across restarts (one subfolder per torch, "
            "Triton and GPU); empty: <cache>/compile; off: torch's default (under /tmp)"),
    Setting("perf.prompt_cache_mb", 64, _number(int, 0, 65_536),
            "keep the embeddings of recent prompts, up to this many MB, so a repeated prompt skips the text encoder"),
    Setting("perf.vae_tiling", "auto", _choice("auto", "on", "off", on="on"),
            "decode the VAE in tiles (less memory for large images); auto: when a side exceeds 1024"),
    Setting("queue", "files", _queue,
            "where jobs queue: files (the inbox folder, one host or a shared filesystem) or a Redis server "
            "shared by daemons on many hosts, redis://host:6379/0"),
    Setting("redis.lease_seconds", 60.0, _number(float, 0.3, 86_400.0),
            "with a Redis queue: a daemon silent this long loses its jobs to others (renewed every third of it "
            "while it renders; longer than any pause of the process)"),
    Setting("inbox", "inbox", _text, "folder watched for job files"),
    Setting("outbox", "outbox", _text, "folder where PNGs and result JSONs are published"),
    Setting("state", "state", _text, "claimed and archived job files; same filesystem as the inbox"),
    Setting("defaults.negative_prompt", "", _any_text, "negative prompt for jobs that give none"),
    Setting("defaults.steps", 28, _number(int, 1, 10_000), "denoising steps"),
    Setting("defaults.guidance_scale", 7.0, _number(float, 0.0, 30.0), "classifier-free guidance (CFG)"),
    Setting("defaults.width", 512, _number(int, 8, 65_536), "image width, a multiple of 8"),
    Setting("defaults.height", 512, _number(int, 8, 65_536), "image height, a multiple of 8"),
    Setting("defaults.sampler", "DPM++ 2M", _sampler, "A1111 sampler name or diffusers class"),
    Setting("defaults.scheduler", "Automatic", _schedule, "A1111 schedule type; Automatic = the sampler's own "
            "(Karras for DPM++ 2M)"),
    Setting("defaults.clip_skip", 1, _number(int, 1, 12), "A1111's Clip skip: 1 = the text encoder's last layer"),
    Setting("limits.max_steps", 150, _number(int, 1, 10_000), "most steps a job may ask for"),
    Setting("limits.min_side", 64, _number(int, 8, 65_536), "smallest width or height"),
    Setting("limits.max_side", 2048, _number(int, 8, 65_536), "largest width or height"),
    Setting("limits.max_count", 16, _number(int, 1, 10_000), "most images per job"),
    Setting("limits.max_prompt_chars", 4000, _number(int, 1, 1_000_000), "longest prompt, in characters"),
    Setting("limits.max_file_bytes", 1_048_576, _number(int, 64, 1 << 30),
            "largest job file, in bytes, besides its init image (read up to this plus max_image_bytes in base64)"),
    Setting("limits.max_image_bytes", 16 * 1024 * 1024, _number(int, 64, 256 * 1024 * 1024),
            "largest init image (img2img), in bytes once decoded from base64"),
    Setting("limits.max_image_pixels", 4096 * 4096, _number(int, 64, 8192 * 8192),
            "most pixels of an init image, read from its header before decoding (decompression bombs)"),
    Setting("limits.max_batch_jobs", 1000, _number(int, 1, 100_000), "most jobs in one batch file"),
    Setting("limits.max_crashes", 3, _number(int, 1, 1000),
            "a job file claimed by a daemon that died this many times is failed, not retried"),
    Setting("watch.mode", "auto", _choice("auto", "inotify", "polling"),
            "auto: inotify where it works; polling for NFS, SMB, Docker Desktop, WSL2"),
    Setting("watch.rescan_seconds", 2.0, _number(float, 0.05, 3600.0),
            "full rescan of the inbox every this many seconds (events can be lost)"),
    Setting("watch.settle_seconds", 1.0, _number(float, 0.0, 3600.0),
            "a file seen without a close or rename event is read once unchanged this long"),
    Setting("serve.host", "127.0.0.1", _text,
            "`sbrender serve`: address to listen on; anything but loopback needs serve.token"),
    Setting("serve.port", 7860, _number(int, 0, 65_535), "`sbrender serve`: TCP port (7860, A1111's; 0: any free one)"),
    Setting("serve.token", "", _any_text,
            "`sbrender serve`: the API token (Authorization: Bearer TOKEN, or Basic with TOKEN as the password); "
            "required when serve.host is not loopback"),
    Setting("serve.max_body_bytes", 32 * 1_048_576, _number(int, 1024, 1 << 30),
            "`sbrender serve`: largest request body (img2img images come base64 in the JSON)"),
    Setting("serve.max_queue", 256, _number(int, 1, 1_000_000),
            "`sbrender serve`: most unfinished jobs it submitted; more get 429 with Retry-After"),
    Setting("serve.sync_timeout_seconds", 3600.0, _number(float, 1.0, 86_400.0),
            "`sbrender serve`: how long /generate and A1111's txt2img/img2img wait for their images (then 504; "
            "the job goes on)"),
    Setting("serve.allowed_hosts", "", _any_text,
            "`sbrender serve`: more Host names to answer, comma-separated (loopback names always; * for any)"),
    Setting("serve.allowed_origins", "", _any_text,
            "`sbrender serve`: web origins allowed to call it cross-site (CORS), comma-separated; empty: none"),
    Setting("log.format", "auto", _choice("auto", "console", "json"), "auto: console on a terminal, JSON lines otherwise"),
    Setting("log.level", "info", _choice("debug", "info", "warning", "error"), "lowest level logged"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
# Accepted spellings that mean a current key.
MODEL_ALIASES = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


@dataclass(frozen=True)
class Settings:
    """The effective configuration: values by dotted key, and where each came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)
    config_file: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def model(self) -> str:
        return str(self.values["model"])

    @property
    def inbox(self) -> Path:
        return Path(self.values["inbox"])

    @property
    def outbox(self) -> Path:
        return Path(self.values["outbox"])

    @property
    def state(self) -> Path:
        return Path(self.values["state"])

    @property
    def loras_dir(self) -> Path:
        return Path(self.values["loras_dir"])

    @property
    def models_dir(self) -> Path:
        return Path(self.values["models_dir"])

    @property
    def vae_dir(self) -> Path:
        return Path(self.values["vae_dir"])

    @property
    def embeddings_dir(self) -> Path:
        return Path(self.values["embeddings_dir"])

    @property
    def cache(self) -> Path:
        if self.values["cache"]:
            return Path(self.values["cache"])
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "sbrender"

    def section(self, name: str) -> dict[str, Any]:
        """The values under ``name.``, keyed by the rest of the key."""
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)}

    def nested(self) -> dict[str, Any]:
        """The values as the nested mapping a config file holds."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and any(k.startswith(dotted + ".") for k in BY_KEY):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _unknown(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known settings: {', '.join(known)}"
    return ConfigError(f"unknown setting {name} in {where}", hint=hint)


def read_config_file(path: Path) -> dict[str, Any]:
    """The flattened settings of a YAML config file; a bad file is a ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}",
                          hint="pass --config PATH or set SBRENDER_CONFIG to an existing file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    flat = _flatten(data)
    for key in flat:
        if key not in BY_KEY:
            raise _unknown(key, list(BY_KEY), f"config file {path}")
    return flat


def _pick_config_file(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit).absolute()
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).absolute()
    return DEFAULT_CONFIG_FILE.absolute() if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the four layers and check every value; raises ``ConfigError``."""
    env = os.environ if env is None else env
    path = _pick_config_file(config_file, env)
    raw: dict[str, tuple[Any, str]] = {s.key: (s.default, "default") for s in SETTINGS}
    if path is not None:
        for key, value in read_config_file(path).items():
            raw[key] = (value, f"config file {path}")
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        if name not in BY_ENV:
            raise _unknown(name, list(BY_ENV), "the environment")
        raw[BY_ENV[name].key] = (value, f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (value, f"command-line flag for {key}")

    values: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = BY_KEY[key].parse(value)
        except ValueError as err:
            raise ConfigError(f"bad value {value!r} for setting {key} (from {source}): {err}",
                              hint=f"{key}: {BY_KEY[key].help}") from None
    values["model"] = MODEL_ALIASES.get(values["model"], values["model"])
    for key in ("inbox", "outbox", "state", "embeddings_dir", "loras_dir", "cache", "metrics_dir"):
        if values[key] and values[key].lower() != "off":
            values[key] = str(Path(values[key]).expanduser().absolute())
    # A model path given relative to the working directory must keep working
    # after the daemon is started elsewhere.
    for key in ("model", "model_config"):
        if values[key] and values[key] not in BUILTINS and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().absolute())
    settings = Settings(values, {k: s for k, (_, s) in raw.items()}, path)
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    """Rules that tie several settings together."""
    problems: list[tuple[str, str]] = []
    low, high = s["limits.min_side"], s["limits.max_side"]
    if low > high:
        problems.append(("limits.min_side", f"must not exceed limits.max_side ({high})"))
    for side in ("defaults.width", "defaults.height"):
        if s[side] % 8:
            problems.append((side, "must be a multiple of 8"))
        elif not low <= s[side] <= high:
            problems.append((side, f"must be from limits.min_side ({low}) to limits.max_side ({high})"))
    if s["defaults.steps"] > s["limits.max_steps"]:
        problems.append(("defaults.steps", f"must not exceed limits.max_steps ({s['limits.max_steps']})"))
    if problems:
        key, why = problems[0]
        raise ConfigError(f"setting {key} = {s[key]!r} (from {s.sources[key]}) {why}",
                          hint=f"change {key} or the limit it is checked against")
