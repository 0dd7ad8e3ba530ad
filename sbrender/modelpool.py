"""Warm models: several pipelines on the device at once, the parts they share loaded once.

A job names its model; the pool holds the ones loaded, at most
``models.keep_loaded`` of them (and, when set, within ``models.max_memory_mb``
of weights), and the least recently used one leaves first. A part of a model
(its text encoder, its VAE) whose weights are those of a part already warm
is not loaded again: the new pipeline is built around the warm module. Parts
are told apart by the digest of their loaded weights (``module_digest``), so
two checkpoints merged from one base share its VAE and text encoder whatever
their file names or layouts. A digest is kept in the cache by file: the first
load of a model loads every part and then drops the ones a warm model already
holds; later loads do not load them at all. VAE files (a job's ``vae:``) are
kept here too, by digest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models

SHARED_PARTS = ("text_encoder", "vae")  # the UNet is what tells models apart: never shared
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class WarmModel:
    """One loaded pipeline and what belongs to it alone."""

    name: str  # as the model catalog knows it; "" for the configured model
    ref: models.ModelRef
    pipe: Any
    text_encoder: Any  # float32, for the conditioning: the pipeline's own where that is float32
    adapters: Any  # adapters.Adapters over this UNet and text encoder
    parts: dict[str, str]  # shared part -> the digest of its weights
    own_vae: Any  # the checkpoint's VAE (a job's vae: may put another in the pipeline)
    perf: dict[str, Any]
    load_s: float
    stamp: tuple[Any, ...] = ()  # the file as loaded: a file replaced since is loaded again
    shared: tuple[str, ...] = ()  # the parts taken from models already warm
    schedulers: dict[tuple[str, str], Any] = field(default_factory=dict)
    base_scheduler_config: Any = None
    img2img: Any = None  # the img2img pipeline over the same modules, built when first asked
    vae_config_key: str | None = None  # its VAE's config, digested: VAE files are loaded per config
    embeddings: Any = None  # embeddings.Catalog, on this text encoder's device
    embedding_names: Any = None
    embeddings_stamp: tuple[Any, ...] = ()

    def modules(self) -> Iterator[Any]:
        yield from (self.pipe.unet, self.own_vae, self.text_encoder, self.pipe.text_encoder)


class Pool:
    """The warm models, least recently used first, and the VAE files loaded."""

    def __init__(self, keep: int, max_bytes: int) -> None:
        self.keep = keep
        self.max_bytes = max_bytes  # 0: no limit
        self.warm: OrderedDict[str, WarmModel] = OrderedDict()
        self.vaes: OrderedDict[str, Any] = OrderedDict()  # VAE file digest + config -> module

    def get(self, name: str) -> WarmModel | None:
        model = self.warm.get(name)
        if model is not None:
            self.warm.move_to_end(name)
        return model

    def shared(self, part: str, key: str) -> WarmModel | None:
        """A warm model whose ``part`` has these weights."""
        return next((m for m in self.warm.values() if m.parts.get(part) == key), None)

    def make_room(self) -> list[str]:
        """When a load ran out of device memory: models leave until one more fits
        ``keep``; their names."""
        gone = []
        while self.warm and len(self.warm) >= self.keep:
            gone.append(self._drop(next(iter(self.warm))))
        return gone

    def add(self, model: WarmModel) -> list[str]:
        """A model just loaded, as the most recently used; then the least recently
        used others leave while there are more than ``keep`` or their weights exceed
        ``max_bytes``. Their names. (A model leaves only once its successor has
        loaded: a file that fails to load costs no warm model.)"""
        self.warm[model.name] = model
        gone = []
        while len(self.warm) > 1 and (len(self.warm) > self.keep or
                                      (self.max_bytes and self.weight_bytes() > self.max_bytes)):
            gone.append(self._drop(next(iter(self.warm))))
        return gone

    def drop(self, name: str) -> str:
        return self._drop(name)

    def _drop(self, name: str) -> str:
        model = self.warm.pop(name)
        model.adapters.use([])  # a part it shares with a model that stays carries none of its LoRAs
        return name

    def vae(self, key: str) -> Any | None:
        module = self.vaes.get(key)
        if module is not None:
            self.vaes.move_to_end(key)
        return module

    def add_vae(self, key: str, module: Any) -> None:
        self.vaes[key] = module
        while len(self.vaes) > self.keep:
            self.vaes.popitem(last=False)

    def weight_bytes(self) -> int:
        """The bytes of every warm weight, each tensor counted once however many models hold it."""
        seen: set[int] = set()
        total = 0
        modules = [m for model in self.warm.values() for m in model.modules()] + list(self.vaes.values())
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                ptr = tensor.data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += tensor.element_size() * tensor.nelement()
        return total


# --- which weights a part holds -------------------------------------------------------

def module_digest(module: Any) -> str:
    """The sha256 of a loaded module's state (names, dtypes, shapes, bytes): equal
    digests, equal weights, whatever file layout they came from (a diffusers folder,
    a single-file checkpoint)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digest_file(ref: models.ModelRef, part: str) -> Path | None:
    """The file a part's digest is kept by (the cache is keyed by a file's path,
    size and time): the checkpoint, or the part's largest weight file in a folder."""
    if ref.kind == "checkpoint":
        return Path(ref.location)
    root = _folder(ref)
    folder = root / part if root is not None else None
    if folder is None or not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    return max(files, key=lambda p: p.stat().st_size).resolve() if files else None


def part_digest(ref: models.ModelRef, part: str, dtype: Any, cache: Path, module: Any = None) -> str:
    """The part's weights digest in ``dtype``: kept in the cache by its file, so a
    model's second load finds its donors before loading. Without ``module`` only
    what is kept ("" when nothing is); with it, computed and kept when missing."""
    kind = f"module:{part}:{str(dtype).removeprefix('torch.')}"
    path = digest_file(ref, part)
    if path is None:
        return module_digest(module) if module is not None else ""
    try:
        return models.cached_digest(path, cache, kind, (lambda p: module_digest(module)) if module is not None else None)
    except OSError:
        return module_digest(module) if module is not None else ""


def _folder(ref: models.ModelRef) -> Path | None:
    if ref.kind != "hub":
        return Path(ref.location)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    index = try_to_load_from_cache(ref.location, "model_index.json")
    return Path(index).parent if isinstance(index, str) else None
