"""The speed tools, for real on the CPU: `sbrender bench` end to end, the perf
switches through the real pipeline, and the sd15-random built-in. No timing is
asserted here: the figures live in docs/PERFORMANCE.md."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import DaemonProcess, Spool, daemon_env, sbrender
from sbrender.config import load_settings
from sbrender.jobs import Job

COLD_COMPILE_TIMEOUT_S = 900.0  # the tiny model compiles in about 75 s on a quiet 2-core machine


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
    # The report rounds the ratio to 4 decimals: on a quiet machine it is about 0.003.
    assert lora["switch/step"] == pytest.approx(lora["switch_ms"] / lora["step_ms"], rel=1e-2, abs=1e-4)
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
    from sbrender import buckets, compilecache

    renderer = _renderer(model_cache, compile="default", batch_size=2, defaults={"width": 64, "height": 64})
    assert renderer.describe()["perf"]["compile"] == "default"
    assert renderer.describe()["perf"]["compile_buckets"] == [1, 2]
    before = compilecache.counters()
    outs = renderer.render_batch([(_job(1, steps=2), [1]), (_job(2, steps=2), [2])])
    assert [o.images[0].size for o in outs] == [(64, 64), (64, 64)]
    # Three images: 2 + 1 through the compiled graphs of the warm-up, nothing compiled.
    outs = renderer.render_batch([(_job(k, steps=2), [k]) for k in (1, 2, 3)])
    assert [o.images[0].size for o in outs] == [(64, 64)] * 3
    unet, vae = buckets.routers(renderer.pipe.unet, renderer.pipe.vae)
    assert unet.calls["split"] == 2 and vae.calls["split"] == 1, "each of the 2 steps, and the decode"
    # Euler's timesteps are float32 where DPM++'s are int64; CFG 1 gives one UNet row per image
    # (LCM, turbo): both through the warm-up's graphs too.
    eager = unet.calls["eager"]
    renderer.render(dataclasses.replace(_job(4, steps=2), sampler="Euler"), [4])
    renderer.render(dataclasses.replace(_job(5, steps=2), guidance_scale=1.0), [5])
    assert unet.calls["eager"] == eager
    assert compilecache.counters() == before


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


# --- compiled code: static buckets, the cache across restarts, bundles ------------------------------------------


class _Mixer(torch.nn.Module):
    """Rows that do not depend on each other, like the UNet's and the VAE's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.gain = 1.0  # a Python number: torch's compiled code guards on its value

    def forward(self, x: torch.Tensor, scale: torch.Tensor, return_dict: bool = True) -> Any:
        out = torch.tanh(self.conv(x)) * scale * self.gain
        return {"sample": out} if return_dict else (out,)


def test_warmed_up_batch_sizes_run_compiled_others_split_or_run_eager_at_once() -> None:
    from torch._dynamo.utils import counters

    from sbrender import buckets

    torch._dynamo.reset()
    module = _Mixer()
    router = buckets.install(module, "forward", "mixer",
                             lambda method: torch.compile(method, backend="eager", dynamic=False))
    scale = torch.tensor(0.5)
    other = _Mixer()  # loaded later, as a VAE file is (outside inference mode, like every model)
    later = buckets.install(other, "forward", "mixer",
                            lambda method: torch.compile(method, backend="eager", dynamic=False))

    def batch(rows: int, side: int = 8) -> torch.Tensor:
        return torch.randn(rows, 3, side, side, generator=torch.Generator().manual_seed(rows))

    with torch.inference_mode():
        for rows in (2, 4):  # the warm-up
            module(batch(rows), scale)
        assert router.seal() == {"mixer": [2, 4]}
        compiled_before = counters["frames"]["ok"]

        def check(x: torch.Tensor) -> None:
            expected = router.eager(x, scale)["sample"]
            assert torch.allclose(module(x, scale)["sample"], expected, atol=1e-6)

        check(batch(4))
        assert router.calls == {"compiled": 1}
        check(batch(10))  # 4 + 4 + 2, not padded to 12
        assert router.calls["split"] == 1
        check(batch(3))  # 2 + 1 cannot be made: uncompiled, at once
        check(batch(2, side=16))  # an image size that was not warmed up
        assert router.calls["eager"] == 2
        module.gain = 2.0  # the compiled code's guard fails: it would compile again
        check(batch(4))
        assert router.calls["eager"] == 3
        out = module(batch(6), scale, return_dict=False)  # another output type: a tuple, split too
        assert isinstance(out, tuple) and out[0].shape[0] == 6
        # A module of the same kind loaded later (a VAE file) routes by the warm-up at once,
        # through the graphs already compiled: torch guards on shapes, not on the module.
        later.adopt()
        x = batch(4)
        assert torch.allclose(other(x, scale)["sample"], later.eager(x, scale)["sample"], atol=1e-6)
        assert later.calls == {"compiled": 1}
    assert counters["frames"]["ok"] == compiled_before, "nothing compiled after the warm-up"


def test_plan_splits_a_batch_into_warmed_up_sizes_largest_first() -> None:
    from sbrender.buckets import plan

    assert plan(5, [1, 2, 4]) == [4, 1]
    assert plan(16, [1, 8]) == [8, 8]
    assert plan(7, [2, 4]) is None
    assert plan(8, [8]) == [8]


def _host_bundle(path: Path, **host: str) -> Path:
    from sbrender import compilecache

    here = dataclasses.asdict(compilecache.host("cpu"))
    header = {"format": compilecache.FORMAT, "host": {**here, **host}, "created": 0.0, "compile": "default",
              "batch_sizes": [1], "artifacts": {}}
    path.write_bytes(compilecache.pack(header, b"not torch's bytes"))
    return path


def test_import_refuses_a_bundle_of_another_torch_or_gpu_and_a_file_that_is_no_bundle(tmp_path: Path) -> None:
    env = {**daemon_env(tmp_path / "cache"), "SBRENDER_DEVICE": "cpu"}
    bundle = _host_bundle(tmp_path / "h100.sbcc", torch="2.99.0+cu130", device="NVIDIA H100 80GB HBM3",
                          capability="sm_90")
    proc = sbrender("compile-cache", "import", str(bundle), env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "compiled with torch 2.99.0+cu130" in proc.stderr and "NVIDIA H100 80GB HBM3 (sm_90)" in proc.stderr
    assert "device NVIDIA H100 80GB HBM3 (here: cpu " in proc.stderr
    assert not list((tmp_path / "cache").rglob("bundle.sbcc")), "nothing imported"
    (tmp_path / "notes.txt").write_text("hello")
    proc = sbrender("compile-cache", "import", str(tmp_path / "notes.txt"), env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "is not an sbrender compile-cache bundle" in proc.stderr
    proc = sbrender("compile-cache", "export", str(tmp_path / "out.sbcc"), env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "no compile-cache bundle for this host" in proc.stderr
    assert not (tmp_path / "out.sbcc").exists()


@pytest.mark.slow
def test_a_restarted_daemon_compiles_nothing_and_a_bundle_fills_a_fresh_cache(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real `sbrender run` processes, one after the other, on one cache folder:
    the second finds everything in the caches (torch's own counters, in its
    "compiled" log line). Its private temp folder, as under the unit's
    PrivateTmp, holds none of torch's caches."""
    from sbrender.models import BUILTINS, ensure_builtin

    cache = tmp_path / "cache"
    ensure_builtin(BUILTINS["tiny-random"], cache)
    (tmp_path / "tmp").mkdir()
    env = daemon_env(cache, SBRENDER_PERF_COMPILE="default", TMPDIR=str(tmp_path / "tmp"))

    def start(spool: Spool) -> tuple[DaemonProcess, dict[str, Any]]:
        daemon = DaemonProcess(spool, env)
        daemon.wait_ready(timeout=COLD_COMPILE_TIMEOUT_S)
        return daemon, daemon.events("compiled")[0]

    first, cold = start(Spool(tmp_path / "spool"))
    assert first.stop() == 0
    # The UNet at 2 rows (one image with CFG) and 1 row (CFG 1: LCM, turbo), and the VAE decoder.
    assert cold["warm"] is False and cold["fxgraph_misses"] == 3, cold
    assert cold["bundle"] == "saved" and cold["batch_sizes"] == [1]
    assert cold["rows"] == {"unet": [1, 2], "vae decode": [1]}

    spool = Spool(tmp_path / "spool")
    second, warm = start(spool)
    try:
        assert warm["warm"] is True, warm
        assert (warm["fxgraph_misses"], warm["aot_autograd_misses"]) == (0, 0), warm
        assert warm["fxgraph_hits"] == 3 and warm["aot_autograd_hits"] == 3, warm
        assert second.events("compile cache")[0]["bundle"] == "held", "its own bundle is not applied again"
        # The warmed-up size runs compiled; another size runs uncompiled at once, and says so.
        spool.drop("compiled.json", {"prompt": "a lighthouse", "seed": 1})
        spool.drop("other.json", {"prompt": "a lighthouse", "seed": 1, "width": 96, "height": 96})
        for job_id in ("compiled", "other"):
            result = spool.result(job_id)
            assert result["status"] == "succeeded", result
            assert result["perf"]["compile_buckets"] == [1]
        eager = second.events("compiled unet: not warmed up: runs uncompiled")
        assert len(eager) == 1 and eager[0]["rows"] == 2, second.lines()[-10:]
    finally:
        assert second.stop() == 0

    folder = next((cache / "compile").iterdir())
    assert (folder / "inductor" / "fxgraph").is_dir() and (folder / "bundle.sbcc").is_file()
    leftovers = [p.name for p in (tmp_path / "tmp").glob("torchinductor_*/*") if p.name != "precompiled_headers"]
    assert leftovers == [], "torch's caches went to the temp folder"

    # The bundle, exported, imported into an empty cache folder and applied there as
    # a start does it: torch writes the FX graphs and AOTAutograd entries into the
    # new caches. (A daemon start on them is not timed here: on a CPU the bundle
    # holds the generated C++, which the compiler builds again; GPU kernels are in it.)
    bundle = tmp_path / "host.sbcc"
    sbrender("compile-cache", "export", str(bundle), env=env, cwd=tmp_path, check=True)
    fresh = tmp_path / "fresh"
    env = {**env, "SBRENDER_CACHE": str(fresh)}
    proc = sbrender("compile-cache", "import", str(bundle), env=env, cwd=tmp_path, check=True)
    assert "applied at the daemon's next start" in proc.stdout
    from sbrender import compilecache

    target = compilecache.folder("", fresh, "cpu")
    assert target is not None and target.bundle.read_bytes() == bundle.read_bytes()
    for name, _ in compilecache.ENV_FOLDERS:
        monkeypatch.setenv(name, "unset")  # restored after the test: use() points them at the new folder
    target.use()
    assert target.load_bundle() == {"bundle": "applied", "artifacts": {"aot_autograd": 3, "inductor": 3}}
    assert len(list((target.path / "inductor" / "fxgraph").rglob("*"))) >= 2
    assert len(list((target.path / "inductor" / "aotautograd").rglob("*"))) >= 2
    assert target.load_bundle() == {"bundle": "held"}


@pytest.mark.slow
def test_the_gpu_window_script_runs_every_part_and_notes_a_part_that_fails(tmp_path: Path) -> None:
    """`gpu-window.sh --cpu-dry-run` with compiling off (the compiled starts are
    the test above): every part runs and reports; the bundle part, with no
    bundle to export, is noted as failed and the bench still runs after it."""
    import os
    import subprocess

    script = Path(__file__).resolve().parent.parent / "examples" / "bench" / "gpu-window.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBRENDER_")}
    env.update(OUT=str(out), WORK=str(tmp_path / "work"), COMPILE="off", BUDGET_S="600",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "--cpu-dry-run"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stderr + (out / "run.log").read_text()[-3000:]  # the bundle part failed
    report = json.loads((out / "report.json").read_text())
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["gpu"] is None
    for label in ("cold", "warm"):
        assert report[f"start_{label}"]["ready_s"] > 0 and report[f"start_{label}"]["exit"] == 0
    assert report["bench"]["b1"]["images_per_s"] > 0 and report["bench"]["b1"]["calls"] == 3
    profile = report["profile"]["b1"]
    assert profile["unet_rows"] == 2 and profile["kernels_seen"] > 0 and profile["groups_ms"]
    text = (out / "report.md").read_text()
    assert "part bundle: **failed (exit 1)**" in text and "part bench: done" in text
    assert "no compile-cache bundle for this host" in (out / "run.log").read_text()


def test_compile_buckets_read_as_a_list_or_text_and_bad_sizes_are_refused() -> None:
    from sbrender.errors import ConfigError

    def read(value: Any) -> Any:
        return load_settings(None, env={}, overrides={"perf.compile_buckets": value})["perf.compile_buckets"]

    assert read("8, 1,16") == [1, 8, 16] and read([16, 8]) == [8, 16] and read("auto") == []
    with pytest.raises(ConfigError, match="perf.compile_buckets.*batch sizes from 1 to 64"):
        read("1,0")
    with pytest.raises(ConfigError, match="perf.compile_buckets"):
        read("eight")


def test_a_damaged_bundle_is_not_used_and_the_start_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from sbrender import compilecache, speedups

    for name, _ in compilecache.ENV_FOLDERS:
        monkeypatch.setenv(name, "unset")
    for key in ("recompile_limit", "fail_on_recompile_limit_hit"):  # set by a start; restored after this test
        monkeypatch.setattr(torch._dynamo.config, key, getattr(torch._dynamo.config, key))
    settings = load_settings(None, env={}, overrides={"cache": str(tmp_path), "perf.compile": "default"})
    folder = compilecache.folder("", tmp_path, "cpu")
    assert folder is not None
    folder.path.mkdir(parents=True)
    folder.bundle.write_bytes(b"half a zip")
    with capture_logs() as logs:
        speedups._prepare_compile(settings, "cpu")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder.path / "inductor")
    line = next(entry for entry in logs if entry["event"] == "compile cache")
    assert line["bundle"] == "not used" and "is not an sbrender compile-cache bundle" in line["error"]
