"""Speed switches, one row each, applied once the pipeline is on its device.

Each row reads its ``perf.*`` setting and returns what it did, which is
recorded in every result (``renderer.perf``) and in the benchmark report, so a
timing is never separated from the switches that produced it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from . import buckets, compilecache
from .config import Settings
from .errors import CompileCacheError

log = structlog.get_logger("sbrender")
RECOMPILE_ROOM = 4  # compiles of one method beyond one per bucket before torch fails loudly


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
    # Static shapes: one graph per warmed-up batch size (see ``buckets``).
    def compile_fn(method: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(method, mode=value, dynamic=False)

    if "unet" in parts:
        buckets.install(pipe.unet, "forward", "unet", compile_fn, buckets.float_timestep)
    if "vae" in parts:
        router = buckets.install(pipe.vae, "decode", "vae decode", compile_fn)
        if "unet" not in parts:  # a VAE file, loaded for a job: no warm-up of its own
            router.adopt()
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
    if settings["perf.compile"] != "off":
        _prepare_compile(settings, device)
    for switch in SWITCHES:
        result = switch.apply(pipe, settings[switch.key], device, parts)
        if result is not None:
            done[switch.key.removeprefix("perf.")] = result
    return done


_PREPARED: set[tuple[str, str, str]] = set()  # (perf.compile_cache, cache, device) prepared in this process


def _prepare_compile(settings: Settings, device: str) -> None:
    """Before anything compiles (once per process, not per model loaded): torch's
    caches in sbrender's cache folder (with a bundle applied if one was
    imported), and a recompile limit that fails loudly instead of silently
    running uncompiled. Models of one architecture share the compiled graphs
    (torch guards on the parameters' shapes, not on the module), so the limit
    does not grow with the models kept loaded."""
    key = (settings["perf.compile_cache"], str(settings.cache), device)
    if key in _PREPARED:
        return
    _PREPARED.add(key)
    sizes = warm_up_counts(settings)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               len(sizes) * 2 + RECOMPILE_ROOM)  # * 2: with and without CFG
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    cache = compilecache.folder(settings["perf.compile_cache"], settings.cache, device)
    if cache is None:
        log.info("compile cache", folder="torch's default (perf.compile_cache: off)")
        return
    try:
        cache.use()
    except OSError as err:  # the daemon still starts: it compiles into torch's default folder
        log.warning("compile cache folder unusable: compiled code is not kept across restarts",
                    folder=str(cache.path), error=str(err), hint="make it writable, or set perf.compile_cache")
        return
    try:
        loaded = cache.load_bundle()
    except CompileCacheError as err:  # compiling from scratch is slow, never wrong
        loaded = {"bundle": "not used", "error": str(err)}
        log.warning("compile-cache bundle not used; compiling", error=str(err))
    log.info("compile cache", folder=str(cache.path), **loaded)


def warm_up_counts(settings: Settings) -> list[int]:
    """The batch sizes compiled and warmed up before ready: ``perf.compile_buckets``,
    or 1 and ``perf.batch_size``. A batch of another size is split into these."""
    chosen = settings["perf.compile_buckets"]
    return sorted(set(chosen)) if chosen else sorted({1, settings["perf.batch_size"]})


def warm_up_started() -> dict[str, int]:
    """Torch's compile counters before the warm-up, for ``warmed_up``."""
    return compilecache.counters()


def warmed_up(pipe: Any, settings: Settings, device: str, before: Mapping[str, int],
              started: float) -> dict[str, Any]:
    """After the warm-up: only warmed-up shapes run compiled from now on; the
    compiled artifacts are saved as this host's bundle; one log line says what
    the start compiled (torch's cache counters). Returns the perf facts to record."""
    rows: dict[str, list[int]] = {}  # per method, the batch sizes it was called with (the UNet: 2 per image with CFG)
    for router in buckets.routers(pipe.unet, pipe.vae):
        rows.update(router.seal())
    sizes = warm_up_counts(settings)
    after = compilecache.counters()
    counts = {k: after[k] - before[k] for k in after}
    warm = not compilecache.compiled_anything(before, after)
    saved: dict[str, Any] = {}
    cache = compilecache.folder(settings["perf.compile_cache"], settings.cache, device)
    # Only into caches of ours (a folder that could not be used left torch on its default),
    # and only when this warm-up compiled something (a model loaded later, of a known shape, did not).
    if not warm and cache is not None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == str(cache.path / "inductor"):
        try:
            saved = cache.save_bundle({"compile": settings["perf.compile"], "batch_sizes": sizes, "rows": rows})
        except CompileCacheError as err:
            saved = {"bundle": "not saved", "error": str(err)}
    log.info("compiled", start="warm: every graph from the cache" if warm else "cold: graphs compiled",
             warm=warm, seconds=round(time.perf_counter() - started, 3), batch_sizes=sizes, rows=rows, **counts,
             **saved)
    return {"compile_buckets": sizes}


def vae_tiling_wanted(setting: str, width: int, height: int) -> bool:
    return setting == "on" or (setting == "auto" and max(width, height) > 1024)
