"""Where ``torch.compile`` keeps what it compiled, so a restart compiles nothing.

Inductor and Triton cache in ``/tmp/torchinductor_<user>`` by default; under the
systemd unit (``PrivateTmp=yes``) that folder is thrown away at every restart.
Here they go to ``<cache>/compile/<host key>/``, one folder per torch, Triton,
Python and device (compiled code from one does not run on another), set before
anything compiles. After the warm-up the artifacts torch recorded (FX graphs,
AOTAutograd entries, Triton kernels, autotuning results) are saved as one
bundle, ``bundle.sbcc``, that ``sbrender compile-cache export`` copies out and
``import`` brings into a fresh host of the same kind; the daemon loads a bundle
it has not applied yet before its first compile.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompileCacheError
from .outputs import fsync_dir, temp_name

if TYPE_CHECKING:
    from .config import Settings

BUNDLE = "bundle.sbcc"
APPLIED = "bundle.applied"  # the sha256 of the bundle the folder's caches already hold
FORMAT = 1
# Environment variable -> subfolder. Torch reads these when it compiles, not at
# import, so setting them before the first compile is enough.
ENV_FOLDERS: tuple[tuple[str, str], ...] = (
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),  # FX graphs, AOTAutograd, C++ kernels, PGO profiles
    ("TRITON_CACHE_DIR", "triton"),  # compiled GPU kernels (inductor's default: under the above, per device)
    ("TRITON_HOME", "triton-home"),  # Triton's other files (~/.triton: unwritable under ProtectHome)
    ("CUDA_CACHE_PATH", "cuda"),  # the driver's PTX JIT cache (~/.nv)
)
# Torch's own counters (torch._dynamo.utils.counters) that say what a start compiled.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("fxgraph_hits", "inductor", "fxgraph_cache_hit"),
    ("fxgraph_misses", "inductor", "fxgraph_cache_miss"),
    ("aot_autograd_hits", "aot_autograd", "autograd_cache_hit"),
    ("aot_autograd_misses", "aot_autograd", "autograd_cache_miss"),
    ("frames_compiled", "frames", "ok"),
)


@dataclass(frozen=True)
class Host:
    """What compiled code depends on: a bundle made under another is refused."""

    torch: str
    triton: str  # "" without Triton (CPU builds)
    python: str  # major.minor: cache entries are pickles
    device: str  # the GPU's name, or "cpu <machine>"
    capability: str  # "sm_90", or "" on a CPU

    def key(self) -> str:
        """The folder name: readable, one per host kind."""
        parts = [f"torch-{self.torch}", f"triton-{self.triton}" if self.triton else "", f"py{self.python}",
                 self.device, self.capability]
        return re.sub(r"[^a-z0-9.+_-]+", "-", "-".join(p for p in parts if p).lower()).strip("-")

    def describe(self) -> str:
        triton = f", Triton {self.triton}" if self.triton else ""
        on = f"{self.device} ({self.capability})" if self.capability else self.device
        return f"torch {self.torch}{triton}, Python {self.python}, on {on}"


def host(device: str) -> Host:
    """This host, for ``device`` ("cuda", "cpu", "mps"); imports torch."""
    import torch

    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = ""
    python = ".".join(platform.python_version_tuple()[:2])
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return Host(str(torch.__version__), triton_version, python, torch.cuda.get_device_name(0), f"sm_{major}{minor}")
    return Host(str(torch.__version__), triton_version, python, f"{device} {platform.machine()}", "")


def root(setting: str, cache: Path) -> Path | None:
    """The compile caches' parent folder: ``perf.compile_cache`` ("" = ``<cache>/compile``;
    "off" = None, torch's own defaults)."""
    if setting.strip().lower() == "off":
        return None
    return Path(setting) if setting else cache / "compile"


@dataclass(frozen=True)
class Folder:
    """One host kind's caches and bundle."""

    path: Path
    host: Host

    @property
    def bundle(self) -> Path:
        return self.path / BUNDLE

    def use(self) -> None:
        """Point torch's caches here (process-wide), creating the folders."""
        for name, sub in ENV_FOLDERS:
            (self.path / sub).mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(self.path / sub)

    def load_bundle(self) -> dict[str, Any]:
        """Apply a bundle these caches do not hold yet (an imported one) before
        anything compiles. Returns what happened, for the log."""
        if not self.bundle.exists():
            return {"bundle": "none"}
        data = self.bundle.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if _read_text(self.path / APPLIED) == digest:
            return {"bundle": "held"}  # saved from these caches, or applied at an earlier start
        header, artifacts = parse(data, str(self.bundle))
        check(header, self.host, str(self.bundle))
        import torch

        info = torch.compiler.load_cache_artifacts(artifacts)
        if info is None:
            raise CompileCacheError(f"torch could not read the artifacts of {self.bundle}",
                                    hint="delete it; the daemon compiles and saves a new one")
        _write_atomic(self.path / APPLIED, digest.encode())
        return {"bundle": "applied", "artifacts": _artifact_counts(info)}

    def save_bundle(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """Save what this process compiled or found in the caches as the bundle,
        atomically. Returns what was saved, for the log."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return {"bundle": "nothing recorded"}
        artifacts, info = saved
        header = {"format": FORMAT, "host": asdict(self.host), "created": time.time(),
                  "artifacts": _artifact_counts(info), **extra}
        if self.bundle.exists() and _artifacts_of(self.bundle) == artifacts:
            return {"bundle": "unchanged", "bundle_bytes": self.bundle.stat().st_size}
        data = pack(header, artifacts)
        _write_atomic(self.bundle, data)
        _write_atomic(self.path / APPLIED, hashlib.sha256(data).hexdigest().encode())
        return {"bundle": "saved", "bundle_bytes": len(data)}


def folder(setting: str, cache: Path, device: str) -> Folder | None:
    """This host's folder under ``perf.compile_cache``, or None when it is off."""
    parent = root(setting, cache)
    if parent is None:
        return None
    me = host(device)
    return Folder(parent / me.key(), me)


def for_settings(settings: Settings) -> Folder:
    """The folder the daemon of ``settings`` uses on this host (its device as it
    would pick it); raises ``CompileCacheError`` when ``perf.compile_cache`` is off."""
    from .pipeline import pick_device

    found = folder(settings["perf.compile_cache"], settings.cache, pick_device(settings["device"]))
    if found is None:
        raise CompileCacheError("perf.compile_cache is off: torch keeps its caches in its own folder, without a bundle",
                                hint="leave perf.compile_cache empty (<cache>/compile) or name a folder")
    return found


def pack(header: Mapping[str, Any], artifacts: bytes) -> bytes:
    """A bundle: a zip of ``header.json`` (what made it) and ``artifacts.bin`` (torch's bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("header.json", json.dumps(header, indent=1, sort_keys=True))
        z.writestr("artifacts.bin", artifacts)
    return out.getvalue()


def parse(data: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    """A bundle's header and artifacts; raises ``CompileCacheError`` for anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            header = json.loads(z.read("header.json"))
            artifacts = z.read("artifacts.bin")
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise CompileCacheError(f"{where} is not an sbrender compile-cache bundle ({err})",
                                hint="give a file written by `sbrender compile-cache export`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("host"), dict):
        raise CompileCacheError(f"{where} is a compile-cache bundle of another format "
                                f"({header.get('format') if isinstance(header, dict) else '?'}; this sbrender reads "
                                f"{FORMAT})", hint="export it again with this version of sbrender")
    return header, artifacts


def check(header: Mapping[str, Any], here: Host, where: str) -> None:
    """Refuse a bundle made under another torch, Triton, Python or device."""
    try:
        made = Host(**header["host"])
    except TypeError:
        raise CompileCacheError(f"{where}: its header does not say which host made it",
                                hint="export it again with this version of sbrender") from None
    if made != here:
        differ = [f"{name} {getattr(made, name) or 'none'} (here: {getattr(here, name) or 'none'})"
                  for name in Host.__dataclass_fields__ if getattr(made, name) != getattr(here, name)]
        raise CompileCacheError(
            f"{where} was compiled with {made.describe()}; this host has {here.describe()}: "
            f"{'; '.join(differ)} differ, and compiled code from one does not run on the other",
            hint="use a bundle exported from a host with the same torch, Triton, Python and GPU, or let the "
                 "daemon compile here (its first start takes minutes, later ones use the cache)")


def counters() -> dict[str, int]:
    """Torch's compile counters so far in this process (0 where torch has none)."""
    from torch._dynamo.utils import counters as torch_counters

    return {name: int(torch_counters[group][key]) for name, group, key in COUNTERS}


def compiled_anything(before: Mapping[str, int], after: Mapping[str, int]) -> bool:
    """True when something between the two snapshots missed the caches (a real compile)."""
    return any(after[k] > before[k] for k in ("fxgraph_misses", "aot_autograd_misses"))


def export_bundle(source: Folder, target: Path) -> dict[str, Any]:
    """Copy this host's bundle to ``target`` (atomically); returns its header."""
    if not source.bundle.exists():
        raise CompileCacheError(f"no compile-cache bundle for this host in {source.path}",
                                hint="start the daemon once with perf.compile on: it saves one after its warm-up")
    data = source.bundle.read_bytes()
    header, _ = parse(data, str(source.bundle))
    _write_atomic(target, data)
    return header


def import_bundle(source: Path, target: Folder) -> dict[str, Any]:
    """Check ``source`` against this host and make it this host's bundle (applied
    at the daemon's next start); returns its header."""
    try:
        data = source.read_bytes()
    except OSError as err:
        raise CompileCacheError(f"cannot read {source}: {err.strerror}") from None
    header, _ = parse(data, str(source))
    check(header, target.host, str(source))
    target.path.mkdir(parents=True, exist_ok=True)
    _write_atomic(target.bundle, data)
    return header


def describe(parent: Path) -> list[dict[str, Any]]:
    """Every host folder under ``parent``, with its bundle's header (no torch needed)."""
    rows = []
    for path in sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []:
        row: dict[str, Any] = {"folder": str(path), "bytes": _size(path)}
        bundle = path / BUNDLE
        if bundle.exists():
            try:
                row["bundle"] = parse(bundle.read_bytes(), str(bundle))[0]
            except CompileCacheError as err:
                row["bundle_error"] = str(err)
        rows.append(row)
    return rows


def _artifacts_of(bundle: Path) -> bytes | None:
    try:
        return parse(bundle.read_bytes(), str(bundle))[1]
    except (OSError, CompileCacheError):
        return None


def _artifact_counts(info: Any) -> dict[str, int]:
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename, fsync the folder: never half a file."""
    temp = path.parent / temp_name(path.name)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise CompileCacheError(f"cannot write {path}: {err.strerror}",
                                hint="check that the folder is writable (under systemd: CacheDirectory)") from None
    fsync_dir(path.parent)
