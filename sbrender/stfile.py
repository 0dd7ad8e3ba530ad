"""A safetensors file read by its header alone: torch-free and quick.

One reader for every kind of file the daemon takes (checkpoints, VAEs, LoRAs),
and the one table that says what a header holds, so a file put in the wrong
folder is named for what it is ("a LoRA", "an SDXL checkpoint") rather than
failing deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 << 20  # kohya's metadata runs to megabytes; a checkpoint's table to a few


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, checked against the file's size (a
    truncated download fails here). Raises ``ValueError`` (what is wrong, as the
    end of a sentence about the file) or ``OSError``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError("is not a safetensors file (no valid header)")
        data = f.read(length)
    if len(data) != length:
        raise ValueError("is incomplete (its header is cut short)")
    try:
        header = json.loads(data)
    except ValueError:
        raise ValueError("is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("is not a safetensors file (its header is not a mapping)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        raise ValueError("is not a safetensors file (bad tensor table)") from None
    size = path.stat().st_size
    if size != 8 + length + end:
        raise ValueError(f"is incomplete or damaged: {size} bytes where its header says {8 + length + end} "
                         "(download it again)")
    return header


# What a header holds, by the keys that only that kind of file has: the first row that
# matches. (kind, test on the tensor names, how a person would call it)
_KINDS: tuple[tuple[str, Callable[[set[str]], bool], str], ...] = (
    ("sdxl", lambda keys: any(k.startswith("conditioner.embedders.") for k in keys), "an SDXL checkpoint"),
    ("sd2", lambda keys: any(k.startswith("cond_stage_model.model.") for k in keys),
     "an SD2 checkpoint (OpenCLIP text encoder)"),
    ("checkpoint", lambda keys: any(k.startswith("model.diffusion_model.") for k in keys), "an SD checkpoint"),
    ("lora", lambda keys: any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) and "lora" in k
                              for k in keys), "a LoRA"),
    ("vae", lambda keys: any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in keys)
     and any(k.startswith(("decoder.", "first_stage_model.decoder.")) for k in keys), "a VAE"),
    ("embedding", lambda keys: len(keys) <= 2, "a textual-inversion embedding"),
)


def kind(header: dict[str, Any]) -> tuple[str, str]:
    """What the file is, from its tensor names: (kind, its name for a person);
    ("unknown", ...) for anything else."""
    keys = {k for k in header if k != "__metadata__"}
    return next(((k, words) for k, test, words in _KINDS if test(keys)), ("unknown", "not a Stable Diffusion file"))


def inpainting(header: dict[str, Any]) -> bool:
    """An inpainting UNet takes 9 input channels (latents, mask, masked image), not 4."""
    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight")
    shape = conv_in.get("shape") if isinstance(conv_in, dict) else None
    return isinstance(shape, list) and len(shape) == 4 and shape[1] != 4


def tensors_digest(path: Path, prefix: str) -> str:
    """The sha256 of the tensors under ``prefix`` (names without it, dtypes, shapes
    and bytes, in name order): two files that hold the same text encoder give the
    same digest whatever else they hold. Raises ``OSError``, ``ValueError``."""
    header = read_header(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        start = 8 + length
        digest = hashlib.sha256()
        for name in sorted(k for k in header if k.startswith(prefix)):
            info = header[name]
            begin, end = (int(x) for x in info["data_offsets"])
            digest.update(f"{name[len(prefix):]}|{info['dtype']}|{info['shape']}|".encode())
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise ValueError("is shorter than its header says")
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()
