"""Publishing results: PNGs first, ``<id>.json`` last, each atomically and durably.

Every file is written to a hidden temp file in the destination folder, flushed
with fsync, renamed into place, and the folder is fsynced. A consumer that waits
for ``<id>.json`` therefore never sees a partial PNG, and a crash never leaves a
half-written file under a final name. A failed write or fsync fails the job; it
is never retried as if it had worked (a failed fsync may have dropped the data).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SbrenderError, SpoolError
from .peers import owner_name
from .prompts import extract_networks

if TYPE_CHECKING:
    from PIL import Image

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
TEMP_SEP = "~"  # never in a job id, so the owner can be read back from a temp name
_OWNER = owner_name()


def temp_name(name: str) -> str:
    """``.<name>~<owner>~<random>.tmp``: hidden, and says which daemon wrote it."""
    return f"{TEMP_PREFIX}{name}{TEMP_SEP}{_OWNER}{TEMP_SEP}{secrets.token_hex(4)}{TEMP_SUFFIX}"


def temp_owner(name: str) -> str | None:
    """The owner of one of our temp files, or None when ``name`` is not one."""
    if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[len(TEMP_PREFIX): -len(TEMP_SUFFIX)].split(TEMP_SEP)
    return parts[1] if len(parts) == 3 else None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with ``FileExistsError`` instead of replacing ``dst``.

    Linux's renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it;
    elsewhere a check then a rename, which a concurrent writer can still race.
    """
    libc = _libc()
    if libc is not None:
        if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return libc
    except (OSError, AttributeError):
        return None


def write_synced(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Create ``path`` (it must not exist), write ``data`` and (``durable``) fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(folder: Path, name: str, data: bytes, *, sync_dir: bool = True, durable: bool = True) -> Path:
    """Write ``data`` to ``folder/name`` so that the name only ever shows the whole file.

    ``name`` must be a plain file name (it comes from a validated job id).
    ``durable=False`` skips the fsyncs, for files that only describe the present
    (the status file), written at every denoising step.
    """
    if os.sep in name or name.startswith(".") or "\x00" in name:
        raise SpoolError(f"refusing to write unsafe file name {name!r}")
    final = folder / name
    temp = folder / temp_name(name)
    try:
        write_synced(temp, data, durable=durable)
        # os.replace renames over a planted symlink rather than writing through it.
        os.replace(temp, final)
        if sync_dir and durable:
            fsync_dir(folder)
    except OSError as err:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise SpoolError(f"cannot write {final}: {err.strerror or err}",
                         hint="check free space and permissions of the folder") from None
    return final


def flush(folder: Path, paths: list[Path]) -> None:
    """Make written files durable: for several, one ``syncfs`` of the folder's
    filesystem first (Linux), which writes them all back in one go; then an
    ``fsync`` of each, which reports that file's write errors. Raises ``OSError``."""
    libc = _libc()
    if len(paths) > 1 and libc is not None and hasattr(libc, "syncfs"):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(folder))
        finally:
            os.close(fd)
        # Then an fsync each, now nearly free: a write-back error is reported to
        # one syncfs caller only, maybe a peer's; each file's own fsync reports it.
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Publication:
    """What one job publishes: its images (maybe none), then its result JSON."""

    json_name: str
    files: list[tuple[str, bytes]]
    finish: Callable[[float], dict[str, Any]]  # the result, given the seconds the writes took
    fail: Callable[[SbrenderError], dict[str, Any]]  # the result when the images could not be written


def commit(folder: Path, pubs: list[Publication]) -> list[dict[str, Any] | None]:
    """Publish several jobs with one flush per phase (a group commit): all images
    written, flushed, renamed into place; then all result JSONs written, flushed,
    renamed, and the folder synced. A JSON never names an image that is not
    durably there. Per job: the result published, or None when it could not be
    (the job's file then stays claimed and is rendered again at the next start).
    A job whose images cannot be written gets a failed result instead."""
    start = time.perf_counter()
    temps: list[list[tuple[Path, Path]]] = [[] for _ in pubs]
    errors: dict[int, SbrenderError] = {}
    # A phase of one file is fsynced through the fd it was written with: no reopening
    # (each system call hands the GIL to the render thread and back).
    alone = sum(len(pub.files) for pub in pubs) == 1
    for i, pub in enumerate(pubs):
        try:
            for name, data in pub.files:
                _check_name(name)
                temps[i].append((folder / temp_name(name), folder / name))
                write_synced(temps[i][-1][0], data, durable=alone)
        except (OSError, SpoolError) as err:
            errors[i] = err if isinstance(err, SpoolError) else _write_error(folder / pub.files[0][0], err)
    written = [temp for i, pairs in enumerate(temps) if i not in errors for temp, _ in pairs]
    try:
        if written and not alone:
            flush(folder, written)
    except OSError as err:
        for i, pub in enumerate(pubs):
            if pub.files and i not in errors:
                errors[i] = _write_error(folder, err)
    for i, pairs in enumerate(temps):
        try:
            if i not in errors:
                for temp, final in pairs:
                    os.replace(temp, final)  # over a planted symlink, never through it
        except OSError as err:
            errors[i] = _write_error(final, err)
    for i in errors:  # the rest were renamed into place
        for temp, _ in temps[i]:
            _unlink(temp)
    seconds = time.perf_counter() - start
    results = [pub.fail(errors[i]) if i in errors else pub.finish(seconds) for i, pub in enumerate(pubs)]
    out: list[dict[str, Any] | None] = [None] * len(pubs)
    staged: list[tuple[int, Path, Path]] = []
    for i, (pub, result) in enumerate(zip(pubs, results)):
        text = json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        temp = folder / temp_name(pub.json_name)
        try:
            _check_name(pub.json_name)
            write_synced(temp, text.encode("utf-8"), durable=len(pubs) == 1)
            staged.append((i, temp, folder / pub.json_name))
        except (OSError, SpoolError):
            _unlink(temp)
    renamed: set[Path] = set()
    try:
        if staged:
            if len(pubs) > 1:
                flush(folder, [temp for _, temp, _ in staged])
            for i, temp, final in staged:
                try:
                    os.replace(temp, final)
                    renamed.add(temp)
                    out[i] = results[i]
                except OSError:
                    pass  # this job's result stays unpublished (None)
            fsync_dir(folder)
    except OSError:
        # Not surely durable: unpublished here, published again after a restart
        # (a result already in place with this claim is not redone).
        return [None] * len(pubs)
    finally:
        for _, temp, _ in staged:
            if temp not in renamed:
                _unlink(temp)
    return out


def _check_name(name: str) -> None:
    if os.sep in name or name.startswith(".") or "\x00" in name:
        raise SpoolError(f"refusing to write unsafe file name {name!r}")


def _write_error(path: Path, err: OSError) -> SpoolError:
    return SpoolError(f"cannot write {path}: {err.strerror or err}",
                      hint="check free space and permissions of the folder")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(folder: Path, name: str, data: dict[str, Any], *, durable: bool = True) -> Path:
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(folder, name, text.encode("utf-8"), durable=durable)


def read_json(path: Path) -> dict[str, Any] | None:
    """A result or status JSON, or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- PNGs ---------------------------------------------------------------------

def _hashes(records: list[dict[str, Any]]) -> str | None:
    """A1111's ``name: hash, ...`` for LoRAs or embeddings; names lose ``:`` and ``,``."""
    pairs = [f"{str(r['name']).replace(':', '').replace(',', '')}: {r['hash']}" for r in records if r.get("hash")]
    return ", ".join(pairs) or None


def _weight(value: float) -> str:
    """A weight as a tag writes it: 1, 0.8, 0.1234567 (every digit kept, so a render from
    the PNG's text uses the same weight)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _with_field_loras(prompt: str, loras: list[dict[str, Any]]) -> str:
    """The prompt with a ``<lora:name:w>`` tag for each LoRA of the job's ``loras``
    field, so A1111 (PNG Info -> txt2img) and civitai see every LoRA the image used."""
    tagged = {n.name for n in extract_networks(prompt)[1] if n.kind == "lora"}
    tags = []
    for lora in loras:
        if lora["name"] in tagged:
            continue
        te, unet = float(lora.get("te", 1.0)), float(lora.get("unet", lora.get("te", 1.0)))
        te_text, unet_text = _weight(te), _weight(unet)
        tags.append(f"<lora:{lora['name']}:{te_text}>" if te == unet else f"<lora:{lora['name']}:{te_text}:{unet_text}>")
    return " ".join([prompt, *tags]) if tags else prompt


def infotext(params: dict[str, Any], seed: int, model: str, model_hash: str = "",
             resources: dict[str, Any] | None = None) -> str:
    """AUTOMATIC1111's ``parameters`` text, which PNG Info, civitai and image
    browsers read: prompt, ``Negative prompt: ...``, then ``Key: value`` pairs in
    A1111's field order. ``model_hash``: A1111's "Model hash" (a checkpoint
    file's sha256, 10 hex digits), left out when empty. ``resources``: the
    result's ``prompt`` record, whose ``loras`` and ``embeddings`` become
    ``Lora hashes`` and ``TI hashes`` (in that order, as A1111 adds them), and
    the VAE file the job used (``vae``: name, hash), which A1111 writes as
    ``VAE hash`` and ``VAE`` after the model."""

    def value(v: Any) -> str:
        text = str(v)
        # A1111's quote(): JSON with non-ASCII kept as is.
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    cfg = params["guidance_scale"]
    resources = resources or {}
    fields = [
        ("Steps", params["steps"]),
        ("Sampler", params["sampler"]),
        ("Schedule type", params.get("scheduler")),
        ("CFG scale", int(cfg) if float(cfg).is_integer() else cfg),
        ("Seed", seed),
        ("Size", f"{params['width']}x{params['height']}"),
        ("Model hash", model_hash or None),
        ("Model", model),
        ("VAE hash", (resources.get("vae") or {}).get("hash")),
        ("VAE", (resources.get("vae") or {}).get("name")),
        # img2img only (A1111: between the VAE and Clip skip), the job's value as given.
        ("Denoising strength", params.get("denoising_strength")),
        ("Clip skip", params["clip_skip"] if params.get("clip_skip", 1) > 1 else None),
        ("Lora hashes", _hashes(resources.get("loras", []))),
        ("TI hashes", _hashes(resources.get("embeddings", []))),
    ]
    lines = [_with_field_loras(params["prompt"], resources.get("loras", []))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def encode_png(image: Image.Image, text: dict[str, str]) -> bytes:
    from PIL import PngImagePlugin  # here, not at the top: the CLI and client never encode

    info = PngImagePlugin.PngInfo()
    for key, val in text.items():
        info.add_itxt(key, val) if not val.isascii() else info.add_text(key, val)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def image_names(job_id: str, count: int) -> list[str]:
    """``<id>.png`` for one image, ``<id>-1.png`` ... ``<id>-N.png`` for several."""
    if count == 1:
        return [f"{job_id}.png"]
    return [f"{job_id}-{k}.png" for k in range(1, count + 1)]


@dataclass(frozen=True)
class PublishedImage:
    file: str
    seed: int
    width: int
    height: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "seed": self.seed, "width": self.width, "height": self.height,
                "sha256": self.sha256}

