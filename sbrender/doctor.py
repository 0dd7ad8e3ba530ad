"""`sbrender doctor`: check what the daemon needs, and say what to fix.

Each check is a row of ``CHECKS``; each returns findings: a level ("ok",
"warn", "fail"), what was found, and for anything not ok, the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level:<5} {self.topic}: {self.message}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


def check_config(s: Settings) -> list[Finding]:
    where = str(s.config_file) if s.config_file else "built-in defaults (no config file)"
    return [Finding(OK, "config", f"{where}; model {s.model}, device {s['device']}, dtype {s['dtype']}")]


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folders(s: Settings) -> list[Finding]:
    out = []
    for name, folder in (("inbox", s.inbox), ("outbox", s.outbox), ("state", s.state)):
        if folder.is_dir():
            ok = os.access(folder, os.W_OK | os.X_OK)
            out.append(Finding(OK if ok else FAIL, name, f"{folder}" + ("" if ok else " is not writable"),
                               "" if ok else f"give this user write access to {folder}"))
        else:
            parent = _existing_parent(folder)
            ok = os.access(parent, os.W_OK | os.X_OK)
            out.append(Finding(WARN if ok else FAIL, name, f"{folder} does not exist yet",
                               "it is created at start" if ok else f"create it, or make {parent} writable"))
    inbox, state = _existing_parent(s.inbox), _existing_parent(s.state)
    if os.stat(inbox).st_dev != os.stat(state).st_dev:
        out.append(Finding(FAIL, "filesystem", f"state {s.state} is not on the inbox's filesystem",
                           "put the state folder beside the inbox (claims are renames)"))
    free = shutil.disk_usage(_existing_parent(s.outbox)).free
    if free < 1 << 30:
        out.append(Finding(WARN, "disk", f"{free / 2**20:.0f} MiB free for the outbox", "free some space"))
    return out


def check_loras(s: Settings) -> list[Finding]:
    """The LoRA files jobs may name, and each that cannot be used (why, what to do)."""
    from . import loras

    folder = s.loras_dir
    if not folder.is_dir():
        explicit = s.sources.get("loras_dir", "default") != "default"
        return [Finding(WARN if explicit else OK, "loras", f"{folder} does not exist: jobs cannot name LoRAs",
                        "create it or set loras_dir to the folder of your LoRAs" if explicit else "")]
    catalog = loras.scan(folder)
    files = catalog.files
    out = [Finding(OK, "loras", f"{len(files)} file(s) in {folder}"
                                + (f": {', '.join(catalog.names()[:10])}" if files else "")
                                + (" ..." if len(catalog.names()) > 10 else ""))]
    stems: dict[str, list[loras.LoraFile]] = {}
    for f in files:
        stems.setdefault(f.name, []).append(f)
        if f.problem:
            out.append(Finding(WARN, "loras", f"{f.path} {f.problem}",
                               "convert it to .safetensors" if f.path.suffix != loras.SUFFIX
                               else "replace the file (download it again)"))
    for name, same in stems.items():
        if len([f for f in same if not f.problem]) > 1:
            out.append(Finding(WARN, "loras", f"{len(same)} files are named {name}; jobs naming it are refused",
                               "rename all but one"))
    if files and s["perf.fuse_qkv"]:
        out.append(Finding(WARN, "loras", "perf.fuse_qkv is on: every job that names a LoRA fails (the fused "
                                          "q/k/v projections would bypass the LoRA's layers)",
                           "set perf.fuse_qkv: false on a daemon that renders LoRAs"))
    if files and importlib.util.find_spec("peft") is None:
        out.append(Finding(WARN, "loras", "peft is not installed: LoRA jobs fail",
                           "pip install 'sbrender[render]' (diffusers loads LoRAs through peft)"))
    return out


def check_inotify(s: Settings) -> list[Finding]:
    limits = {}
    for name in ("max_user_watches", "max_user_instances", "max_queued_events"):
        try:
            limits[name] = int(Path(f"/proc/sys/fs/inotify/{name}").read_text())
        except (OSError, ValueError):
            pass
    if not limits:
        return [Finding(WARN, "watch", "no inotify here: the inbox is polled",
                        "nothing, or set watch.mode: polling to say so")]
    text = ", ".join(f"{k} {v}" for k, v in limits.items())
    if limits.get("max_user_instances", 128) < 8 or limits.get("max_user_watches", 8192) < 64:
        return [Finding(WARN, "watch", text, "raise fs.inotify.max_user_instances/max_user_watches (sysctl)")]
    return [Finding(OK, "watch", f"mode {s['watch.mode']}; inotify {text}")]


def check_libraries(s: Settings) -> list[Finding]:
    out = []
    for name in ("torch", "diffusers", "transformers"):
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            return [Finding(FAIL, name, f"cannot be imported ({err})", "pip install 'sbrender[render]'")]
        out.append(Finding(OK, name, getattr(module, "__version__", "?")))
    return out


def check_device(s: Settings) -> list[Finding]:
    import torch

    from .pipeline import pick_device, pick_dtype

    device = pick_device(s["device"])
    dtype = str(pick_dtype(s["dtype"], device)).removeprefix("torch.")
    if device == "cuda":
        if not torch.cuda.is_available():
            return [Finding(FAIL, "device", "device is cuda but torch sees no CUDA GPU",
                            "install a CUDA build of torch and the NVIDIA driver, or set device: auto")]
        props = torch.cuda.get_device_properties(0)
        return [Finding(OK, "device", f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, {dtype}")]
    if device == "cpu":
        return [Finding(WARN, "device", f"cpu ({dtype}): no GPU, an SD1.5 image takes minutes",
                        "a CUDA GPU, or device: cuda once one is there")]
    return [Finding(OK, "device", f"{device} ({dtype})")]


def check_model(s: Settings) -> list[Finding]:
    from . import models
    from .errors import ModelError

    try:
        if models.check(s.model, s["model_config"], offline=models.is_offline(s["offline"])) == "builtin":
            return [Finding(OK, "model", f"{s.model}: built-in, random weights (images are noise)")]
        ref = models.resolve(s.model, s.cache, s["model_config"])
    except ModelError as err:
        return [Finding(FAIL, "model", err.message, err.hint or "")]
    if ref.kind == "folder":
        return [Finding(OK, "model", f"local folder {ref.location}")]
    if ref.kind == "checkpoint":
        size = Path(ref.location).stat().st_size
        shown = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
        return [Finding(OK, "model", f"checkpoint {ref.location} ({shown}, model hash {ref.sha256[:10]}); "
                                     f"configs from {ref.config}")]
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.location, "model_index.json")
    if isinstance(cached, str):
        return [Finding(OK, "model", f"{ref.location} is in the Hugging Face cache ({Path(cached).parents[2]})")]
    return [Finding(WARN, "model", f"{ref.location} is not cached: the first start downloads about 4 GB",
                    f"`hf download {ref.location}` ahead of time, then offline: true")]


def check_models_dir(s: Settings) -> list[Finding]:
    """The models and VAE folders: what a job may name, each unusable file with why,
    and the vae setting naming a file that is there."""
    from . import checkpoints

    out = []
    for catalog in (checkpoints.model_catalog(s.models_dir, s.model), checkpoints.vae_catalog(s.vae_dir)):
        topic = "models" if catalog.what == "model" else "vae"
        if not catalog.folder.is_dir():
            out.append(Finding(OK, topic, f"{catalog.folder} does not exist: jobs use "
                                          + ("the configured model only" if topic == "models" else "their models' VAEs")))
            continue
        entries = catalog.entries()
        usable = [e.name for e in entries if not e.problem]
        shown = ", ".join(usable[:10]) + (", ..." if len(usable) > 10 else "")
        out.append(Finding(OK, topic, f"{catalog.folder}: {len(usable)} usable" + (f" ({shown})" if usable else "")))
        out += [Finding(WARN, topic, f"{e.file} {e.problem}", "jobs naming it fail; replace or remove it")
                for e in entries if e.problem]
    if s["vae"] not in checkpoints.VAE_CHOICES:
        found = checkpoints.vae_catalog(s.vae_dir).find(s["vae"])
        if found is None or found.problem:
            why = "is not in vae_dir" if found is None else f"is unusable: {found.problem}"
            out.append(Finding(FAIL, "vae", f"vae: {s['vae']} {why}; every job without its own vae: would fail",
                               f"put {s['vae']}.safetensors in {s.vae_dir}, or set vae: Automatic"))
    return out


def check_queue(s: Settings) -> list[Finding]:
    """With a Redis queue: the server answers, is 7.0 or later, persists (AOF) and never evicts."""
    if s["queue"] == "files":
        return []
    from . import redisqueue as rq

    where = rq.redacted(s["queue"])
    try:
        info = rq.connect(s["queue"]).info()
    except Exception as err:  # noqa: BLE001 - any failure to talk is the finding
        return [Finding(FAIL, "queue", f"{where}: {rq.unavailable(err) or err}",
                        "start redis-server, or fix the URL, host, port or password in queue:")]
    version = str(info.get("redis_version", "0"))
    major, minor = (int(part) for part in (version.split(".") + ["0"])[:2])
    out = [Finding(OK if (major, minor) >= (7, 0) else FAIL, "queue", f"{where}: Redis {version}",
                   "" if (major, minor) >= (7, 0) else "Redis 7.0 or later (Debian 12's redis-server)")]
    if not info.get("aof_enabled"):
        out.append(Finding(WARN, "queue", "appendonly is off: a restart of Redis may lose queued jobs",
                           "appendonly yes, appendfsync everysec in redis.conf"))
    policy = info.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        out.append(Finding(FAIL, "queue", f"maxmemory-policy is {policy}: Redis may evict jobs",
                           "maxmemory-policy noeviction in redis.conf"))
    return out


def check_embeddings(s: Settings) -> list[Finding]:
    """The embeddings folder, loaded as the daemon loads it (weights-only), so a file
    it would skip is named here with the reason."""
    from . import embeddings
    from .inventory import text_width

    folder = s.embeddings_dir
    if not folder.is_dir():
        return [Finding(OK, "embeddings", f"{folder} does not exist: no textual-inversion embeddings")]
    catalog = embeddings.load(folder, s.cache, text_width(s))
    names = list(catalog.usable())
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    out = [Finding(OK, "embeddings", f"{folder}: {len(names)} usable" + (f" ({shown})" if names else ""))]
    for entry in catalog.files:
        if not entry.usable:
            out.append(Finding(WARN, "embeddings", f"{entry.path} {entry.problem}",
                               "the daemon skips this file; replace or remove it"))
    return out


CHECKS: tuple[Callable[[Settings], list[Finding]], ...] = (
    check_config, check_folders, check_queue, check_loras, check_inotify, check_libraries, check_device,
    check_model, check_models_dir,
    check_embeddings,
)


def diagnose(settings: Settings) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        found = check(settings)
        findings += found
        if check is check_libraries and any(f.level == FAIL for f in found):
            break  # the rest needs them
    return findings
