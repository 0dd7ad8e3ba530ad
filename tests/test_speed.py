"""The speed tools, for real on the CPU: `sbrender bench` end to end, the perf
switches through the real pipeline, and the sd15-random built-in. No timing is
asserted here: the figures live in docs/PERFORMANCE.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import daemon_env, sbrender
from sbrender.config import load_settings
from sbrender.jobs import Job


def _job(k: int, steps: int = 3, size: int = 64) -> Job:
    return Job(id=f"s{k}", prompt=f"a lighthouse, take {k}", negative_prompt="", steps=steps, guidance_scale=7.0,
               width=size, height=size, seed=k, count=1, sampler="DPM++ 2M Karras", priority=0)


def _renderer(model_cache: Path, defaults: dict[str, Any] | None = None, **perf: Any) -> Any:
    from sbrender.pipeline import DiffusersRenderer

    settings = load_settings(None, env={}, overrides={"model": "tiny-random", "cache": str(model_cache),
                                                      **{f"perf.{k}": v for k, v in perf.items()},
                                                      **{f"defaults.{k}": v for k, v in (defaults or {}).items()}})
    renderer = DiffusersRenderer(settings)
    renderer.load()
    return renderer


def test_bench_times_the_plain_loop_and_the_daemon_and_writes_a_report(tmp_path: Path, model_cache: Path) -> None:
    report = tmp_path / "report.json"
    proc = sbrender("bench", "--model", "tiny-random", "--size", "64x64", "--steps", "2", "--jobs", "4",
                    "--batch", "2", "--latency-jobs", "2", "--rounds", "2", "--spool", str(tmp_path),
                    "--report", str(report), env=daemon_env(model_cache), cwd=tmp_path, timeout=600, check=True)
    data = json.loads(report.read_text())
    assert set(data["plain"]) == set(data["daemon"]) == {"1", "2"}
    for row in (*data["plain"].values(), *data["daemon"].values()):
        assert row["images_per_s"] > 0
        assert len(row["runs_s"]) == 2, "each side ran once per round"
        assert row["seconds"] == pytest.approx(sum(row["runs_s"]) / 2, abs=1e-3)
    unbatched = data["daemon"]["1"]
    assert len(unbatched["round_ratios"]) == 2
    assert data["ratios"]["daemon_b1/plain_b1"] == pytest.approx(data["plain"]["1"]["seconds"] / unbatched["seconds"],
                                                                 rel=1e-3)
    batched = data["daemon"]["2"]
    assert batched["renderer_idle"]["calls"] == 4, "4 queued jobs render as 2 batches of 2, in each of 2 rounds"
    assert batched["latency_one_at_a_time"]["drop_to_render_start"]["p50_ms"] > 0
    assert set(data["ratios"]) == {"daemon_b1/plain_b1", "daemon_b2/plain_b1", "daemon_b2/plain_b2",
                                   "plain_b2/plain_b1"}
    assert data["renderer"]["perf"]["attention"] == "sdpa"
    assert data["spool"]["fsync_1mib_ms"] > 0
    assert "ratios: daemon_b1/plain_b1" in proc.stdout
    assert "daemon/plain by round, batch 1: " in proc.stdout
    assert not list(tmp_path.glob("sbrender-bench-*")), "the bench's spool is removed"
    # Last, LoRA sets switched 20 times, against a denoising step of the same model.
    lora = data["lora"]
    assert lora["switches"] == 20 and lora["step_ms"] > 0 and lora["switch_ms"] > 0
    assert lora["switch/step"] == pytest.approx(lora["switch_ms"] / lora["step_ms"], rel=1e-2)
    assert "LoRA: switching between two loaded sets" in proc.stdout


def test_bench_refuses_an_unknown_setting(tmp_path: Path, model_cache: Path) -> None:
    proc = sbrender("bench", "--set", "perf.turbo=yes", env=daemon_env(model_cache), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown setting perf.turbo" in proc.stderr


def test_perf_switches_apply_and_change_images_at_most_in_the_last_bits(model_cache: Path) -> None:
    plain = _renderer(model_cache)
    switched = _renderer(model_cache, channels_last=True, fuse_qkv=True)
    classic = _renderer(model_cache, attention="classic")
    assert switched.describe()["perf"] == {"attention": "sdpa", "fuse_qkv": True, "channels_last": True,
                                                "compile": "off"}
    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    assert {type(p) for p in switched.pipe.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert {type(p) for p in classic.pipe.unet.attn_processors.values()} == {AttnProcessor}
    base = np.asarray(plain.render(_job(1), [1]).images[0], dtype=int)
    for other in (switched, classic):
        image = np.asarray(other.render(_job(1), [1]).images[0], dtype=int)
        assert np.abs(image - base).max() <= 2


@pytest.mark.slow
def test_compiled_pipeline_warms_up_at_load_and_renders(model_cache: Path) -> None:
    # The warm-up renders at the default size: 64x64 here, the size rendered below.
    # At the built-in 512x512 the render below compiled the UNet and the VAE a
    # third time, for the new size (over a minute of a 2-core machine).
    renderer = _renderer(model_cache, compile="default", batch_size=2, defaults={"width": 64, "height": 64})
    assert renderer.describe()["perf"]["compile"] == "default"
    outs = renderer.render_batch([(_job(1, steps=2), [1]), (_job(2, steps=2), [2])])
    assert [o.images[0].size for o in outs] == [(64, 64), (64, 64)]


def test_vae_tiling_follows_the_setting_and_the_size(model_cache: Path) -> None:
    renderer = _renderer(model_cache, vae_tiling="auto")
    renderer.render(_job(1, steps=1), [1])
    assert renderer.pipe.vae.use_tiling is False
    renderer = _renderer(model_cache, vae_tiling="on")
    renderer.render(_job(1, steps=1), [1])
    assert renderer.pipe.vae.use_tiling is True


@pytest.mark.slow
def test_sd15_random_has_sd15s_architecture_and_renders(tmp_path: Path) -> None:
    """The one CPU check of the big built-in: built from configs, saved, loaded
    through from_pretrained, one small render (8x8 latents, one step)."""
    from sbrender.pipeline import DiffusersRenderer

    settings = load_settings(None, env={}, overrides={"model": "sd15-random", "cache": str(tmp_path)})
    renderer = DiffusersRenderer(settings)
    renderer.load()
    pipe = renderer.pipe
    unet = pipe.unet.config
    assert (tuple(unet.block_out_channels), unet.cross_attention_dim, unet.layers_per_block,
            unet.attention_head_dim, unet.sample_size) == ((320, 640, 1280, 1280), 768, 2, 8, 64)
    millions = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
                for name in ("unet", "text_encoder", "vae")}
    assert 859 < millions["unet"] < 860.1  # SD1.5's UNet: 859.52 M parameters
    assert 123 < millions["text_encoder"] < 123.2  # CLIP ViT-L/14's text tower
    assert 83.6 < millions["vae"] < 83.7
    assert renderer.describe()["model"]["random_weights"] is True
    out = renderer.render(dataclasses.replace(_job(1, steps=1), width=64, height=64), [1])
    assert out.images[0].size == (64, 64)
    assert not pytest.approx(0) == float(np.asarray(out.images[0]).std())
