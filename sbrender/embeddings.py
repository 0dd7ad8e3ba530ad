"""Textual-inversion embeddings, found and read as AUTOMATIC1111 1.10 does.

Every ``.safetensors``, ``.pt`` and ``.bin`` file under ``embeddings_dir``
(subfolders too; empty files skipped) is an embedding named by its file stem; a
prompt uses it by that name (``sbrender.conditioning`` matches names by token
ids). A file holds n vectors of the text encoder's width:

- ``.safetensors``: exactly one tensor, under any key (civitai's ``emb_params``);
- ``.pt``/``.bin``: A1111's ``{"string_to_param": {"*": (n, C)}}`` or a one-tensor
  mapping (diffusers' ``learned_embeds.bin``), read ONLY with torch's weights-only
  loader: a file that needs full unpickling is refused, since loading it would
  run whatever code it holds.

Vectors of another width (an SD2 or SDXL embedding) are skipped, as A1111
skips them, and listed with the reason. The hash is A1111's: the sha256 of the
file, of which ``TI hashes`` shows 12 hex digits.

``scan`` is torch-free (names, hashes, a safetensors header's shape), for
``sbrender models`` and ``doctor``; ``load`` reads the tensors and needs torch;
``stamp`` says cheaply whether the folder changed since (A1111 re-reads the
folder before a generation when it changed).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ModelError, first_line
from .models import file_sha256

SUFFIXES = (".safetensors", ".pt", ".bin")
PICKLED = (".pt", ".bin")
# A1111 puts an embedding's vectors in one 75-token chunk; more cannot fit (A1111 fails on them).
MAX_VECTORS = 75
HASH_CHARS = 12  # A1111's TI hash: the file's sha256, shortened
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
CONVERT = "convert it where you trust it, with safetensors.torch.save_file"


class _Unusable(Exception):
    """Why a file cannot be used as an embedding; internal to this module."""


@dataclass(frozen=True)
class EmbeddingFile:
    """One file of the folder: its name, hash, shape (None where not known without
    torch: a pickled file before it is loaded) and, when unusable, why."""

    name: str
    path: str
    sha256: str = ""
    vectors: int | None = None
    width: int | None = None
    problem: str = ""

    @property
    def hash(self) -> str:
        return self.sha256[:HASH_CHARS]

    @property
    def usable(self) -> bool:
        return not self.problem

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "file": self.path, "vectors": self.vectors, "width": self.width,
                               "hash": self.hash, "sha256": self.sha256}
        if self.problem:
            out["problem"] = self.problem
        return out


def _walk(folder: Path) -> list[Path]:
    """The candidate files, in A1111's order: top-down, a folder's own files before
    its subfolders' (sorted, so the order does not depend on the filesystem)."""
    out: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        # Links are followed, as A1111 does; a link back up the tree is walked once.
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() in SUFFIXES:
                out.append(path)
    return out


def stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when an embedding file is added, removed, renamed or rewritten
    under ``folder``: each candidate file's path, size and modification time."""
    out = []
    for path in _walk(folder) if folder.is_dir() else []:
        try:
            info = path.stat()
        except OSError:
            continue
        out.append((str(path), info.st_size, info.st_mtime_ns))
    return tuple(out)


def _safetensors_shape(path: Path) -> list[int]:
    """The shape of a safetensors file's one tensor, from its header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if not 2 <= length <= size - 8:
                raise _Unusable("is not a safetensors file (no valid header)")
            header = json.loads(f.read(length))
    except OSError as err:
        raise _Unusable(f"cannot be read: {err.strerror or err}") from None
    except ValueError:
        raise _Unusable("is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise _Unusable("is not a safetensors file (bad header)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        names = ", ".join(sorted(tensors)[:4])
        sdxl = " (an SDXL embedding)" if {"clip_g", "clip_l"} <= set(tensors) else ""
        raise _Unusable(f"holds {len(tensors)} tensors ({names}){sdxl}; an embedding file holds exactly one")
    (info,) = tensors.values()
    try:
        shape, dtype, end = list(info["shape"]), info["dtype"], int(info["data_offsets"][1])
    except (TypeError, KeyError, IndexError, ValueError):
        raise _Unusable("is not a safetensors file (bad tensor table)") from None
    if size != 8 + length + end:
        raise _Unusable(f"is incomplete or damaged: {size} bytes where its header says {8 + length + end}")
    if dtype not in _FLOAT_DTYPES:
        raise _Unusable(f"holds a tensor of {dtype}, not floating point")
    return shape


def _shape(shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(vectors, width) of a tensor shape, as A1111 reads it: (n, C), or (C,) for one vector."""
    if len(shape) == 1:
        shape = [1, *shape]
    if len(shape) != 2:
        raise _Unusable(f"holds a tensor of shape {tuple(shape)}, not (vectors, width)")
    return int(shape[0]), int(shape[1])


def _problem(vectors: int, width: int, wanted: int | None) -> str:
    """Why (vectors, width) cannot be used with a text encoder of hidden size ``wanted``, or ""."""
    if vectors < 1:
        return "holds no vectors"
    if vectors > MAX_VECTORS:
        return f"holds {vectors} vectors; at most {MAX_VECTORS} fit in a 75-token chunk"
    if wanted is not None and width != wanted:
        return (f"holds vectors of width {width}, and this model's text encoder takes {wanted} "
                "(an embedding for another model family: SD1 takes 768, SD2 1024)")
    return ""


def _describe(path: Path, cache: Path, width: int | None) -> EmbeddingFile:
    entry = EmbeddingFile(path.stem, str(path))
    try:
        entry = replace(entry, sha256=file_sha256(path, cache))
    except (ModelError, OSError) as err:
        return replace(entry, problem=f"cannot be read: {getattr(err, 'message', err)}")
    if path.suffix.lower() not in PICKLED:
        try:
            n, c = _shape(_safetensors_shape(path))
        except _Unusable as why:
            return replace(entry, problem=str(why))
        entry = replace(entry, vectors=n, width=c, problem=_problem(n, c, width))
    return entry


def scan(folder: Path, cache: Path, width: int | None = None) -> list[EmbeddingFile]:
    """Every embedding file under ``folder`` (none when it does not exist), torch-free.
    Hashes are cached in ``cache`` (``models.file_sha256``). With ``width`` (the
    text encoder's hidden size), vectors of another width are unusable. Of two
    files of one name, the later in A1111's order is used and the earlier marked."""
    return _mark_shadowed(_scan(folder, cache, width))


def _scan(folder: Path, cache: Path, width: int | None) -> list[EmbeddingFile]:
    if not folder.is_dir():
        return []
    files: list[EmbeddingFile] = []
    for path in _walk(folder):
        try:
            if path.stat().st_size == 0:
                continue  # A1111 skips empty files
        except OSError:
            continue
        files.append(_describe(path, cache, width))
    return files


def _mark_shadowed(files: list[EmbeddingFile]) -> list[EmbeddingFile]:
    """A1111 registers files in walk order and a name's last file wins."""
    winner: dict[str, int] = {}
    for k, f in enumerate(files):
        if f.usable:
            winner[f.name] = k
    return [f if not f.usable or winner[f.name] == k else
            replace(f, problem=f"has the same name as {files[winner[f.name]].path}, which is used")
            for k, f in enumerate(files)]


# --- loading (torch) ------------------------------------------------------------

def _read_tensor(path: Path) -> Any:
    """The one tensor of an embedding file, loaded on the CPU without running any code."""
    import torch

    if path.suffix.lower() not in PICKLED:
        from safetensors.torch import load_file

        (tensor,) = load_file(str(path), device="cpu").values()
        return tensor
    try:
        # Old LDM/A1111 files keep string_to_param in an nn.ParameterDict: a torch class
        # whose unpickling sets attributes and runs no code, so it joins the allowlist.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the boundary: torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(err)
        if "weights only" in text.lower() or "weights_only" in text.lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            if found:
                raise _Unusable(f"needs full unpickling (it names {found.group(1)}, which is no tensor); loading it "
                               f"could run code it holds, so sbrender does not: {CONVERT}") from None
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            raise _Unusable(f"cannot be read weights-only ({detail.group(1).strip() if detail else first_line(err)}): "
                           "a damaged file, or one that needs full unpickling, which could run code it holds; "
                           f"sbrender does not do that: {CONVERT}") from None
        raise _Unusable(f"cannot be loaded by torch: {type(err).__name__}: {first_line(err)}") from None
    return _tensor_of(data)


def _tensor_of(data: Any) -> Any:
    """A1111's two layouts: ``string_to_param`` with one entry, or a one-tensor mapping."""
    import torch

    if isinstance(data, Mapping) and "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])  # a ParameterDict's
        if not isinstance(params, Mapping) or len(params) != 1:
            terms = len(params) if isinstance(params, Mapping) else "no"
            raise _Unusable(f"has {terms} terms in string_to_param; an embedding file holds one")
        (tensor,) = params.values()
    elif isinstance(data, Mapping) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        (tensor,) = data.values()
    else:
        raise _Unusable("is neither an A1111 embedding (string_to_param) nor a one-tensor file")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise _Unusable("holds no floating-point tensor")
    return tensor


@dataclass(frozen=True)
class Catalog:
    """The embeddings folder as loaded: every file (with why it is unusable)
    and, for the usable ones, their (n, width) float32 vectors by name."""

    files: tuple[EmbeddingFile, ...] = ()
    vectors: Mapping[str, Any] = field(default_factory=dict)

    def usable(self) -> dict[str, EmbeddingFile]:
        return {f.name: f for f in self.files if f.usable}

    def record(self, name: str, where: str) -> dict[str, Any]:
        """What a result says of an embedding a job used ``where`` ("prompt" or "negative_prompt")."""
        entry = self.usable()[name]
        return {"name": name, "vectors": entry.vectors, "hash": entry.hash, "in": where}

    def counts(self) -> dict[str, int]:
        """Vectors per usable name: what the conditioning matches prompts against."""
        return {name: int(vec.shape[0]) for name, vec in self.vectors.items()}


def load(folder: Path, cache: Path, width: int | None) -> Catalog:
    """The folder's embeddings for a text encoder of hidden size ``width`` (None:
    any). An unusable file is listed with its reason, never raised: the daemon starts."""
    import torch

    files: list[EmbeddingFile] = []
    vectors: dict[str, Any] = {}  # in A1111's order, so a name's last loadable file wins
    for entry in _scan(folder, cache, width):
        if entry.usable:
            try:
                tensor = _read_tensor(Path(entry.path))
                n, c = _shape(tuple(tensor.shape))
            except _Unusable as why:
                entry = replace(entry, problem=str(why))
            except Exception as err:  # a damaged file must not stop the daemon
                entry = replace(entry, problem=f"cannot be loaded: {type(err).__name__}: {first_line(err)}")
            else:
                entry = replace(entry, vectors=n, width=c, problem=_problem(n, c, width))
                if entry.usable:
                    vectors[entry.name] = tensor.detach().reshape(n, c).to(torch.float32)
        files.append(entry)
    return Catalog(tuple(_mark_shadowed(files)), vectors)
