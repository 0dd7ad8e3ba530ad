"""The models (``model:``) and VAEs (``vae:``) a job may name; torch-free.

- Models: the configured ``model`` (a job that names none, or names it, renders
  with it), and under ``models_dir`` every ``.safetensors`` checkpoint and every
  diffusers folder (one holding ``model_index.json``). A name is the path below
  the folder without the suffix, ``/``-separated (A1111's checkpoint names);
  the file name with its suffix and A1111's title ``name [hash]`` work too, so a
  pasted ``sd_model_checkpoint`` finds its file.
- VAEs: every ``.safetensors`` file under ``vae_dir`` (A1111's ``models/VAE``),
  by its stem; ``Automatic`` (a VAE named like the checkpoint, else the model's
  own) and ``None`` (the model's own), as A1111's ``sd_vae``.

A name is only ever looked up here, never used as a path. Only headers are
read (a file put in the wrong folder is named for what it is); a listing is
read when first asked and again when a name is not found.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import models, stfile
from .errors import JobError

if TYPE_CHECKING:
    from .config import Settings

SUFFIX = ".safetensors"
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
AUTOMATIC, NONE = "Automatic", "None"
VAE_CHOICES = (AUTOMATIC, NONE)
_TITLE = re.compile(r"(?P<name>.+) \[(?P<hash>[0-9a-fA-F]{8,10})\]")  # A1111's "name [hash]"


@dataclass(frozen=True)
class Entry:
    """A model or VAE a name stands for; ``problem`` says why it cannot be used."""

    name: str
    path: Path | None  # None: the configured default model (its setting says where)
    kind: str  # "default" | "checkpoint" | "folder" | "vae"
    problem: str = ""

    @property
    def file(self) -> str:
        return str(self.path) if self.path is not None else ""


def _walk(folder: Path, suffixes: tuple[str, ...], folders: bool) -> list[Path]:
    """Files under ``folder`` with a suffix of ``suffixes`` (hidden ones, links to
    folders and non-regular files skipped); with ``folders`` (the models folder),
    diffusers folders too (not descended into), and not the ``<name>.vae.*`` files
    that lie beside checkpoints (A1111 leaves them out too)."""
    found: list[Path] = []
    for root, dirs, names in os.walk(folder):  # links to folders are not followed: no loops
        here = Path(root)
        if folders and root != str(folder) and "model_index.json" in names:
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in suffixes:
                continue
            if folders and path.stem.lower().endswith(".vae"):
                continue
            try:
                if stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the header read
                    found.append(path)
            except OSError:
                continue  # a dangling link
    return found


def _name(folder: Path, path: Path) -> str:
    rel = path.relative_to(folder)
    return (rel.with_suffix("") if path.suffix.lower() in (SUFFIX, *PICKLES) else rel).as_posix()


def _problem(path: Path, check: Callable[[Path], str]) -> str:
    if path.suffix.lower() in PICKLES:
        return (f"is a pickle ({path.suffix}): loading it could run any code it holds; use the .safetensors "
                "download, or convert it where you trust it with safetensors.torch.save_file")
    try:
        return check(path)
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"


def _vae_problem(path: Path) -> str:
    try:
        header = stfile.read_header(path)
    except ValueError as err:
        return str(err)
    kind, words = stfile.kind(header)
    if kind == "vae":
        return ""
    return f"is {words}, not a VAE" if kind != "unknown" else "holds no VAE (no encoder.*/decoder.* weights)"


class Catalog:
    """The files under one folder a job may name (``what``: "model" or "VAE"),
    plus fixed entries (the default model; Automatic and None)."""

    def __init__(self, what: str, folder: Path, setting: str, fixed: dict[str, Entry],
                 check: Callable[[Path], str], folders: bool, cache: Path | None = None) -> None:
        self.what, self.folder, self.setting = what, folder, setting
        self.fixed = fixed
        self._check, self._folders = check, folders
        self.cache = cache  # where file hashes are kept; None: a title's hash is not checked
        self._listing: dict[str, Path] | None = None
        self._stamp: int | None = None
        self._checked: dict[tuple[object, ...], str] = {}

    def _paths(self) -> dict[str, Path]:
        try:  # a file added to or removed from the folder itself: listed again (one stat)
            stamp: int | None = self.folder.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._listing, self._stamp = None, stamp
        if self._listing is None:
            paths = _walk(self.folder, (SUFFIX, *PICKLES), self._folders) if self.folder.is_dir() else []
            self._listing = {}
            for path in paths:
                self._listing.setdefault(_name(self.folder, path), path)  # a.safetensors before a.ckpt
        return self._listing

    def refresh(self) -> None:
        self._listing = None

    def entry(self, name: str, path: Path) -> Entry:
        """A file as it is now: checked again when its size or time changed."""
        if path.is_dir():
            return Entry(name, path, "folder")
        key = models.file_stamp(path)
        if key not in self._checked:
            self._checked[key] = _problem(path, self._check)
        return Entry(name, path, "vae" if self.what == "VAE" else "checkpoint", self._checked[key])

    def entries(self) -> list[Entry]:
        """Every file, checked."""
        return [self.entry(name, path) for name, path in sorted(self._paths().items())]

    def names(self) -> list[str]:
        return [*self.fixed, *sorted(self._paths())]

    def find(self, name: str, refresh: bool = True) -> Entry | None:
        """The entry a name stands for, usable or not; None for an unknown name (with
        ``refresh``, after reading the folder again)."""
        if name in self.fixed:
            return self.fixed[name]
        title = _TITLE.fullmatch(name)
        candidates = [name, *([title["name"]] if title else [])]
        candidates += [c[: -len(SUFFIX)] for c in candidates if c.lower().endswith(SUFFIX)]
        for attempt in (1, 2):
            for candidate in candidates:
                if candidate in self.fixed:
                    return self.fixed[candidate]
                if candidate in self._paths():
                    return self.entry(candidate, self._paths()[candidate])
            if attempt == 1 and refresh:
                self.refresh()  # a file added since this catalog first looked
            elif attempt == 1:
                break
        return None

    def lookup(self, name: str, field: str) -> Entry:
        """The usable entry a name stands for; a ``JobError`` that says why not. A
        title's hash must be the file's (A1111's ``name [hash]``: a file replaced
        since the title was copied is another model)."""
        found = self.find(name)
        if found is None:
            raise self.unknown(name, field)
        if found.problem:
            raise JobError(f"{self.what} {name} cannot be used: {found.file} {found.problem}", field=field)
        title = _TITLE.fullmatch(name)
        if title and len(title["hash"]) == 10 and found.path is not None and found.kind != "folder" and self.cache:
            actual = models.file_sha256(found.path, self.cache)[:10]
            if actual != title["hash"].lower():
                raise JobError(f"{self.what} {name}: {found.file} has the hash {actual}, not {title['hash']} "
                               "(the file was replaced, or the title names another file)", field=field,
                               hint=f"use the name {found.name} or the title {found.name} [{actual}]")
        return found

    def unknown(self, name: str, field: str) -> JobError:
        known = [*self.fixed, *(e.name for e in self.entries() if not e.problem)]
        where = (f"{self.setting} {self.folder} does not exist" if not self.folder.is_dir()
                 else f"{self.folder} holds no such file")
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        shown = close + [k for k in known if k not in close][: max(0, 20 - len(close))]
        more = f" and {len(known) - len(shown)} more" if len(known) > len(shown) else ""
        lead = f"did you mean {' or '.join(close)}? " if close else ""
        return JobError(f"unknown {self.what} {name}: {where}", field=field,
                        hint=f"{lead}known: {', '.join(shown)}{more}")


def default_names(setting: str) -> list[str]:
    """The names a job may give the configured model by: the setting as written, and
    the name its images carry (a checkpoint's stem, a folder's or repo's last part)."""
    kind = "checkpoint" if Path(setting).suffix.lower() in (SUFFIX, *PICKLES) else "folder"
    shown = models.infotext_name({"name": setting, "source": kind, "location": setting})
    return list(dict.fromkeys([setting, shown]))


def model_catalog(models_dir: Path, default: str, config: str = "", cache: Path | None = None) -> Catalog:
    """The default model and what ``models_dir`` holds; ``config`` is the
    ``model_config`` setting (a checkpoint cannot load without one)."""
    entry = Entry(default, None, "default")

    def problem(path: Path) -> str:
        return models.checkpoint_problem(path) or ("" if config else
                                                   "needs model_config: the configs a single file lacks (see doctor)")

    return Catalog("model", models_dir, "models_dir", {name: entry for name in default_names(default)},
                   problem, folders=True, cache=cache)


def vae_catalog(vae_dir: Path, cache: Path | None = None) -> Catalog:
    """Automatic, None, and the VAE files of ``vae_dir``."""
    return Catalog("VAE", vae_dir, "vae_dir", {c: Entry(c, None, c) for c in VAE_CHOICES}, _vae_problem,
                   folders=False, cache=cache)


def models_of(settings: Settings) -> Catalog:
    return model_catalog(settings.models_dir, settings.model, settings["model_config"], settings.cache)


def vaes_of(settings: Settings) -> Catalog:
    return vae_catalog(settings.vae_dir, settings.cache)


def automatic(ref: models.ModelRef, vaes: Catalog) -> Entry | None:
    """A1111's ``Automatic``: a VAE named like the checkpoint, beside it
    (``<stem>.vae.safetensors``) or in ``vae_dir`` (``<stem>.safetensors``), usable
    or not (its ``problem`` fails the job, as A1111 fails to load it); None: the model's own. A diffusers folder's VAE is its own unless ``vae_dir`` has
    one by the folder's name."""
    location = Path(ref.location)
    if ref.kind == "checkpoint":
        near = location.with_name(f"{location.stem}.vae{SUFFIX}")
        if near.is_file():
            return vaes.entry(near.name, near)
    if ref.kind not in ("checkpoint", "folder"):
        return None
    # Asked before every render: no new listing of vae_dir for a model that has no VAE there.
    found = vaes.find(location.stem if ref.kind == "checkpoint" else location.name, refresh=False)
    return found if found is not None and found.path is not None else None
