"""Model sources: one table, one loader.

A model setting names a built-in model (``tiny-random``), a local diffusers
folder, or a Hugging Face repo id. Every kind ends in the same
``StableDiffusionPipeline.from_pretrained`` call: built-in models are built once
from configs, saved to the cache, and loaded from there like any folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
RANDOM_NOTE = "random weights: images are noise; for tests and plumbing only"


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from, as recorded in every result."""

    name: str  # as configured
    kind: str  # "builtin" | "folder" | "hub"
    location: str  # folder path or repo id handed to from_pretrained
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.kind, "location": self.location,
                               "random_weights": self.random_weights}
        if self.random_weights:
            out["note"] = RANDOM_NOTE
        return out


# --- built-in models ------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _byte_level_tokenizer(folder: Path) -> Any:
    """A working CLIPTokenizer with a byte-level vocabulary and no merges: no download."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_random(target: Path) -> None:
    """Save a tiny SD pipeline of the real component classes with fixed random weights."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights on every build: same seed, same PNG
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
        # Four VAE blocks: latents 1/8 of the image, as in SD1.5, so a 512x512
        # render stays small (a 2-block VAE would run the UNet on 256x256 latents).
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
            norm_num_groups=32, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000))
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _byte_level_tokenizer(Path(scratch) / "tokenizer")
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(target)


def build_sd15_random(target: Path) -> None:
    """SD1.5's real architecture (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE)
    with fixed random weights: SD1.5's compute per step, no download. Saved in
    float16 (1.7 GB) and built once per cache."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
            norm_num_groups=32, layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=0, eos_token_id=2, pad_token_id=1))
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _byte_level_tokenizer(Path(scratch) / "tokenizer")
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(target)


@dataclass(frozen=True)
class Builtin:
    name: str
    version: int
    build: Callable[[Path], None]
    random_weights: bool


BUILTINS: dict[str, Builtin] = {
    "tiny-random": Builtin("tiny-random", 2, build_tiny_random, True),
    "sd15-random": Builtin("sd15-random", 1, build_sd15_random, True),
}


def ensure_builtin(builtin: Builtin, cache: Path) -> Path:
    """The built-in model's folder, built on first use. Built in a scratch folder
    beside the target and renamed into place, so a crash or a concurrent build
    never leaves a half-saved model."""
    target = cache / "models" / f"{builtin.name}-v{builtin.version}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        builtin.build(scratch / "model")
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# --- resolving a model setting --------------------------------------------------

def resolve(name: str, cache: Path) -> ModelRef:
    """Which source a model setting names; a folder that is not there is an error here."""
    if name in BUILTINS:
        builtin = BUILTINS[name]
        return ModelRef(name, "builtin", str(ensure_builtin(builtin, cache)), builtin.random_weights)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model folder {path} has no model_index.json",
                             hint="point model at a diffusers pipeline folder (saved with save_pretrained)")
        return ModelRef(name, "folder", str(path.absolute()))
    if HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
        return ModelRef(name, "hub", name)
    raise ModelError(
        f"model {name!r} is neither a built-in model, an existing folder, nor a Hugging Face repo id",
        hint=f"use one of {', '.join(BUILTINS)}, a diffusers folder path, or an id like "
             "stable-diffusion-v1-5/stable-diffusion-v1-5")


def load_pipeline(ref: ModelRef, *, dtype: Any, offline: bool, safety_checker: bool) -> Any:
    """``StableDiffusionPipeline.from_pretrained`` for any source; errors say what to fix."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    local_only = offline or ref.kind != "hub"
    extra: dict[str, Any] = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return StableDiffusionPipeline.from_pretrained(ref.location, torch_dtype=dtype,
                                                       local_files_only=local_only, **extra)
    except (OSError, ValueError) as err:
        if ref.kind == "hub":
            where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            how = ("offline is on: download it once with network (sbrender run with offline: false, or "
                   f"`hf download {ref.location}`), or set model to a local diffusers folder"
                   if local_only else
                   "check the id and the network, or set offline: true and use a cached or local model")
            raise ModelError(f"cannot load model {ref.location} from the Hugging Face hub or cache "
                             f"({where}): {_first_line(err)}", hint=how) from None
        raise ModelError(f"cannot load model from {ref.location}: {_first_line(err)}",
                         hint="check that the folder holds a complete Stable Diffusion pipeline") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
