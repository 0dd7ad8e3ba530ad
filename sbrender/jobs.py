"""The job schema: what a job file may say, checked field by field.

One table, ``FIELDS``, drives validation, the error messages and the help
text. A file holds one job (a mapping with a ``prompt``) or a batch: a list
of jobs, or a mapping ``{defaults: {...}, jobs: [...]}``. Batch jobs get the
ids ``<stem>-001``, ``<stem>-002``, ...
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import checkpoints, ids, initimage, loras, prompts, samplers
from .config import Settings
from .errors import JobError, UnsafeFileError
from .jobfile import parse_document

SEED_MAX = 2**32 - 1
GUIDANCE_MAX = 30.0
PRIORITY_LIMIT = 1_000_000
CLIP_SKIP_MAX = 12  # SD1's text encoder has 12 layers
DENOISING_STRENGTH = 0.75  # A1111's default


@dataclass(frozen=True)
class Rules:
    """Defaults and limits a job is checked against (from the settings)."""

    negative_prompt: str = ""
    steps: int = 28
    guidance_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    clip_skip: int = 1
    max_steps: int = 150
    min_side: int = 64
    max_side: int = 2048
    max_count: int = 16
    max_prompt_chars: int = 4000
    max_file_bytes: int = 1_048_576
    max_batch_jobs: int = 1000
    vae: str = checkpoints.AUTOMATIC  # the config's vae
    default_model: str = ""  # the config's model: a job that names it renders with the default
    max_image_bytes: int = 16 * 1024 * 1024  # an init image, decoded
    max_image_pixels: int = 4096 * 4096
    # False: an init image's pixels are not decoded (its header, size and hash are
    # checked): for listings of queued jobs, which read every file each time.
    image_pixels: bool = True
    # The LoRA files, models and VAEs a name may stand for; None: names are not checked here
    # (the daemon checks them when it renders, against the folders as they are then).
    loras: loras.Catalog | None = None
    models: checkpoints.Catalog | None = None
    vaes: checkpoints.Catalog | None = None

    @classmethod
    def from_settings(cls, settings: Settings, with_loras: bool = True) -> Rules:
        """The settings' defaults and limits; with ``with_loras``, the catalogs of
        ``loras_dir``, ``models_dir`` and ``vae_dir`` where they exist (each read only
        when a job names one)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {**settings.section("defaults"), **settings.section("limits")}
        catalogs: dict[str, Any] = {}
        if with_loras:
            # A host without models_dir or vae_dir (a web app's) leaves those names to the daemon.
            catalogs = dict(loras=loras.scan(settings.loras_dir),
                            models=checkpoints.model_catalog(settings.models_dir, settings.model)
                            if settings.models_dir.is_dir() else None,
                            vaes=checkpoints.vae_catalog(settings.vae_dir) if settings.vae_dir.is_dir() else None)
        return cls(**{k: v for k, v in values.items() if k in names}, vae=settings["vae"],
                   default_model=settings.model, **catalogs)

    @property
    def read_cap(self) -> int:
        """The most bytes of a job file read: ``max_file_bytes`` and, beyond it, one
        init image of ``max_image_bytes`` in base64, with room to wrap it (a YAML
        block, CRLF line ends, an indent of four). What the file holds besides its
        init images is still held to ``max_file_bytes`` (``check_size``)."""
        chars = initimage.base64_chars(self.max_image_bytes)
        return self.max_file_bytes + chars + chars // 8


@dataclass(frozen=True)
class Job:
    """One validated job: everything the renderer needs, nothing from the file left unchecked."""

    id: str
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int | None  # None: pick a random one when rendering, and record it
    count: int
    sampler: str  # A1111 1.9+ name ("DPM++ 2M"); an older one ("DPM++ 2M Karras") where built by hand
    priority: int
    clip_skip: int = 1  # A1111's numbering: 1 = the text encoder's last layer
    scheduler: str = "Automatic"  # A1111's schedule type, resolved by build_job ("Karras")
    loras: tuple[loras.LoraUse, ...] = ()  # the loras field; see lora_set for the tags too
    model: str = ""  # a name in models_dir; "": the configured model
    vae: str = checkpoints.AUTOMATIC  # Automatic, None, or a name in vae_dir
    # img2img: the image to start from; then denoising_strength and resize_mode are set too.
    init_image: initimage.InitImage | None = None
    denoising_strength: float | None = None
    resize_mode: int | None = None  # A1111's: 0 just resize, 1 crop and resize, 2 resize and fill
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def lora_set(self) -> tuple[loras.LoraUse, ...]:
        """The LoRAs this job renders with: the prompt's tags in order, then the field."""
        return (*loras.in_prompt(self.prompt), *self.loras)

    @property
    def img2img_key(self) -> tuple[str, float] | None:
        """What img2img jobs must share to render in one pipeline call: the strength
        diffusers is given for this job's steps (A1111's step rule), so two strengths
        that run the same steps batch. None for a txt2img job (never batched with one)."""
        if self.init_image is None or self.denoising_strength is None:
            return None
        return ("img2img", initimage.a1111_steps(self.steps, self.denoising_strength).strength)

    def params(self) -> dict[str, Any]:
        """The resolved parameters, as written into the result (an init image as its
        record: sha256, size, format, bytes; never its base64)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "count": self.count,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "priority": self.priority,
            "clip_skip": self.clip_skip,
            # Only when given: the prompt keeps its own <lora:...> tags.
            **({"loras": loras.params(self.loras)} if self.loras else {}),
            **({"model": self.model} if self.model else {}),
            **({"vae": self.vae} if self.vae != checkpoints.AUTOMATIC else {}),
            **({"init_image": self.init_image.record(), "denoising_strength": self.denoising_strength,
                "resize_mode": self.resize_mode} if self.init_image is not None else {}),
        }


@dataclass(frozen=True)
class BadJob:
    """A job that could not be validated; it yields a failed result under ``id``."""

    id: str
    error: JobError
    priority: int = 0
    source: str = ""


Entry = Job | BadJob


# --- field checks -------------------------------------------------------------

Check = Callable[[Any, Rules], Any]


def _integer(value: Any, name: str) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{name} must be an integer, not {_describe(value)}", field=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError(f"{name} must be a number, not {_describe(value)}", field=name)
    if not math.isfinite(value):
        raise JobError(f"{name} must be a finite number, not {value}", field=name)
    return float(value)


def _num(value: float) -> str:
    # Whole numbers in full: ":g" would print the seed limit as 4.29497e+09.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _in_range(value: float, name: str, low: float, high: float, why: str = "") -> None:
    if not low <= value <= high:
        raise JobError(f"{name} is {_num(value)}, outside the allowed range {_num(low)} to {_num(high)}{why}",
                       field=name)


def _describe(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "a mapping", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _text(name: str, limit_attr: str, required: bool) -> Check:
    def check(value: Any, rules: Rules) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise JobError(f"{name} must be a string, not {_describe(value)}", field=name)
        if "\x00" in value:
            raise JobError(f"{name} must not contain NUL characters", field=name)
        if required and not value.strip():
            raise JobError(f"{name} must not be empty", field=name)
        limit = getattr(rules, limit_attr)
        if len(value) > limit:
            raise JobError(f"{name} has {len(value)} characters, more than the limit of {limit}",
                           field=name, hint="shorten it or raise limits.max_prompt_chars")
        why = prompts.problem(value, positive=name == "prompt")
        if why:
            raise JobError(f"{name} {why}", field=name)
        return value

    return check


def _steps(value: Any, rules: Rules) -> int:
    steps = _integer(value, "steps")
    _in_range(steps, "steps", 1, rules.max_steps, " (limits.max_steps)")
    return steps


def _guidance(value: Any, rules: Rules) -> float:
    scale = _number(value, "guidance_scale")
    _in_range(scale, "guidance_scale", 0.0, GUIDANCE_MAX)
    return scale


def _side(name: str) -> Check:
    def check(value: Any, rules: Rules) -> int:
        side = _integer(value, name)
        _in_range(side, name, rules.min_side, rules.max_side, " (limits.min_side, limits.max_side)")
        if side % 8:
            lower = max(rules.min_side, side - side % 8)
            raise JobError(f"{name} must be a multiple of 8, not {side} (try {lower})", field=name)
        return side

    return check


def _seed(value: Any, rules: Rules) -> int | None:
    if value is None or value == -1:
        return None
    seed = _integer(value, "seed")
    _in_range(seed, "seed", 0, SEED_MAX, " (or -1/null for a random seed)")
    return seed


def _count(value: Any, rules: Rules) -> int:
    count = _integer(value, "count")
    _in_range(count, "count", 1, rules.max_count, " (limits.max_count)")
    return count


def _sampler(value: Any, rules: Rules) -> str:
    """The name as given, once known; ``build_job`` resolves it with the schedule."""
    if not isinstance(value, str):
        raise JobError(f"sampler must be a string, not {_describe(value)}", field="sampler")
    try:
        return samplers.canonical(value)
    except KeyError as err:
        raise JobError(err.args[0], field="sampler") from None


def _scheduler(value: Any, rules: Rules) -> str:
    if not isinstance(value, str):
        raise JobError(f"scheduler must be a string, not {_describe(value)}", field="scheduler")
    try:
        return samplers.schedule(value)
    except KeyError as err:
        raise JobError(err.args[0], field="scheduler") from None


def _clip_skip(value: Any, rules: Rules) -> int:
    layers = _integer(value, "clip_skip")
    _in_range(layers, "clip_skip", 1, CLIP_SKIP_MAX, " (1 = the last layer, as in A1111)")
    return layers


def _loras(value: Any, rules: Rules) -> tuple[loras.LoraUse, ...]:
    uses = loras.from_field(value)
    if rules.loras is not None:
        for use in uses:
            rules.loras.lookup(use.name)
    return uses


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JobError(f"{field} must be a name, not {_describe(value) if value != '' else 'an empty string'}",
                       field=field, hint="`sbrender models` lists the names")
    if "\x00" in value or len(value) > 1000:
        raise JobError(f"{field} is not a usable name", field=field, hint="`sbrender models` lists the names")
    return value.strip()


def _model(value: Any, rules: Rules) -> str:
    """A model's name, as the catalog knows it where there is one; "" for the configured model."""
    if value is None:
        return ""
    name = _name(value, "model")
    if rules.models is not None:
        entry = rules.models.lookup(name, "model")
        return "" if entry.kind == "default" else entry.name
    return "" if name in checkpoints.default_names(rules.default_model) else name


def _vae(value: Any, rules: Rules) -> str:
    name = _name(value, "vae")
    fixed = {c.lower(): c for c in checkpoints.VAE_CHOICES}
    if name.lower() in fixed:
        return fixed[name.lower()]
    return rules.vaes.lookup(name, "vae").name if rules.vaes is not None else name


def _init_image(value: Any, rules: Rules) -> initimage.InitImage | None:
    if value is None or isinstance(value, initimage.InitImage):  # one a client or a batch already decoded
        return value
    return initimage.decode(value, max_bytes=rules.max_image_bytes, max_pixels=rules.max_image_pixels,
                            pixels=rules.image_pixels)


def _denoising_strength(value: Any, rules: Rules) -> float:
    strength = _number(value, "denoising_strength")
    _in_range(strength, "denoising_strength", 0.0, 1.0, " (how much of the init image is redrawn, as in A1111)")
    return strength


def _resize_mode(value: Any, rules: Rules) -> int:
    mode = _integer(value, "resize_mode")
    if mode in initimage.REFUSED_RESIZE_MODES:
        raise JobError(f"resize_mode {initimage.REFUSED_RESIZE_MODES[mode]}", field="resize_mode")
    if mode not in initimage.RESIZE_MODES:
        known = ", ".join(f"{k} ({name})" for k, name in initimage.RESIZE_MODES.items())
        raise JobError(f"resize_mode must be one of {known}, not {mode}", field="resize_mode")
    return mode


def _priority(value: Any, rules: Rules) -> int:
    priority = _integer(value, "priority")
    _in_range(priority, "priority", -PRIORITY_LIMIT, PRIORITY_LIMIT)
    return priority


def _metadata(value: Any, rules: Rules) -> dict[str, Any]:
    if value is None or (type(value) is dict and not value):
        return {}  # the usual case, without the JSON round trip below (a third of a job's checks)
    if not isinstance(value, Mapping):
        raise JobError(f"metadata must be a mapping, not {_describe(value)}", field="metadata")
    try:
        # Copied untouched into the result JSON, so it must survive a JSON round trip.
        copy = json.loads(json.dumps(value, allow_nan=False))
        if copy != value:  # json.dumps turns YAML's `1:` key into "1" without complaint
            raise ValueError("it changes when written as JSON")
        return dict(copy)
    except (TypeError, ValueError) as err:
        raise JobError(f"metadata must hold only strings, numbers, booleans, null, lists and "
                       f"mappings with string keys ({err})", field="metadata") from None


@dataclass(frozen=True)
class Field:
    """A row of the schema: the field, its check, the default's name in ``Rules``, its help."""

    name: str
    check: Check
    default: str | None
    help: str
    aliases: tuple[str, ...] = ()


FIELDS: tuple[Field, ...] = (
    Field("prompt", _text("prompt", "max_prompt_chars", True), None, "what to draw (required)"),
    Field("negative_prompt", _text("negative_prompt", "max_prompt_chars", False), "negative_prompt",
          "what to avoid"),
    Field("steps", _steps, "steps", "denoising steps"),
    Field("guidance_scale", _guidance, "guidance_scale", "classifier-free guidance", ("cfg_scale",)),
    Field("width", _side("width"), "width", "image width in pixels, a multiple of 8"),
    Field("height", _side("height"), "height", "image height in pixels, a multiple of 8"),
    Field("seed", _seed, None, "random seed; omitted, null or -1: random (recorded in the result)"),
    Field("count", _count, None, "images for this job, seeds seed, seed+1, ..."),
    Field("sampler", _sampler, "sampler", "A1111 sampler name (DPM++ 2M; an older DPM++ 2M Karras works too) or "
          "diffusers scheduler class", ("sampler_name",)),
    Field("scheduler", _scheduler, "scheduler", "A1111's schedule type: Automatic (the sampler's own, as in A1111), "
          "Karras, Exponential, Uniform, SGM Uniform", ("schedule_type",)),
    Field("clip_skip", _clip_skip, "clip_skip", "text encoder layers to skip, A1111's Clip skip: 1 = none, 2 = "
          "the layer before the last"),
    Field("loras", _loras, None, "LoRAs by name: {name: weight} or {name: {te: w, unet: w}}; added to the "
          "prompt's <lora:...> tags (a LoRA named in both is refused)"),
    Field("model", _model, None, "the model to render with: a checkpoint or folder name in models_dir "
          "(`sbrender models`); default: the configured model"),
    Field("vae", _vae, "vae", "the VAE: Automatic (one named like the checkpoint, else the model's own), None "
          "(the model's own), or a file name in vae_dir"),
    Field("init_image", _init_image, None, "img2img: the image to start from, a PNG, JPEG or WebP file in base64 (a "
          "data:image/...;base64, prefix is accepted)"),
    Field("denoising_strength", _denoising_strength, None, "img2img: how much of the init image is redrawn, 0 to 1 "
          "(A1111's; default 0.75)", ("strength",)),
    Field("resize_mode", _resize_mode, None, "img2img: how the init image takes the job's size, as A1111: 0 just "
          "resize (default), 1 crop and resize, 2 resize and fill"),
    Field("priority", _priority, None, "higher renders first; default 0"),
    Field("metadata", _metadata, None, "free mapping copied untouched into the result"),
)
_BY_NAME = {f.name: f for f in FIELDS}
_ALIASES = {alias: f.name for f in FIELDS for alias in f.aliases}
_CONSTANT_DEFAULTS: dict[str, Any] = {"seed": None, "count": 1, "priority": 0, "metadata": None, "loras": None,
                                      "model": None,
                                      "init_image": None, "denoising_strength": DENOISING_STRENGTH,
                                      "resize_mode": 0}
IMG2IMG_ONLY = ("denoising_strength", "resize_mode")


@functools.lru_cache(maxsize=16)
def _defaults(rules: Rules) -> dict[str, Any]:
    """Every field's value when a job leaves it out (all but the prompt); read only."""
    return {f.name: getattr(rules, f.default) if f.default is not None else _CONSTANT_DEFAULTS[f.name]
            for f in FIELDS if f.name != "prompt"}


def _canonical_keys(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    unknown = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise JobError(f"{where}field names must be strings, not {_describe(key)} {key!r}")
        name = _ALIASES.get(key, key)
        if name not in _BY_NAME:
            unknown.append(key)
        elif name in out:
            # Name the alias whichever of the two came first in the file.
            alias = key if key != name else given_as[name]
            raise JobError(f"{where}both {name} and its alias {alias} are given; keep one", field=name)
        else:
            out[name] = value
            given_as[name] = key
    if unknown:
        allowed = ", ".join(f.name for f in FIELDS)
        raise JobError(f"{where}unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(map(str, unknown))}",
                       field=str(unknown[0]), hint=f"allowed fields: {allowed} (cfg_scale = guidance_scale)")
    return out


def build_job(job_id: str, data: Any, rules: Rules, shared: Mapping[str, Any] | None = None,
              source: str = "") -> Job:
    """Validate one job's mapping (over the batch's shared defaults) into a ``Job``."""
    if not isinstance(data, Mapping):
        raise JobError(f"a job must be a mapping of fields, not {_describe(data)}",
                       hint="write at least: prompt: \"a cat on a mat\"")
    given = {**(shared or {}), **_canonical_keys(data, "")}
    if "prompt" not in given:
        raise JobError("prompt is missing", field="prompt", hint="add: prompt: \"a cat on a mat\"")
    merged = {**_defaults(rules), **given}
    if "sampler" in given and "scheduler" not in given:
        merged["scheduler"] = "Automatic"  # a schedule belongs to its sampler: the default one's does not carry over
    values = {f.name: f.check(merged[f.name], rules) for f in FIELDS}
    try:
        choice = samplers.resolve(values["sampler"], values["scheduler"])
    except KeyError as err:
        raise JobError(err.args[0], field="scheduler") from None
    values["sampler"], values["scheduler"] = choice.key
    if values["init_image"] is None:
        for name in IMG2IMG_ONLY:
            if name in given:
                raise JobError(f"{name} is given without init_image; it applies to img2img only", field=name,
                               hint=f"add init_image (the picture to start from) or remove {name}")
            values[name] = None
    if values["seed"] is not None and values["seed"] + values["count"] - 1 > SEED_MAX:
        raise JobError(f"seed + count - 1 must not exceed {SEED_MAX}", field="seed")
    loras.requested(values["prompt"], values["loras"], rules.loras)  # the tags' weights and names, no repeats
    return Job(id=job_id, source=source, **values)


def parse_entries(name: str, document: Any, rules: Rules) -> list[Entry]:
    """The jobs a parsed job file holds; a bad job in a batch fails alone."""
    file_id = ids.stem(name)
    if isinstance(document, Mapping) and "jobs" in document:
        extra = sorted(str(k) for k in document if k not in ("jobs", "defaults"))
        if extra:
            raise JobError(f"a batch file holds only 'defaults' and 'jobs', not: {', '.join(extra)}",
                           field=extra[0])
        items, shared_raw = document["jobs"], document.get("defaults") or {}
        if not isinstance(shared_raw, Mapping):
            raise JobError(f"defaults must be a mapping, not {_describe(shared_raw)}", field="defaults")
        shared = _canonical_keys(shared_raw, "defaults: ")
        for f in FIELDS:  # a bad shared value is reported once, for the whole file
            if f.name in shared:
                checked = f.check(shared[f.name], rules)
                if f.name == "init_image":
                    shared[f.name] = checked  # decoded once for every job of the batch
    elif isinstance(document, list):
        items, shared = document, {}
    else:
        return [build_job(file_id, document, rules, source=name)]
    if not isinstance(items, list) or not items:
        raise JobError("jobs must be a non-empty list of jobs", field="jobs")
    if len(items) > rules.max_batch_jobs:
        raise JobError(f"a batch holds {len(items)} jobs, more than the limit of {rules.max_batch_jobs}",
                       field="jobs", hint="split it or raise limits.max_batch_jobs")
    entries: list[Entry] = []
    for index, item in enumerate(items):
        job_id = ids.batch_id(file_id, index, len(items))
        try:
            entries.append(build_job(job_id, item, rules, shared, source=name))
        except JobError as err:
            err.message = f"job {index + 1} of the batch: {err.message}"
            priority = item.get("priority", 0) if isinstance(item, Mapping) else 0
            entries.append(BadJob(job_id, err, priority if isinstance(priority, int) else 0, name))
    return entries


def parse_job_bytes(name: str, data: bytes, rules: Rules) -> list[Entry]:
    """Everything from a file's bytes to its entries; a file-level problem is one ``BadJob``."""
    file_id = ids.stem(name)
    problem = ids.id_problem(file_id)
    if problem:
        safe = ids.safe_id_for(name)
        return [BadJob(safe, JobError(f"file name {name!r} is not a usable job id: {problem}",
                                      hint="rename it, e.g. cat-42.yaml"), 0, name)]
    try:
        document = parse_document(name, data)
        check_size(document, len(data), rules)
        return parse_entries(name, document, rules)
    except JobError as err:
        return [BadJob(file_id, err, 0, name)]


def check_size(document: Any, size: int, rules: Rules) -> None:
    """A file read under ``rules.read_cap`` holds at most ``max_file_bytes`` besides
    its init images: the larger cap is for images only. What is besides them is
    measured as JSON, so the indentation of a wrapped YAML block is not counted."""
    if size <= rules.max_file_bytes:
        return
    hint = "split it into several files or raise limits.max_file_bytes"
    rest = _without_init_images(document)
    if rest is document:
        raise UnsafeFileError(f"job file is {size} bytes, more than the limit of {rules.max_file_bytes}", hint=hint)
    besides = len(json.dumps(rest, ensure_ascii=False, default=str).encode("utf-8"))
    if besides > rules.max_file_bytes:
        raise UnsafeFileError(f"job file holds {besides} bytes besides its init image, more than the limit of "
                              f"{rules.max_file_bytes}", hint=hint)


def _without_init_images(document: Any) -> Any:
    """The parsed job file without its init_image strings (its job's, or its batch's
    jobs' and defaults'); the very same object when it holds none."""
    def strip(job: Any) -> Any:
        if isinstance(job, Mapping) and isinstance(job.get("init_image"), str):
            return {k: v for k, v in job.items() if k != "init_image"}
        return job

    if isinstance(document, Mapping) and isinstance(document.get("jobs"), list):
        jobs = [strip(j) for j in document["jobs"]]
        defaults = strip(document.get("defaults"))
        if defaults is document.get("defaults") and all(a is b for a, b in zip(jobs, document["jobs"])):
            return document
        return {**document, "defaults": defaults, "jobs": jobs}
    if isinstance(document, list):
        jobs = [strip(j) for j in document]
        return document if all(a is b for a, b in zip(jobs, document)) else jobs
    return strip(document)


# --- JSON Schema ------------------------------------------------------------------

def _field_schemas(rules: Rules) -> dict[str, dict[str, Any]]:
    """One JSON Schema per field, with the limits in force; the same rules as the checks above."""
    side = {"type": "integer", "multipleOf": 8, "minimum": rules.min_side, "maximum": rules.max_side}
    text = {"type": "string", "maxLength": rules.max_prompt_chars}
    guidance = {"type": "number", "minimum": 0, "maximum": GUIDANCE_MAX}
    weight = {"type": "number"}
    strength = {"type": "number", "minimum": 0, "maximum": 1}
    names = samplers.names() + samplers.legacy_names() + sorted({s.scheduler for s in samplers.SAMPLERS})
    schedules = samplers.schedules() + sorted(samplers.API_NAMES)
    return {
        "prompt": {**text, "minLength": 1},
        "negative_prompt": {"type": ["string", "null"], "maxLength": rules.max_prompt_chars},
        "steps": {"type": "integer", "minimum": 1, "maximum": rules.max_steps},
        "guidance_scale": guidance,
        "cfg_scale": guidance,
        "width": side,
        "height": side,
        "seed": {"type": ["integer", "null"], "minimum": -1, "maximum": SEED_MAX},
        "count": {"type": "integer", "minimum": 1, "maximum": rules.max_count},
        "sampler": {"type": "string", "enum": names},
        "sampler_name": {"type": "string", "enum": names},
        "scheduler": {"type": "string", "enum": schedules},
        "schedule_type": {"type": "string", "enum": schedules},
        "clip_skip": {"type": "integer", "minimum": 1, "maximum": CLIP_SKIP_MAX},
        "loras": {"type": ["object", "null"], "propertyNames": {"minLength": 1}, "additionalProperties": {
            "oneOf": [weight, {"type": "object", "minProperties": 1, "additionalProperties": False,
                               "properties": {"te": weight, "unet": weight}}]}},
        "model": {"type": ["string", "null"], "minLength": 1},
        "vae": {"type": "string", "minLength": 1},
        "init_image": {"type": ["string", "null"], "minLength": 1,
                       "maxLength": rules.read_cap - rules.max_file_bytes + 200},  # line breaks, a data: prefix
        "denoising_strength": strength,
        "strength": strength,
        "resize_mode": {"type": "integer", "enum": sorted(initimage.RESIZE_MODES)},
        "priority": {"type": "integer", "minimum": -PRIORITY_LIMIT, "maximum": PRIORITY_LIMIT},
        "metadata": {"type": ["object", "null"]},
    }


def json_schema(rules: Rules) -> dict[str, Any]:
    """The JSON Schema of a job file (single job, list of jobs, or defaults + jobs),
    for editors that validate YAML and JSON files."""
    props = _field_schemas(rules)
    for f in FIELDS:
        for name in (f.name, *f.aliases):
            props[name] = {**props[name], "description": f.help}
    job = {"type": "object", "properties": props, "required": ["prompt"], "additionalProperties": False,
           # img2img's settings need its image (in a batch, the defaults may hold it: not checked there)
           "dependentRequired": {name: ["init_image"] for name in ("denoising_strength", "strength", "resize_mode")}}
    shared = {"type": "object", "properties": props, "additionalProperties": False}
    jobs = {"type": "array", "items": {"$ref": "#/$defs/job"}, "minItems": 1, "maxItems": rules.max_batch_jobs}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sbrender job file",
        "description": "One job, a list of jobs, or {defaults, jobs}. The file name is the job id.",
        "$defs": {"job": job},
        "oneOf": [
            {"$ref": "#/$defs/job"},
            jobs,
            {"type": "object", "required": ["jobs"], "additionalProperties": False,
             "properties": {"defaults": shared, "jobs": {**jobs, "items": {
                 "type": "object", "properties": props, "additionalProperties": False}}}},
        ],
    }
