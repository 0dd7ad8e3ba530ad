"""Model sources: one table, one loader.

A model setting names a built-in model (``tiny-random``), a local diffusers
folder, a Hugging Face repo id, or a single ``.safetensors`` checkpoint (the
original LDM layout of A1111's community models). The first three end in the same
``StableDiffusionPipeline.from_pretrained`` call: built-in models are built once
from configs, saved to the cache, and loaded from there like any folder. A
checkpoint goes through ``from_single_file`` with the config files of a local
diffusers folder (``model_config``), never the network. A setting spelled as a
path (``./x``, ``~/x``, ``/x``, ``a/b/c``) or naming an existing file or folder is
a path; only ``owner/name`` can be a repo id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import stfile
from .errors import ModelError, first_line

# owner/name, each part a valid Hugging Face name: letters, digits, "-", "_", ".", at most 96,
# starting with a letter or digit, ending with a word character, no "--" or "..".
_HUB_PART = r"(?![\w.-]*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}\w)?"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}", re.ASCII)
_TRUE = {"1", "true", "yes", "on"}
RANDOM_NOTE = "random weights: images are noise; for tests and plumbing only"
CHECKPOINT_SUFFIX = ".safetensors"
# Pickled checkpoints: loading one runs whatever code it holds.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ARCH_HINT = ("model_config must be of the checkpoint's architecture: SD1.5 configs for an SD1.5 checkpoint, "
             "SD2 configs for SD2; SDXL checkpoints are not supported")
HASHES_FILE = "model-hashes.json"  # in the cache folder
CONFIG_HINT = ("set model_config (SBRENDER_MODEL_CONFIG) to a diffusers folder of the checkpoint's architecture; "
               "for SD1.5 checkpoints, the config files of stable-diffusion-v1-5 (a few KB): `hf download "
               "stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' --include '*.txt' --local-dir "
               "sd15-config`, then model_config: sd15-config")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from, as recorded in every result."""

    name: str  # as configured
    kind: str  # "builtin" | "folder" | "hub" | "checkpoint"
    location: str  # folder path or repo id handed to from_pretrained; the checkpoint file
    random_weights: bool = False
    config: str = ""  # checkpoint: the diffusers folder its component configs come from
    sha256: str = ""  # checkpoint: of the whole file

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.kind, "location": self.location,
                               "random_weights": self.random_weights}
        if self.config:
            out["config"] = self.config
        if self.sha256:
            # A1111's names: "hash" is its "Model hash" (civitai's AutoV2).
            out["sha256"] = self.sha256
            out["hash"] = self.sha256[:10]
        if self.random_weights:
            out["note"] = RANDOM_NOTE
        return out


def infotext_name(record: dict[str, Any]) -> str:
    """The ``Model:`` of a PNG's infotext for a ``ModelRef.to_dict`` record: a
    checkpoint's file name without its suffix, as A1111 writes it; a folder's
    name; a repo id's name part. Never a path on the server."""
    name = str(record.get("name", ""))
    if record.get("source") == "checkpoint":
        return Path(record["location"]).stem
    if record.get("source") in ("folder", "hub"):
        return Path(name.rstrip("/\\")).name or name
    return name


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


def _save_pipeline(target: Path, unet: Any, vae: Any, text_encoder: Any, dtype: Any = None) -> None:
    """The built components as a diffusers folder, with SD1.5's scheduler and the
    download-free tokenizer, loadable by ``from_pretrained`` like any model."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _byte_level_tokenizer(Path(scratch) / "tokenizer")
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        (pipe if dtype is None else pipe.to(dtype)).save_pretrained(target)


def build_tiny_random(target: Path) -> None:
    """Save a tiny SD pipeline of the real component classes with fixed random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
        # A trained CLIP's final LayerNorm has a real scale and shift; left at 1 and 0, every
        # token's mean is ~0 and A1111's emphasis (which divides by the mean) gives inf.
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        with torch.no_grad():
            norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
            norm.bias.copy_(0.5 * torch.randn_like(norm.bias) + 0.3)
    _save_pipeline(target, unet, vae, text_encoder)


def build_sd15_random(target: Path) -> None:
    """SD1.5's real architecture (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE)
    with fixed random weights: SD1.5's compute per step, no download. Saved in
    float16 (2 GB) and built once per cache."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
    _save_pipeline(target, unet, vae, text_encoder, dtype=torch.float16)


@dataclass(frozen=True)
class Builtin:
    name: str
    version: int
    build: Callable[[Path], None]
    random_weights: bool


BUILTINS: dict[str, Builtin] = {
    "tiny-random": Builtin("tiny-random", 3, build_tiny_random, True),
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

def is_offline(setting: bool) -> bool:
    """Whether nothing may be downloaded: the ``offline`` setting, or huggingface_hub's
    own ``HF_HUB_OFFLINE``, which diffusers obeys whatever the setting says."""
    return setting or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def looks_like_path(name: str) -> bool:
    """A model setting spelled as a path: starting with ``.``, ``/`` or ``~``, or with a
    ``/`` that does not make an ``owner/name`` repo id."""
    return name.startswith((".", "/", "~")) or ("/" in name and not HUB_ID.fullmatch(name))


# Which source a model setting names: the first row that matches. An existing file or
# folder wins over a repo id of the same spelling (``models/sd15`` in the working directory).
SOURCES: tuple[tuple[str, Callable[[str, Path], bool]], ...] = (
    ("builtin", lambda name, path: name in BUILTINS),
    ("checkpoint", lambda name, path: path.suffix.lower() in (CHECKPOINT_SUFFIX, *PICKLE_SUFFIXES)
     or path.is_file()),
    ("folder", lambda name, path: path.exists() or looks_like_path(name)),
    ("hub", lambda name, path: HUB_ID.fullmatch(name) is not None),
)


def _where(path: Path) -> str:
    return "" if path.is_absolute() else f", relative to the working directory {Path.cwd()} or absolute"


def _check_folder(name: str, path: Path, config: str, offline: bool) -> None:
    if not path.exists():
        raise ModelError(f"model {name} is a path, and {path.absolute()} does not exist",
                         hint="set model to the path of an existing diffusers pipeline folder or .safetensors "
                              "checkpoint" + _where(path))
    if not (path / "model_index.json").is_file():
        raise ModelError(f"model folder {path} has no model_index.json",
                         hint="point model at a diffusers pipeline folder (saved with save_pretrained)")


def _check_hub(name: str, path: Path, config: str, offline: bool) -> None:
    """Offline, a repo id must be in the cache. Online too when its owner part is a
    folder here: then it is more likely a path that does not exist than a repo to fetch."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no render stack: `run` says so when it imports it
        return
    if isinstance(try_to_load_from_cache(name, "model_index.json"), str):
        return
    owner = Path(name.split("/")[0])
    if not offline and not owner.is_dir():
        return  # downloaded at the first start
    message = (f"{name} is not in the Hugging Face cache" + (" and offline is on" if offline else "")
               + ": it is neither a cached hub model nor an existing folder")
    if owner.is_dir():
        message += f"; {owner.absolute()} exists but not {path.absolute()}, so it may be a path that does not exist"
    fix = f"download it once (`hf download {name}`)" + (" or set offline: false" if offline else "")
    raise ModelError(message, hint=f"{fix}; for a local folder, set model to its path{_where(path)}")


def _check_checkpoint(name: str, path: Path, config: str, offline: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"model {path} is a pickled checkpoint ({path.suffix}); loading one can run any code "
                         "it holds, so sbrender does not", hint="use the model's .safetensors download, or "
                         "convert the file once, where you trust it, with safetensors.torch.save_file")
    if not path.is_file():
        raise ModelError(f"model checkpoint {path} does not exist" if not path.exists() else
                         f"model checkpoint {path} is not a file", hint="check the model path" + _where(path))
    if path.suffix.lower() != CHECKPOINT_SUFFIX:
        raise ModelError(f"model file {path} is not a {CHECKPOINT_SUFFIX} checkpoint",
                         hint="point model at a .safetensors checkpoint, a diffusers folder or a repo id")
    _check_safetensors(path)
    _config_folder(path, config)


CHECKS: dict[str, Callable[[str, Path, str, bool], None]] = {
    "builtin": lambda name, path, config, offline: None,  # built at the first load
    "folder": _check_folder,
    "hub": _check_hub,
    "checkpoint": _check_checkpoint,
}


def check(name: str, config: str = "", *, offline: bool = False) -> str:
    """The source a model setting names (a row of ``SOURCES``), after every check that
    needs neither torch nor a download: a file or folder that is not there, a checkpoint's
    header and ``model_config``, a repo id missing from the cache when ``offline``.
    Builds and hashes nothing; ``ModelError`` says what to fix."""
    path = Path(name).expanduser()
    kind = next((kind for kind, matches in SOURCES if matches(name, path)), None)
    if kind is None:
        raise ModelError(
            f"model {name!r} is neither a built-in model, an existing folder, nor a Hugging Face repo id",
            hint=f"use one of {', '.join(BUILTINS)}, a diffusers folder path, or an id like "
                 "stable-diffusion-v1-5/stable-diffusion-v1-5")
    CHECKS[kind](name, path, config, offline)
    return kind


def resolve(name: str, cache: Path, config: str = "", *, offline: bool = False) -> ModelRef:
    """Which source a model setting names, checked as by ``check``; a built-in model
    is built here and a checkpoint hashed. ``config`` is the ``model_config`` setting."""
    kind = check(name, config, offline=offline)
    path = Path(name).expanduser()
    if kind == "builtin":
        builtin = BUILTINS[name]
        return ModelRef(name, "builtin", str(ensure_builtin(builtin, cache)), builtin.random_weights)
    if kind == "checkpoint":
        return ModelRef(name, "checkpoint", str(path.absolute()), config=str(_config_folder(path, config)),
                        sha256=file_sha256(path, cache))
    return ModelRef(name, kind, str(path.absolute()) if kind == "folder" else name)


# --- single-file checkpoints ----------------------------------------------------

def checkpoint_problem(path: Path) -> str:
    """Why a file is not a whole safetensors checkpoint of an SD1.x UNet (truncated
    downloads, other files, LoRAs, SDXL), as the end of a sentence about the file,
    reading only its header; "" for a usable one. Raises ``OSError``."""
    try:
        header = stfile.read_header(path)
    except ValueError as err:
        return str(err)
    kind, words = stfile.kind(header)
    if kind == "checkpoint" and stfile.inpainting(header):
        return "is an inpainting checkpoint (its UNet takes 9 input channels); sbrender renders txt2img and img2img"
    if kind != "checkpoint":
        return (f"holds no Stable Diffusion UNet (no model.diffusion_model.* weights): it is {words}"
                if kind not in ("sdxl", "sd2") else f"is {words}; sbrender renders SD1.x checkpoints")
    return ""


def _check_safetensors(path: Path) -> None:
    """Refuse a file that is not a whole SD1.x checkpoint (``checkpoint_problem``)."""
    try:
        why = checkpoint_problem(path)
    except OSError as err:
        raise ModelError(f"model checkpoint {path} cannot be read: {err.strerror or err}",
                         hint="check the path and permissions") from None
    if why:
        wrong_kind = why.startswith(("holds", "is an", "is a"))
        raise ModelError(f"model checkpoint {path} {why}",
                         hint="model takes a full SD1.x checkpoint; a LoRA, VAE or embedding file cannot be the model"
                         if wrong_kind else "download the file again")


def _config_folder(path: Path, setting: str) -> Path:
    """The diffusers folder whose configs describe the checkpoint: a local folder,
    or a repo id already in the Hugging Face cache (never downloaded)."""
    if not setting:
        raise ModelError(f"model checkpoint {path} needs model_config: a single file holds weights but not "
                         "the configs diffusers builds the pipeline from", hint=CONFIG_HINT)
    folder = Path(setting).expanduser()
    if folder.is_file():
        raise ModelError(f"model_config {folder} is a file; it must be a diffusers folder (model_index.json and "
                         "one config per component), not an original LDM .yaml", hint=CONFIG_HINT)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"model_config folder {folder} has no model_index.json", hint=CONFIG_HINT)
        return folder.absolute()
    if HUB_ID.fullmatch(setting) and not setting.startswith((".", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(setting, "model_index.json")
        if isinstance(cached, str):
            return Path(cached).parent
        raise ModelError(f"model_config {setting} is not in the Hugging Face cache (configs for a checkpoint "
                         "are never downloaded)", hint=f"`hf download {setting} --include '*.json' --include "
                         "'*.txt'`, or set model_config to a local diffusers folder")
    raise ModelError(f"model_config {setting} is neither an existing folder nor a Hugging Face repo id",
                     hint=CONFIG_HINT)


def file_sha256(path: Path, cache: Path) -> str:
    """The sha256 of a file, cached in ``cache/model-hashes.json`` by path, size and
    modification time: a 4 GB checkpoint is read once, not at every start."""
    try:
        return cached_sha256(path, cache, "sha256")
    except OSError as err:
        raise ModelError(f"cannot read model checkpoint {path}: {err.strerror or err}") from None


def cached_sha256(path: Path, cache: Path, kind: str = "sha256",
                  start: Callable[[BinaryIO], int] | None = None) -> str:
    """The sha256 of a file's bytes from ``start(file)`` on (all of them without),
    kept in ``cache/model-hashes.json`` under ``kind`` while the file's path, size
    and modification time stay the same. Raises ``OSError``."""

    def compute(p: Path) -> str:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            if start is not None:
                f.seek(start(f))
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    return cached_digest(path, cache, kind, compute)


def file_stamp(path: Path) -> tuple[Any, ...]:
    """A file as it is now (path, size, modification time): what it was loaded or
    checked as is done again when this changes; just the path when it cannot be read."""
    try:
        info = path.stat()
    except OSError:
        return (str(path),)
    return (str(path), info.st_size, info.st_mtime_ns)


def cached_digest(path: Path, cache: Path, kind: str, compute: Callable[[Path], str] | None) -> str:
    """``compute(path)``, kept in ``cache/model-hashes.json`` under ``kind`` while the
    file's path, size and modification time stay the same; without ``compute``,
    only what is kept ("" when nothing is). Raises ``OSError`` (and whatever
    ``compute`` raises)."""
    stat = path.stat()
    key = str(path.absolute())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    store = cache / HASHES_FILE
    entry = _hashes(store).get(key)
    if not isinstance(entry, dict) or {k: entry.get(k) for k in stamp} != stamp:
        entry = dict(stamp)  # a changed file: its other hashes are stale too
    if isinstance(entry.get(kind), str):
        return entry[kind]
    if compute is None:
        return ""
    value = compute(path)
    known = _hashes(store)  # read again: another process may have added its own meanwhile
    known[key] = {**entry, kind: value}
    try:  # a cache: a folder we cannot write only costs a rehash next time
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{HASHES_FILE}.", dir=store.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1)
        os.replace(temp, store)
    except OSError:
        pass
    return value


def _hashes(store: Path) -> dict[str, Any]:
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


# --- loading --------------------------------------------------------------------

def load_pipeline(ref: ModelRef, *, dtype: Any, offline: bool, safety_checker: bool,
                  components: dict[str, Any] | None = None) -> Any:
    """``StableDiffusionPipeline.from_pretrained`` (``from_single_file`` for a
    checkpoint) for any source; errors say what to fix. ``components``: parts
    already loaded (a warm model's VAE or text encoder) that are used, not loaded again."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    local_only = offline or ref.kind != "hub"
    extra: dict[str, Any] = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    if ref.kind == "checkpoint":
        return _load_checkpoint(ref, dtype, extra, components or {})
    extra.update(components or {})
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
                             f"({where}): {first_line(err)}", hint=how) from None
        raise ModelError(f"cannot load model from {ref.location}: {first_line(err)}",
                         hint="check that the folder holds a complete Stable Diffusion pipeline",
                         lasting=not isinstance(err, OSError)) from None


def _load_checkpoint(ref: ModelRef, dtype: Any, extra: dict[str, Any], given: dict[str, Any]) -> Any:
    """``from_single_file`` with a local config folder: with ``config`` an existing
    folder and ``local_files_only``, diffusers reads the configs from that folder
    and never asks the hub (without ``config`` it would guess a repo and download)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if not extra:  # safety checker on: a single file never holds one; take it from the config folder
        extra = {"safety_checker": _safety_checker(ref, dtype)}
    extra = {**extra, **given}
    try:
        pipe = StableDiffusionPipeline.from_single_file(ref.location, config=ref.config, local_files_only=True,
                                                        torch_dtype=dtype, **extra)
    except OSError as err:
        raise ModelError(f"cannot load checkpoint {ref.location} with the configs in {ref.config}: "
                         f"{first_line(err)}", hint=CONFIG_HINT, lasting=False) from None
    except MemoryError as err:
        raise _out_of_memory(ref, err) from None
    except (ValueError, RuntimeError, KeyError, TypeError, SingleFileComponentError) as err:
        if "allocate" in str(err) or "out of memory" in str(err).lower():
            raise _out_of_memory(ref, err) from None
        # Weights of another architecture: diffusers' errors vary by where the shapes part.
        # A weight the checkpoint lacks is left unallocated ("meta") and fails when moved.
        # Only diffusers' first sentence: the rest advises loading with random weights.
        why = ("lacks weights the configs need" if "meta tensor" in str(err) else
               f"{type(err).__name__}: {first_line(err).split('. ')[0].replace('  ', ' ')}")
        raise ModelError(f"checkpoint {ref.location} does not fit the configs in {ref.config}: {why}",
                         hint=ARCH_HINT) from None
    missing = [f"{part}.{key}" for part in ("unet", "vae", "text_encoder") if part not in given
               for key, tensor in getattr(pipe, part).state_dict().items() if tensor.device == torch.device("meta")]
    if missing:
        raise ModelError(f"checkpoint {ref.location} does not fit the configs in {ref.config}: it lacks "
                         f"{len(missing)} weight(s) they need, such as {missing[0]}", hint=ARCH_HINT)
    return pipe


def _out_of_memory(ref: ModelRef, err: BaseException) -> ModelError:
    return ModelError(f"not enough memory to load {ref.location}: {first_line(err) or type(err).__name__}",
                      hint="free memory (models.keep_loaded, other processes) and submit the job again",
                      lasting=False)


def _safety_checker(ref: ModelRef, dtype: Any) -> Any:
    """The config folder's safety checker, or None where its model_index lists none."""
    index = json.loads((Path(ref.config) / "model_index.json").read_text(encoding="utf-8"))
    if (index.get("safety_checker") or [None])[0] is None:
        return None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = Path(ref.config) / "safety_checker"
    try:
        if not folder.is_dir():
            raise OSError("no safety_checker folder")
        return StableDiffusionSafetyChecker.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"safety_checker is on but model_config {ref.config} holds no safety checker weights "
                         f"({first_line(err)})", hint="download them into it (`hf download "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5 --include 'safety_checker/*' --local-dir "
                         f"{ref.config}`), or set safety_checker: false") from None
