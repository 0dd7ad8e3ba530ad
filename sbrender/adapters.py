"""LoRA files as peft adapters on the warm pipeline: loaded once, switched per job.

A file's UNet layers go into the pipeline's UNet; its text-encoder layers into
the float32 text encoder the prompts are encoded with (``DiffusersRenderer``
hands the pipeline ``prompt_embeds``, so the pipeline's own text encoder is never
run and gets none). Nothing is fused: the base weights stay as loaded, and a
layer that no LoRA of the job touches is its own base layer again (peft's
wrapper taken out of its place), so a job without LoRAs runs the very modules
of a pipeline that never loaded one. Each adapter's scale is
weight * alpha / rank, A1111's ``W + m * (alpha/rank) * up @ down`` unmerged.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import loras
from .errors import RenderError, first_line

log = structlog.get_logger("sbrender")

# Keys of the LoRA formats diffusers converts (kohya/A1111, diffusers, peft); anything
# else (LyCORIS LoHa/LoKr, OFT, DoRA, embeddings bundled in) would be dropped or
# misread, and the image silently differ from A1111's.
_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
_KNOWN = (*_DOWN, ".lora_up.weight", ".lora_B.weight", ".lora.up.weight", ".alpha")
_PARTS = {"unet": "unet.", "text_encoder": "text_encoder."}  # diffusers' prefixes after conversion
_SERIAL = itertools.count(1)


@dataclass(frozen=True)
class Loaded:
    """A file loaded as an adapter, under ``adapter`` in the models it has layers for."""

    adapter: str
    parts: frozenset[str]  # "unet", "text_encoder"
    short_hash: str  # A1111's (Lora hashes)
    sha256: str  # of the whole file


class Adapters:
    """The loaded LoRA files (at most ``capacity`` besides the set in use, least
    recently used dropped first) and the set that is active."""

    def __init__(self, pipe: Any, text_encoder: Any, capacity: int, cache: Path) -> None:
        self.pipe = pipe
        self.unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # under torch.compile: the module itself
        self.text_encoder = text_encoder
        self.capacity = capacity
        self.cache = cache
        self._loaded: OrderedDict[tuple[str, int, int], Loaded] = OrderedDict()
        self._active: tuple[tuple[str, float, float], ...] | None = ()  # None: unknown, set it again
        self._layers: dict[int, list[_Slot]] = {}  # id(model) -> its LoRA layers; emptied by a load or delete
        self._te_state: tuple[tuple[str, float], ...] = ()

    def use(self, wanted: list[tuple[loras.LoraFile, loras.LoraUse]]) -> list[dict[str, Any]]:
        """Make exactly ``wanted`` the active set (nothing for an empty list); per LoRA
        its record for the result. Raises ``RenderError`` (the pipeline left clean)."""
        chosen = [(self._load(f, use), use) for f, use in wanted]
        self._evict(keep={c.adapter for c, _ in chosen})
        self._activate(chosen)
        return [{**use.to_dict(), "hash": c.short_hash, "sha256": c.sha256} for c, use in chosen]

    def text_encoder_state(self) -> tuple[tuple[str, float], ...]:
        """The adapters active in the text encoder and their weights (``()`` for
        none): what an encoded prompt depends on besides its text. An adapter's
        name is new for every file loaded, a replaced file's too."""
        return self._te_state

    @property
    def loaded(self) -> list[str]:
        """The adapter names loaded now, least recently used first."""
        return [c.adapter for c in self._loaded.values()]

    def _load(self, f: loras.LoraFile, use: loras.LoraUse) -> Loaded:
        try:
            st = os.stat(f.path)
        except OSError as err:
            raise RenderError(f"cannot read LoRA {use.name} ({f.path}): {err.strerror or err}") from None
        key = (str(f.path), st.st_size, st.st_mtime_ns)  # a file replaced in place is loaded afresh
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        # peft names become attribute names: no dots, no user text; unique in the process,
        # since two warm models may share a text encoder (and so its peft_config).
        adapter = f"lora{next(_SERIAL)}"
        self._wrap_all()
        start = time.perf_counter()
        try:
            parts = self._inject(f.path, adapter)
            loaded = Loaded(adapter, parts, loras.short_hash(f, self.cache), loras.file_sha256(f.path, self.cache))
        except Exception as err:  # noqa: BLE001 - any library error on a bad file fails this job only
            self._delete(adapter)
            raise RenderError(f"cannot load LoRA {use.name} ({f.path}): {first_line(err)}",
                              hint="the file is damaged or not an SD1.x LoRA in kohya/A1111 format; "
                                   "other jobs are not affected") from err
        self._loaded[key] = loaded
        log.info("lora loaded", lora=use.name, file=str(f.path), parts=sorted(parts), hash=loaded.short_hash,
                 load_s=round(time.perf_counter() - start, 3))
        return loaded

    def _inject(self, path: Path, adapter: str) -> frozenset[str]:
        """Load the file's layers under ``adapter``; the parts it has layers for.
        Raises ``ValueError`` for a file that does not fit the model, whole."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))  # safetensors only: a name never reaches a pickle loader
        odd = next((k for k in tensors if not k.endswith(_KNOWN)), None)
        if odd is not None:
            raise ValueError(f"unsupported layer {odd!r} (LyCORIS LoHa/LoKr, OFT, DoRA and bundled "
                             "embeddings are not supported; plain LoRA only)")
        expected = sum(k.endswith(_DOWN) for k in tensors)
        if not expected:
            raise ValueError("it holds no LoRA layers")
        state, alphas = self.pipe.lora_state_dict(tensors)
        parts = frozenset(part for part, prefix in _PARTS.items() if any(k.startswith(prefix) for k in state))
        if "unet" in parts:
            self.pipe.load_lora_into_unet(state, alphas, unet=self.unet, adapter_name=adapter, _pipeline=self.pipe)
        if "text_encoder" in parts:
            self.pipe.load_lora_into_text_encoder(state, alphas, text_encoder=self.text_encoder,
                                                  adapter_name=adapter, _pipeline=self.pipe)
        found = sum(_layers(model, adapter) for model in (self.unet, self.text_encoder))
        if found != expected:
            raise ValueError(f"{expected - found} of its {expected} layers match no layer of this model "
                             "(a LoRA for another model family, such as SDXL?)")
        return parts

    def _delete(self, adapter: str) -> None:
        """Take an adapter out of both models, wherever it got to (a failed load can
        leave half of one attached)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        self._wrap_all()
        for model in (self.unet, self.text_encoder):
            if _layers(model, adapter) or adapter in (getattr(model, "peft_config", None) or {}):
                delete_adapter_layers(model, adapter)
        self._active, self._layers = None, {}  # found again, with what is left

    def _evict(self, keep: set[str]) -> None:
        for key in list(self._loaded):
            if len(self._loaded) <= self.capacity:
                break
            if self._loaded[key].adapter not in keep:
                self._delete(self._loaded.pop(key).adapter)

    def _activate(self, chosen: list[tuple[Loaded, loras.LoraUse]]) -> None:
        """Per LoRA layer of either model: the set's adapters active, each scaled by
        its weight (peft's ``set_scale``: weight * alpha / rank); a layer none of
        them touches gets its base layer back in its place, so it costs what it
        cost before any LoRA was loaded (peft's wrapper, even idle, is a Python
        call per layer: a fifth of a tiny-random step). Done on the layers
        directly: diffusers' ``set_adapters`` and ``enable_lora`` walk every module
        and flip ``requires_grad`` on every LoRA parameter, which took about a
        denoising step of tiny-random."""
        state = tuple((c.adapter, use.te, use.unet) for c, use in chosen)
        if state == self._active:
            return  # the usual case: the same set as the job before
        for model, weights in ((self.unet, {c.adapter: use.unet for c, use in chosen if "unet" in c.parts}),
                               (self.text_encoder, {c.adapter: use.te for c, use in chosen
                                                    if "text_encoder" in c.parts})):
            for slot in self._slots(model):
                layer = slot.wrapper
                active = [a for a in weights if a in layer.lora_A]
                for adapter in active:
                    layer.set_scale(adapter, weights[adapter])
                layer._active_adapter = active  # what set_adapter sets, without its requires_grad walk
                slot.show(layer if active else layer.get_base_layer())
        self._active = state
        self._te_state = tuple((c.adapter, use.te) for c, use in chosen if "text_encoder" in c.parts)

    def _slots(self, model: Any) -> list[_Slot]:
        """Where the model's peft LoRA layers sit, found once after each load or delete."""
        key = id(model)
        if key not in self._layers:
            from peft.tuners.lora import LoraLayer

            self._layers[key] = [_Slot(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], m)
                                 for name, m in model.named_modules() if isinstance(m, LoraLayer)]
        return self._layers[key]

    def _wrap_all(self) -> None:
        """Every LoRA layer back in its place, as peft left it: peft's own loading and
        deleting look for its layers in the models."""
        for slots in self._layers.values():
            for slot in slots:
                slot.show(slot.wrapper)
        self._active, self._layers = None, {}


@dataclass(frozen=True)
class _Slot:
    """A peft LoRA layer and the attribute of its parent module that holds it."""

    parent: Any
    attr: str
    wrapper: Any

    def show(self, module: Any) -> None:
        """Put ``module`` (the wrapper or its base layer) in the slot."""
        if getattr(self.parent, self.attr) is not module:
            setattr(self.parent, self.attr, module)


def _layers(model: Any, adapter: str) -> int:
    """How many of the model's layers hold ``adapter``."""
    return sum(1 for m in model.modules() if adapter in (getattr(m, "lora_A", None) or {}))
