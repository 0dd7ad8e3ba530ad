"""Warm models: several pipelines on the device at once, the parts they share loaded once.

A job names its model; the pool holds the ones loaded, at most
``models.keep_loaded`` of them (and, when set, within ``models.max_memory_mb``
of weights), and the least recently used one leaves first. A part of a model
(its text encoder, its VAE) whose weights are those of a part already warm
is not loaded again: the new pipeline is built around the warm module. Parts
are told apart by the digest of their weights (``part_keys``), so two
checkpoints merged from one base share its VAE and text encoder whatever
their file names. VAE files (a job's ``vae:``) are kept here too, by digest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models, stfile

SHARED_PARTS = ("text_encoder", "vae")  # the UNet is what tells models apart: never shared
# Where each part's weights sit in an original (LDM) single-file checkpoint.
LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class WarmModel:
    """One loaded pipeline and what belongs to it alone."""

    name: str  # as the model catalog knows it; "" for the configured model
    ref: models.ModelRef
    pipe: Any
    text_encoder: Any  # float32, for the conditioning: the pipeline's own where that is float32
    adapters: Any  # adapters.Adapters over this UNet and text encoder
    parts: dict[str, str]  # part -> the digest of its weights
    own_vae: Any  # the checkpoint's VAE (a job's vae: may put another in the pipeline)
    perf: dict[str, Any]
    load_s: float
    shared: tuple[str, ...] = ()  # the parts taken from models already warm
    schedulers: dict[tuple[str, str], Any] = field(default_factory=dict)
    base_scheduler_config: Any = None
    img2img: Any = None  # the img2img pipeline over the same modules, built when first asked
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
        """Before a load: models leave until one more fits ``keep``; their names."""
        gone = []
        while self.warm and len(self.warm) >= self.keep:
            gone.append(self._drop(next(iter(self.warm))))
        return gone

    def add(self, model: WarmModel) -> list[str]:
        """A model just loaded, as the most recently used; then the least recently
        used others leave while the weights exceed ``max_bytes``. Their names."""
        self.warm[model.name] = model
        gone = []
        while self.max_bytes and len(self.warm) > 1 and self.weight_bytes() > self.max_bytes:
            gone.append(self._drop(next(iter(self.warm))))
        return gone

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

def part_keys(ref: models.ModelRef, cache: Path) -> dict[str, str]:
    """Per part (unet, vae, text_encoder) a digest of its weights, kept in the
    cache by file: equal digests, equal weights. A checkpoint's parts are hashed
    from their tensors in the file (the UNet by the whole file's sha256); a
    diffusers folder's from its weight files. A part whose files cannot be found
    (a hub model not in the cache) gets a digest of its own."""
    if ref.kind == "checkpoint":
        path = Path(ref.location)
        keys = {"unet": f"file:{ref.sha256 or ref.location}"}
        for part in SHARED_PARTS:
            prefix = LDM_PREFIXES[part]
            keys[part] = "ldm:" + models.cached_digest(path, cache, f"part:{part}",
                                                       lambda p, prefix=prefix: stfile.tensors_digest(p, prefix))
        return keys
    root = _folder(ref)
    return {part: _folder_part(root, part, cache) or f"own:{ref.location}:{part}"
            for part in ("unet", *SHARED_PARTS)}


def _folder(ref: models.ModelRef) -> Path | None:
    if ref.kind != "hub":
        return Path(ref.location)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    index = try_to_load_from_cache(ref.location, "model_index.json")
    return Path(index).parent if isinstance(index, str) else None


def _folder_part(root: Path | None, part: str, cache: Path) -> str:
    """The digest of a diffusers part folder's weight files (names and bytes); "" where it has none."""
    folder = root / part if root is not None else None
    if folder is None or not folder.is_dir():
        return ""
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}|{models.cached_sha256(path.resolve(), cache)}|".encode())
    return "files:" + digest.hexdigest()
