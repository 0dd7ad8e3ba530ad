"""Speed switches, one row each, applied once the pipeline is on its device.

Each row reads its ``perf.*`` setting and returns what it did, which is
recorded in every result (``renderer.perf``) and in the benchmark report, so a
timing is never separated from the switches that produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import Settings


# Each switch gets the pipeline (or a namespace holding only a VAE) and the parts it may
# change: a part another warm model shares was changed when that model loaded.
Parts = frozenset[str] | set[str]


def _tf32(pipe: Any, value: bool, device: str, parts: Parts) -> Any:
    if device != "cuda":
        return None
    # float32 work only; float16/bfloat16 matmuls are unaffected.
    torch.backends.cuda.matmul.allow_tf32 = value
    torch.backends.cudnn.allow_tf32 = value
    return value


def _cudnn_benchmark(pipe: Any, value: bool, device: str, parts: Parts) -> Any:
    if device != "cuda":
        return None
    # Picks the fastest convolution kernels per shape, once per new size.
    torch.backends.cudnn.benchmark = value
    return value


def _attention(pipe: Any, value: str, device: str, parts: Parts) -> Any:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0() if value == "sdpa" else AttnProcessor()
    for part in sorted(parts):
        getattr(pipe, part).set_attn_processor(processor)
    return value


def _fuse_qkv(pipe: Any, value: bool, device: str, parts: Parts) -> Any:
    if value:
        for part in sorted(parts):
            getattr(pipe, part).fuse_qkv_projections()
    return value


def _channels_last(pipe: Any, value: bool, device: str, parts: Parts) -> Any:
    if value:
        for part in sorted(parts):
            getattr(pipe, part).to(memory_format=torch.channels_last)
    return value


def _compile(pipe: Any, value: str, device: str, parts: Parts) -> Any:
    if value == "off":
        return value
    # The UNet runs every step, the VAE decoder once per image: both are worth it.
    if "unet" in parts:
        pipe.unet = torch.compile(pipe.unet, mode=value)
    if "vae" in parts:
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=value)
    return value


@dataclass(frozen=True)
class Switch:
    key: str
    apply: Callable[[Any, Any, str, Parts], Any]


# In this order: attention processors before fusing (fusing replaces them),
# memory format before compiling (the compiled graph bakes it in).
SWITCHES: tuple[Switch, ...] = (
    Switch("perf.tf32", _tf32),
    Switch("perf.cudnn_benchmark", _cudnn_benchmark),
    Switch("perf.attention", _attention),
    Switch("perf.fuse_qkv", _fuse_qkv),
    Switch("perf.channels_last", _channels_last),
    Switch("perf.compile", _compile),
)


def apply(pipe: Any, settings: Settings, device: str, parts: Parts = frozenset({"unet", "vae"})) -> dict[str, Any]:
    """Apply every switch to ``parts`` of ``pipe``; returns ``{name: value}`` for those that apply here."""
    done: dict[str, Any] = {}
    for switch in SWITCHES:
        result = switch.apply(pipe, settings[switch.key], device, parts)
        if result is not None:
            done[switch.key.removeprefix("perf.")] = result
    return done


def vae_tiling_wanted(setting: str, width: int, height: int) -> bool:
    return setting == "on" or (setting == "auto" and max(width, height) > 1024)
