"""LoRAs as AUTOMATIC1111 1.10 names, weighs and hashes them; torch-free.

- The catalog: every ``.safetensors`` file under ``loras_dir`` (subfolders
  included; hidden files and links to folders skipped). Its name is the file
  stem, exact and case-sensitive; the ``ss_output_name`` of its header is an
  alias too, unless two files claim it or it is another file's stem (then only
  the stems work, as in A1111). ``.pt``/``.ckpt`` LoRAs are listed but refused:
  loading a pickle runs the code it holds. Only the header (JSON) is read.
- A job asks for LoRAs with ``<lora:NAME:te[:unet]>`` tags in its prompt (or
  ``te=``/``unet=``: te defaults to 1, unet to te) and with its ``loras:``
  field; a name is only ever looked up here, never used as a path.
- The hash infotext carries (``Lora hashes``) is the header's ``sshs_model_hash``,
  else the sha256 of the bytes after the header (kohya's "addnet" hash), cut to
  12 hex digits.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import prompts, stfile
from .errors import JobError
from .models import cached_sha256, file_stamp

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".ckpt")  # what A1111 also lists as LoRAs
SHORT_HASH = 12


@dataclass(frozen=True)
class LoraFile:
    """One file of the catalog; ``problem`` says why it cannot be used."""

    name: str  # the file stem
    path: Path
    alias: str = ""  # ss_output_name
    sshs_hash: str = ""  # the header's own hash, if it has one
    problem: str = ""


@dataclass(frozen=True)
class LoraUse:
    """A LoRA a job asks for and its two weights (A1111's te and unet multipliers)."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "te": self.te, "unet": self.unet}


read_header = stfile.read_header


def _describe(path: Path) -> LoraFile:
    name = path.stem
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return LoraFile(name, path, problem=f"is a pickle ({path.suffix}): loading it could run any code it holds; "
                                            "convert it to .safetensors")
    try:
        header = read_header(path)
    except (OSError, ValueError) as err:
        why = f"cannot be read: {err.strerror or err}" if isinstance(err, OSError) else str(err)
        return LoraFile(name, path, problem=why)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    base = str(meta.get("ss_base_model_version", ""))
    if base and not base.startswith("sd_v1") and not base.startswith("sd_1"):
        return LoraFile(name, path, problem=f"was trained for another model family ({base}, from its header); "
                                            "sbrender renders SD1.x, so its layers would not fit")
    alias, sshs = meta.get("ss_output_name"), meta.get("sshs_model_hash")
    return LoraFile(name, path, alias if isinstance(alias, str) else "",
                    sshs.lower() if isinstance(sshs, str) and sshs else "")


class Catalog:
    """The LoRA files under one folder, read when first asked: the folder's listing
    at the first lookup, a file's header when its name is looked up, every header
    only for aliases. Compared and hashed by identity (``Rules`` holds one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stems: dict[str, list[Path]] | None = None
        self._described: dict[tuple[Any, ...], LoraFile] = {}
        self._aliases: dict[str, LoraFile] | None = None

    @property
    def exists(self) -> bool:
        return self.folder.is_dir()

    def _paths(self) -> dict[str, list[Path]]:
        if self._stems is None:
            self._stems = {}
            for path in _walk(self.folder):
                self._stems.setdefault(path.stem, []).append(path)
        return self._stems

    def _file(self, path: Path) -> LoraFile:
        """The file as it is now: described again when its size or modification time
        changed (a file replaced in place has another hash, alias or problem)."""
        key = file_stamp(path)
        if key not in self._described:
            self._described[key] = _describe(path)
        return self._described[key]

    @property
    def files(self) -> list[LoraFile]:
        """Every file, its header read."""
        return [self._file(p) for paths in self._paths().values() for p in paths]

    def aliases(self) -> dict[str, LoraFile]:
        """The ``ss_output_name`` aliases that work: not claimed by two files, not
        another file's stem (A1111's forbidden aliases)."""
        if self._aliases is None:
            claims: dict[str, list[LoraFile]] = {}
            for f in self.files:
                if f.alias and f.alias != f.name and not f.problem:
                    claims.setdefault(f.alias, []).append(f)
            stems = self._paths()
            self._aliases = {a: fs[0] for a, fs in claims.items() if len(fs) == 1 and a not in stems}
        return self._aliases

    def names(self) -> list[str]:
        """Every name a job may use: stems and working aliases, sorted."""
        return sorted({*self._paths(), *self.aliases()})

    def refresh(self) -> None:
        """Forget the listing: the next lookup reads the folder again."""
        self._stems, self._aliases = None, None

    def lookup(self, name: str, field: str = "loras") -> LoraFile:
        """The usable file a name stands for; a ``JobError`` that says why not. A name
        not found is looked for once more in the folder as it is now (a file added
        since a long-lived daemon or client first looked)."""
        for attempt in (1, 2):
            paths = self._paths().get(name)
            if paths is not None or name in self.aliases():
                break
            if attempt == 1:
                self.refresh()
        if paths is None:
            if name in self.aliases():
                return self.aliases()[name]
            raise unknown(name, self.names(), self.folder, self.exists, field)
        found = [self._file(p) for p in paths]
        usable = [f for f in found if not f.problem]
        if len(usable) == 1:
            return usable[0]
        if usable:
            shown = ", ".join(str(f.path.relative_to(self.folder)) for f in usable)
            raise JobError(f"LoRA {name} is ambiguous: {len(usable)} files are named so ({shown})", field=field,
                           hint=f"rename all but one of them in {self.folder}")
        bad = found[0]
        raise JobError(f"LoRA {name} cannot be used: {bad.path.relative_to(self.folder)} {bad.problem}", field=field)


def unknown(name: str, known: list[str], folder: Path, exists: bool = True, field: str = "loras") -> JobError:
    """The error for a name no file has: the known names, close matches first."""
    if not known:
        where = f"there are no LoRA files in {folder}" if exists else f"loras_dir {folder} does not exist"
        return JobError(f"unknown LoRA {name}: {where}", field=field,
                        hint="put .safetensors LoRA files there, or set loras_dir, SBRENDER_LORAS_DIR, to their folder")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    rest = [k for k in known if k not in close]
    shown = close + rest[:max(0, 20 - len(close))]
    more = f" and {len(known) - len(shown)} more" if len(known) > len(shown) else ""
    lead = f"did you mean {' or '.join(close)}? " if close else ""
    return JobError(f"unknown LoRA {name} in {folder}", field=field,
                    hint=f"{lead}known: {', '.join(shown)}{more}; names are file stems, case-sensitive")


def scan(folder: Path) -> Catalog:
    """The LoRA files under ``folder`` (read lazily); an absent folder has none."""
    return Catalog(folder)


def _walk(folder: Path) -> list[Path]:
    """The LoRA files under ``folder``: hidden ones and links to folders skipped."""
    found: list[Path] = []
    for root, dirs, names in os.walk(folder):  # links to folders are not followed: no loops
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or path.suffix.lower() not in (SUFFIX, *PICKLE_SUFFIXES):
                continue
            try:
                if stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
                    found.append(path)
            except OSError:
                continue  # a dangling link
    return found


# --- what a job asks for ------------------------------------------------------------

def _weight(value: Any, what: str, field: str) -> float:
    """A finite weight: a tag's text as A1111 reads it (``float``), a field's number."""
    if isinstance(value, str) and field == "prompt":
        try:
            value = float(value)
        except ValueError:
            raise JobError(f"{what} must be a number, not {value!r}", field=field) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "the string " if isinstance(value, str) else ""
        raise JobError(f"{what} must be a number, not {kind}{value!r}", field=field)
    if not math.isfinite(value):
        raise JobError(f"{what} must be a finite number, not {value!r}", field=field)
    return float(value)


def from_tag(net: prompts.Network) -> LoraUse:
    """A ``<lora:...>`` tag read as A1111 reads it: positional name, te, unet (dyn
    refused); ``te=`` and ``unet=`` override; unet defaults to te, te to 1."""
    positional = [a for a in net.args if "=" not in a]
    named = dict(a.split("=", 1) for a in net.args if "=" in a)
    what = f"prompt: the weight in {net.text}"
    unsupported = sorted(set(named) - {"te", "unet"}) or (["dyn"] if len(positional) > 3 else [])
    if unsupported:
        raise JobError(f"prompt: {net.text} sets {unsupported[0]}, which is not supported "
                       "(only the te and unet weights are)", field="prompt")
    if not positional or not positional[0]:
        raise JobError(f"prompt: {net.text} names no LoRA", field="prompt",
                       hint="write <lora:NAME:WEIGHT>")
    te = _weight(positional[1], what, "prompt") if len(positional) > 1 else 1.0
    te = _weight(named["te"], what, "prompt") if "te" in named else te
    unet = _weight(positional[2], what, "prompt") if len(positional) > 2 else te
    unet = _weight(named["unet"], what, "prompt") if "unet" in named else unet
    return LoraUse(positional[0], te, unet)


def from_field(value: Any) -> tuple[LoraUse, ...]:
    """The ``loras:`` field: ``{name: weight}`` or ``{name: {te: w, unet: w}}``
    (a missing te is 1, a missing unet is te, as in a tag)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise JobError("loras must be a mapping of LoRA names to weights, e.g. {add_detail: 0.8}", field="loras")
    out = []
    for name, weight in value.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise JobError(f"loras: {name!r} is not a LoRA name", field="loras")
        what = f"loras: the weight of {name}"
        if isinstance(weight, Mapping):
            extra = sorted(str(k) for k in weight if k not in ("te", "unet"))
            if extra or not weight:
                raise JobError(f"{what} must be a number or a mapping with te and/or unet"
                               + (f", not {extra[0]}" if extra else ""), field="loras")
            te = _weight(weight["te"], what, "loras") if "te" in weight else 1.0
            unet = _weight(weight["unet"], what, "loras") if "unet" in weight else te
            out.append(LoraUse(name, te, unet))
        else:
            w = _weight(weight, what, "loras")
            out.append(LoraUse(name, w, w))
    return tuple(out)


def in_prompt(prompt: str) -> tuple[LoraUse, ...]:
    """The LoRA tags of a (positive) prompt, in order."""
    _, networks = prompts.extract_networks(prompt)
    return tuple(from_tag(n) for n in networks if n.kind == "lora")


def requested(prompt: str, field: tuple[LoraUse, ...], catalog: Catalog | None = None) -> tuple[LoraUse, ...]:
    """A job's LoRA set: the prompt's tags in order, then the field's. A LoRA named
    twice is refused (which weight would win is a guess); with a catalog, every
    name must be one of its files."""
    tags = in_prompt(prompt)
    uses = (*tags, *field)
    seen: list[LoraFile | str] = []
    for k, use in enumerate(uses):
        where = "prompt" if k < len(tags) else "loras"
        key: LoraFile | str = catalog.lookup(use.name, where) if catalog is not None else use.name
        if key in seen:
            other = next((u.name for u, k in zip(uses, seen) if k == key), use.name)
            same = f" ({other} and {use.name} are one file: a name and its ss_output_name alias)" \
                if other != use.name else ""
            raise JobError(f"LoRA {use.name} is asked for twice{same}; name each LoRA once, in the prompt's tags "
                           "or in the loras field", field=where)
        seen.append(key)
    return uses


def params(field: tuple[LoraUse, ...]) -> dict[str, Any]:
    """The field as a job file writes it: a weight, or te and unet when they differ."""
    return {u.name: u.te if u.te == u.unet else {"te": u.te, "unet": u.unet} for u in field}


# --- hashes -----------------------------------------------------------------------

def short_hash(lora: LoraFile, cache: Path) -> str:
    """A1111's LoRA hash (``Lora hashes`` in the infotext): the header's
    ``sshs_model_hash``, else the addnet hash, 12 hex digits. Raises ``OSError``."""
    return (lora.sshs_hash or addnet_sha256(lora.path, cache))[:SHORT_HASH]


def addnet_sha256(path: Path, cache: Path) -> str:
    """sha256 of the bytes after the 8-byte length and the JSON header (the tensor
    data: kohya's "addnet" hash), cached like the file hashes. Raises ``OSError``."""
    def data_start(f: Any) -> int:
        head = f.read(8)
        return 8 + (struct.unpack("<Q", head)[0] if len(head) == 8 else 0)

    return cached_sha256(path, cache, "addnet_sha256", data_start)


def file_sha256(path: Path, cache: Path) -> str:
    """sha256 of the whole file, cached by path, size and mtime. Raises ``OSError``."""
    return cached_sha256(path, cache, "sha256")
