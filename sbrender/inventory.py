"""`sbrender models`: what the daemon renders with, listed without loading it.

One row of ``SECTIONS`` per kind of file (the configured model, the models
folder, VAEs, textual-inversion embeddings, LoRAs); each lists its items as plain dicts. Torch-free and quick:
file headers and cached hashes only, so it runs on any host.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints, embeddings, loras, models
from .config import Settings
from .errors import ModelError


@dataclass(frozen=True)
class Section:
    """A kind of file: its title, where it comes from, its items, the columns a person sees."""

    title: str
    source: Callable[[Settings], str]
    items: Callable[[Settings], list[dict[str, Any]]]
    columns: tuple[str, ...]


def model_items(s: Settings) -> list[dict[str, Any]]:
    """The configured model: its name, kind and, for a checkpoint, A1111's model hash."""
    item: dict[str, Any] = {"name": s.model}
    try:
        item["kind"] = models.check(s.model, s["model_config"], offline=models.is_offline(s["offline"]))
        if item["kind"] == "checkpoint":
            sha256 = models.file_sha256(Path(s.model).expanduser(), s.cache)
            item.update(name=Path(s.model).stem, file=s.model, hash=sha256[:10], sha256=sha256)
    except ModelError as err:
        item["problem"] = str(err)
    return [item]


def _hashed(item: dict[str, Any], path: Path, cache: Path) -> dict[str, Any]:
    """A file's A1111 hash (sha256, 10 hex digits) and sha256, or why it cannot be read."""
    try:
        sha256 = models.file_sha256(path, cache)
    except ModelError as err:
        return {**item, "problem": err.message}
    return {**item, "hash": sha256[:10], "sha256": sha256}


def models_dir_items(s: Settings) -> list[dict[str, Any]]:
    """The checkpoints and diffusers folders a job may name with model:, A1111's hash for a file."""
    items = []
    for entry in checkpoints.model_catalog(s.models_dir, s.model).entries():
        item: dict[str, Any] = {"name": entry.name, "kind": entry.kind, "file": entry.file}
        if entry.problem:
            item["problem"] = entry.problem
        elif entry.kind == "checkpoint" and entry.path is not None:
            item = _hashed(item, entry.path, s.cache)
        items.append(item)
    return items


def vae_items(s: Settings) -> list[dict[str, Any]]:
    """The VAE files a job may name with vae:, with A1111's VAE hash."""
    items = []
    for entry in checkpoints.vae_catalog(s.vae_dir).entries():
        item: dict[str, Any] = {"name": entry.name, "file": entry.file}
        items.append({**item, "problem": entry.problem} if entry.problem or entry.path is None
                     else _hashed(item, entry.path, s.cache))
    return items


def text_width(s: Settings) -> int | None:
    """The hidden size of the configured model's text encoder, from its config file
    where one is on disk (a folder, a checkpoint's model_config, a built or cached
    model); None where that takes a download or a build."""
    try:
        kind = models.check(s.model, s["model_config"], offline=True)
    except ModelError:
        return None
    if kind == "builtin":
        builtin = models.BUILTINS[s.model]
        folder = s.cache / "models" / f"{builtin.name}-v{builtin.version}"  # as ensure_builtin names it
    else:  # a folder; a checkpoint's model_config (a folder or a cached repo id); a cached repo id
        folder = Path(s["model_config"] if kind == "checkpoint" else s.model).expanduser()
    config: Path | None = folder / "text_encoder" / "config.json"
    if kind in ("hub", "checkpoint") and not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo = s["model_config"] if kind == "checkpoint" else s.model
        cached = try_to_load_from_cache(repo, "text_encoder/config.json")
        config = Path(cached) if isinstance(cached, str) else None
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"]) if config else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedding_items(s: Settings) -> list[dict[str, Any]]:
    """The embeddings folder's files; the vectors of a pickled file are known only once loaded."""
    items = []
    for entry in embeddings.scan(s.embeddings_dir, s.cache, text_width(s)):
        item = entry.to_dict()
        if entry.usable and entry.vectors is None:
            item["note"] = "a pickled file: its vectors are read (weights-only) when the daemon loads it"
        items.append(item)
    return items


def lora_items(s: Settings) -> list[dict[str, Any]]:
    """The LoRA folder's files: name (and ss_output_name alias), A1111's hash; why one cannot be used."""
    items = []
    catalog = loras.scan(s.loras_dir)
    aliases = {f.path: alias for alias, f in catalog.aliases().items()}
    for lora in sorted(catalog.files, key=lambda f: (f.name, str(f.path))):
        item: dict[str, Any] = {"name": lora.name, "file": str(lora.path)}
        if lora.path in aliases:
            item["alias"] = aliases[lora.path]
        if lora.problem:
            item["problem"] = lora.problem
        else:
            try:
                item["hash"] = loras.short_hash(lora, s.cache)
            except OSError as err:
                item["problem"] = f"cannot be read: {err.strerror or err}"
        items.append(item)
    return items


SECTIONS: tuple[Section, ...] = (
    Section("model", lambda s: "model", model_items, ("name", "kind", "hash")),
    Section("models", lambda s: str(s.models_dir), models_dir_items, ("name", "kind", "hash")),
    Section("vae", lambda s: str(s.vae_dir), vae_items, ("name", "hash")),
    Section("embeddings", lambda s: str(s.embeddings_dir), embedding_items, ("name", "vectors", "hash")),
    Section("loras", lambda s: str(s.loras_dir), lora_items, ("name", "alias", "hash")),
)


def inventory(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per section its source (a setting or folder) and items."""
    return {section.title: {"source": section.source(settings), "items": section.items(settings)}
            for section in SECTIONS}


def table(listing: dict[str, dict[str, Any]]) -> str:
    """The listing for a person: per section a heading and aligned columns; an
    unusable item says why after its columns."""
    lines: list[str] = []
    for section in SECTIONS:
        part = listing[section.title]
        heading = section.title if part["source"] == section.title else f"{section.title} ({part['source']})"
        lines.append(heading)
        rows = [[_cell(item.get(column)) for column in section.columns] for item in part["items"]]
        if not rows:
            lines.append("  none")
            continue
        header = [column.upper() for column in section.columns]
        widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
        for row, item in zip([header, *rows], [None, *part["items"]]):
            text = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            if item is not None and item.get("problem"):
                text = f"{text}  unusable: {item['problem']}"
            elif item is not None and item.get("note"):
                text = f"{text}  ({item['note']})"
            lines.append(f"  {text}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
