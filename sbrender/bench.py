"""``sbrender bench``: the same jobs as a plain diffusers loop and through the daemon.

One process, one loaded model, one run: (a) the loop every user could write
(``pipe(...)`` then ``image.save(...)``, model already loaded), batched too when
asked; (b) the real ``Daemon`` (watcher, queue, claims, writer thread, result
JSONs, fsyncs) in the main thread, as ``sbrender run`` runs it, fed from another
thread into a fresh spool, sharing the warm pipeline so both sides use the same
weights, kernels and compiled graphs. Each side runs ``rounds`` times, the two
taking turns to go first. Then a latency phase: jobs dropped one at a time into
an idle daemon. Every figure that matters is a ratio of two numbers taken in
this one run. Last, a LoRA phase: switching between two LoRA sets already
loaded, against one denoising step.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import Client
from .config import Settings
from .jobs import Job
from .results import parse_iso

FEEDER_POLL_S = 0.5  # how often the bench's own waiter looks for results


@dataclasses.dataclass(frozen=True)
class Plan:
    jobs: int = 16
    width: int = 64
    height: int = 64
    steps: int = 28
    batch_size: int = 4  # 1: no batched runs
    latency_jobs: int = 10
    lora_switches: int = 20  # LoRA phase: switches timed between two loaded sets; 0: no LoRA phase
    rounds: int = 4  # plain loop and daemon taking turns to go first: an even count balances drift
    sampler: str = "DPM++ 2M Karras"
    guidance_scale: float = 7.0
    # Each round's prompts are new to the daemon: its prompt cache must not make a
    # repeated round look faster than the plain loop, which encodes every prompt.
    take: int = 0

    def job(self, k: int) -> Job:
        prompt = f"a lighthouse on a cliff at dusk, study {k}" + (f", take {self.take}" if self.take else "")
        return Job(id=f"bench-{k:05d}", prompt=prompt, negative_prompt="",
                   steps=self.steps, guidance_scale=self.guidance_scale, width=self.width, height=self.height,
                   seed=1000 + k, count=1, sampler=self.sampler, priority=0)


class Preloaded:
    """The bench's loaded renderer, handed to the daemon as if it loaded it."""

    def __init__(self, renderer: Any, on_render: Callable[[float, float, int], None]) -> None:
        self.renderer = renderer
        self.on_render = on_render

    def load(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return self.renderer.describe()

    def batch_key(self, entry: Any) -> Any:
        return self.renderer.batch_key(entry)

    def render(self, job: Job, seeds: list[int], on_step: Any = None) -> Any:
        return self._timed(lambda: self.renderer.render(job, seeds, on_step), len(seeds))

    def render_batch(self, items: list[tuple[Job, list[int]]], on_step: Any = None) -> Any:
        return self._timed(lambda: self.renderer.render_batch(items, on_step), sum(len(s) for _, s in items))

    def _timed(self, call: Callable[[], Any], images: int) -> Any:
        start = time.perf_counter()
        out = call()
        self.on_render(start, time.perf_counter(), images)
        return out


def _sync(renderer: Any) -> None:
    if renderer.device == "cuda":
        import torch

        torch.cuda.synchronize()


def plain_loop(renderer: Any, jobs: list[Job], batch: int, folder: Path) -> float:
    """What a user writes: load once, call the pipeline, save each PNG. Seconds taken."""
    import torch

    pipe = renderer.pipe
    renderer._use_sampler(jobs[0].sampler, jobs[0].scheduler)
    folder.mkdir(parents=True, exist_ok=True)
    _sync(renderer)
    start = time.perf_counter()
    for first in range(0, len(jobs), batch):
        chunk = jobs[first:first + batch]
        with torch.inference_mode():  # as the daemon renders: the same compiled graphs serve both
            images = pipe(prompt=[j.prompt for j in chunk], num_inference_steps=chunk[0].steps,
                          guidance_scale=chunk[0].guidance_scale, width=chunk[0].width, height=chunk[0].height,
                          generator=[torch.Generator("cpu").manual_seed(j.seed or 0) for j in chunk]).images
        for job, image in zip(chunk, images):
            image.save(folder / f"{job.id}.png")
    return time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50_ms": round(at(0.5) * 1000, 2), "p90_ms": round(at(0.9) * 1000, 2),
            "p99_ms": round(at(0.99) * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}


class DaemonRun:
    """A real daemon on a fresh spool, over the preloaded renderer. It runs in the
    calling thread, as ``sbrender run`` does (compiled graphs and CUDA graph trees
    are per thread); the jobs are fed and awaited from another."""

    def __init__(self, settings: Settings, renderer: Any, root: Path, batch: int) -> None:
        from .service import Service

        values = {**settings.values, "inbox": str(root / "inbox"), "outbox": str(root / "outbox"),
                  "state": str(root / "state"), "metrics_dir": "off", "perf.batch_size": batch}
        self.settings = dataclasses.replace(settings, values=values)
        self.spans: list[tuple[float, float, int]] = []
        self.daemon = Service(self.settings, Preloaded(renderer, lambda a, b, n: self.spans.append((a, b, n))))
        self.client = Client.from_settings(self.settings)
        self.error: BaseException | None = None
        self.started = 0.0  # time.time() when the daemon was started

    def serve(self, feed: Callable[[DaemonRun], Any]) -> Any:
        """Run the daemon here until ``feed(self)``, in a thread, is done; its value."""
        out: dict[str, Any] = {}

        def feeder() -> None:
            try:
                self.daemon.ready.wait()
                if self.error is None:
                    out["value"] = feed(self)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                out["error"] = err
            finally:
                self.daemon.stop()

        thread = threading.Thread(target=feeder, name="bench-feeder", daemon=True)
        thread.start()
        try:
            self.started = time.time()
            self.daemon.run()
        except BaseException as err:
            self.error = err
            self.daemon.ready.set()
            raise
        finally:
            thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def submit(self, job: Job) -> tuple[str, float]:
        """One job through ``Client.submit`` (validate, temp file, fsync, rename);
        its id and the time the call began. Not the time it returned: a daemon
        may start the render before the submit's last fsync is back."""
        submitted = time.time()
        job_id = self.client.submit(job.prompt, job_id=job.id, **_fields(job))
        return job_id, submitted

    def queue_all(self, jobs: list[Job]) -> list[str]:
        """Many jobs, through ``Client.submit``, before the daemon starts: a queue
        that filled faster than it renders. Each batch then takes as many jobs as
        it may from the first call on. They are given the settle time that files
        found at start wait (they come with no watcher events)."""
        self.client.inbox.mkdir(parents=True, exist_ok=True)
        ids = [self.submit(job)[0] for job in jobs]
        time.sleep(self.settings["watch.settle_seconds"] + 0.05)
        return ids

    def wait_all(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Results by id, read as they appear; the time each was first seen."""
        results: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(ids):
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(results)} of {len(ids)} results after {timeout:.0f} s")
            for job_id in ids:  # in queue order: stop at the first not yet there
                if job_id in results:
                    continue
                if (result := self.client.result(job_id)) is None:
                    break
                # The result's own clock (ms), so that polling gently costs no precision.
                result["_seen"] = parse_iso(result["timings"]["finished_at"])
                results[job_id] = result
            # The daemon shares this process, where a real client does not: each look
            # takes the GIL from the render thread. Poll gently; each result carries
            # its own finish time to the ms.
            time.sleep(FEEDER_POLL_S)
        bad = [r["id"] for r in results.values() if r["status"] != "succeeded"]
        if bad:
            raise RuntimeError(f"bench jobs failed: {bad[:3]} ({results[bad[0]].get('error')})")
        return results


def _fields(job: Job) -> dict[str, Any]:
    return {"steps": job.steps, "guidance_scale": job.guidance_scale, "width": job.width, "height": job.height,
            "seed": job.seed, "sampler": job.sampler, "scheduler": job.scheduler}


def _idle(rounds: list[list[tuple[float, float, int]]]) -> dict[str, Any]:
    """The renderer's idle time between consecutive pipeline calls, over the
    daemon runs of every round (each ``(start, end, images)`` spans)."""
    gaps: list[float] = []
    busy = wall = 0.0
    calls = 0
    for spans in rounds:
        ordered = sorted(spans)
        gaps += [b[0] - a[1] for a, b in zip(ordered, ordered[1:])]
        busy += sum(end - start for start, end, _ in ordered)
        wall += ordered[-1][1] - ordered[0][0] if ordered else 0.0
        calls += len(ordered)
    return {"calls": calls, "gap": _percentiles(gaps), "idle_fraction": round(1 - busy / wall, 5) if wall else 0.0,
            "mean_gap_ms": round(statistics.fmean(gaps) * 1000, 3) if gaps else 0.0}


def daemon_phase(settings: Settings, renderer: Any, plan: Plan, batch: int, root: Path,
                 timeout: float) -> dict[str, Any]:
    """One daemon run of the plan's jobs, all queued when it starts: its seconds,
    the renderer's call spans, each job's start-to-result and write seconds; then
    the latency phase when the plan asks for one."""
    jobs = [plan.job(k) for k in range(plan.jobs)]

    def feed(run: DaemonRun) -> dict[str, Any]:
        results = run.wait_all(ids, timeout)
        # From the daemon's start (its scan of the full inbox included) to the last
        # result's finish time, stamped as its images are written.
        elapsed = max(r["_seen"] for r in results.values()) - run.started
        spans = list(run.spans)
        return {"seconds": elapsed, "spans": spans,
                "queued_start_to_result": [r["_seen"] - run.started for r in results.values()],
                "write_s": [r["timings"]["write_s"] for r in results.values()],
                "latency": _latency_phase(run, plan) if plan.latency_jobs else {}}

    run = DaemonRun(settings, renderer, root, batch)
    _sync(renderer)
    ids = run.queue_all(jobs)
    return run.serve(feed)


def _daemon_row(batch: int, jobs: int, runs: list[dict[str, Any]], plain_s: list[float]) -> dict[str, Any]:
    """The daemon's figures over every round; the latency phase is the last round's."""
    daemon_s = [r["seconds"] for r in runs]
    return {"batch_size": batch, **_mean_row(jobs, daemon_s),
            "round_ratios": [round(p / d, 4) for p, d in zip(plain_s, daemon_s)],
            "renderer_idle": _idle([r["spans"] for r in runs]),
            "queued_start_to_result": _percentiles([x for r in runs for x in r["queued_start_to_result"]]),
            "write_s": _percentiles([x for r in runs for x in r["write_s"]]),
            "latency_one_at_a_time": runs[-1]["latency"]}


def _latency_phase(run: DaemonRun, plan: Plan) -> dict[str, Any]:
    """Jobs dropped one at a time into an idle daemon: how soon it starts, how soon
    the result is there."""
    to_start, to_result = [], []
    for k in range(plan.latency_jobs):
        before = len(run.spans)
        job = dataclasses.replace(plan.job(plan.jobs + k), id=f"latency-{k:04d}")
        time.sleep(0.05)  # idle, waiting on the watcher, as in real use
        job_id, dropped = run.submit(job)
        result = run.wait_all([job_id], 600)[job_id]
        started = run.spans[before][0]  # perf_counter: convert via the offset below
        to_start.append(started - (dropped - _offset()))
        to_result.append(result["_seen"] - dropped)
    return {"drop_to_render_start": _percentiles(to_start), "drop_to_result": _percentiles(to_result)}


def _offset() -> float:
    """time.time() minus time.perf_counter(), to put both clocks on one axis."""
    return time.time() - time.perf_counter()


def write_bench_loras(renderer: Any, folder: Path, rank: int = 8) -> list[str]:
    """Two kohya-format LoRA files for the loaded model, with random layers where a
    kohya SD1 LoRA has them (every attention and feed-forward layer of the UNet's
    transformer blocks, every layer of the text encoder); their names."""
    import torch
    from safetensors.torch import save_file

    from .conditioning import text_model

    names = []
    for k in range(2):
        gen = torch.Generator().manual_seed(k)
        tensors: dict[str, torch.Tensor] = {}
        models = (("lora_unet_", renderer._adapters.unet, ".transformer_blocks."),
                  ("lora_te_text_model_", text_model(renderer._text_encoder), ".layers."))
        for prefix, model, inside in models:
            for name, module in model.named_modules():
                if inside not in name or not isinstance(module, torch.nn.Linear):
                    continue
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = 0.01 * torch.randn(rank, module.in_features, generator=gen)
                tensors[f"{key}.lora_up.weight"] = 0.01 * torch.randn(module.out_features, rank, generator=gen)
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        folder.mkdir(parents=True, exist_ok=True)
        half = {key: v.to(torch.float16).contiguous() for key, v in tensors.items()}  # as civitai ships them
        save_file(half, str(folder / f"bench{k}.safetensors"))
        names.append(f"bench{k}")
    return names


def lora_phase(settings: Settings, renderer: Any, plan: Plan, folder: Path) -> dict[str, Any]:
    """The time to switch between two LoRA sets already loaded (the renderer's own
    ``_use_loras``: set_adapters on the UNet and the text encoder), as a ratio to
    one denoising step of the plan's job; and a step's time before any LoRA was
    loaded and after, with adapters off (peft's wrappers stay in the layers)."""
    names = write_bench_loras(renderer, folder)
    renderer.settings = dataclasses.replace(renderer.settings, values={**renderer.settings.values,
                                                                       "loras_dir": str(folder)})
    renderer._loras = None
    first, second = (dataclasses.replace(plan.job(0), prompt=f"a lighthouse <lora:{names[0]}:0.8>"),
                     dataclasses.replace(plan.job(0), prompt=f"a lighthouse <lora:{names[0]}:0.3> "
                                                             f"<lora:{names[1]}:0.6:0.9>"))
    before = _step_s(renderer, plan.job(0))
    for job in (first, second):  # loaded once, outside the timing
        renderer._use_loras(job)
    switches = []
    for k in range(plan.lora_switches):
        _sync(renderer)
        start = time.perf_counter()
        renderer._use_loras(second if k % 2 == 0 else first)
        _sync(renderer)
        switches.append(time.perf_counter() - start)
    with_lora = _step_s(renderer, first)
    renderer._use_loras(plan.job(0))  # adapters off, as for a job without LoRAs
    after = _step_s(renderer, plan.job(0))
    switch = statistics.median(switches)
    return {"switch_ms": round(switch * 1000, 3), "switches": len(switches),
            "step_ms": round(after * 1000, 3), "switch/step": round(switch / after, 4),
            "step_ms_before_any_lora": round(before * 1000, 3), "step_ms_with_lora": round(with_lora * 1000, 3),
            "step_after/step_before": round(after / before, 4)}


def _step_s(renderer: Any, job: Job) -> float:
    """One denoising step of ``job`` (median over its steps, from the step callback)."""
    stamps: list[float] = []

    def on_step(step: int, steps: int) -> bool:
        _sync(renderer)
        stamps.append(time.perf_counter())
        return False

    renderer.render(dataclasses.replace(job, steps=max(job.steps, 3)), [job.seed or 0], on_step)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def disk_probe(folder: Path) -> dict[str, float]:
    """What one durable write costs where the bench spools: a 1 MiB file and a
    small one, each written and fsynced (medians of 5, milliseconds)."""
    out = {}
    for label, size in (("fsync_1mib_ms", 1 << 20), ("fsync_1kib_ms", 1 << 10)):
        times = []
        for k in range(5):
            path = folder / f".probe-{k}"
            start = time.perf_counter()
            with open(path, "wb") as f:
                f.write(os.urandom(size))
                f.flush()
                os.fsync(f.fileno())
            times.append(time.perf_counter() - start)
            path.unlink()
        out[label] = round(statistics.median(times) * 1000, 2)
    return out


def run(settings: Settings, plan: Plan, timeout: float = 3600.0, spool_dir: Path | None = None,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    from .pipeline import DiffusersRenderer

    batches = sorted({1, plan.batch_size})
    values = {**settings.values, "perf.batch_size": max(batches)}
    settings = dataclasses.replace(settings, values=values)
    renderer = DiffusersRenderer(settings)
    say(f"loading {settings.model} on {renderer.device} ({renderer.dtype}) ...")
    load_s = renderer.load()
    jobs = [plan.job(k) for k in range(plan.jobs)]
    with tempfile.TemporaryDirectory(prefix="sbrender-bench-", dir=spool_dir) as scratch:
        root = Path(scratch)
        say("warm-up ...")
        for batch in batches:
            plain_loop(renderer, jobs[:batch], batch, root / "warm")
        report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "model_load_s": round(load_s, 3),
                                  "renderer": renderer.describe(), "device_name": _device_name(renderer),
                                  "spool": {"folder": str(root.parent), **disk_probe(root)},
                                  "plain": {}, "daemon": {}}
        takes = itertools.count(1)
        for batch in batches:
            plain_s, daemon_runs = [], []
            for k in range(plan.rounds):
                round_plan = dataclasses.replace(plan, take=next(takes))
                jobs = [round_plan.job(j) for j in range(plan.jobs)]
                # The two sides take turns to go first (plain, daemon | daemon, plain | ...)
                # and count as their means: a machine that drifts (clocks, neighbours)
                # then biases neither. The latency phase runs in the last round only.
                for side in ("plain", "daemon") if k % 2 == 0 else ("daemon", "plain"):
                    say(f"{side}, batch {batch}, round {k + 1} of {plan.rounds} ...")
                    if side == "plain":
                        plain_s.append(plain_loop(renderer, jobs, batch, root / f"plain-{batch}-{k}"))
                        continue
                    daemon_plan = round_plan if k == plan.rounds - 1 else dataclasses.replace(round_plan, latency_jobs=0)
                    daemon_runs.append(daemon_phase(settings, renderer, daemon_plan, batch,
                                                    root / f"daemon-{batch}-{k}", timeout))
            report["plain"][str(batch)] = _mean_row(plan.jobs, plain_s)
            report["daemon"][str(batch)] = _daemon_row(batch, plan.jobs, daemon_runs, plain_s)
        if plan.lora_switches:  # last: loading a LoRA leaves peft's wrappers in the layers
            say("LoRA switches ...")
            report["lora"] = lora_phase(settings, renderer, plan, root / "loras")
    base = report["plain"]["1"]["images_per_s"]
    report["ratios"] = {
        **{f"daemon_b{b}/plain_b1": round(report["daemon"][str(b)]["images_per_s"] / base, 4) for b in batches},
        **{f"daemon_b{b}/plain_b{b}": round(report["daemon"][str(b)]["images_per_s"]
                                            / report["plain"][str(b)]["images_per_s"], 4) for b in batches},
        **{f"plain_b{b}/plain_b1": round(report["plain"][str(b)]["images_per_s"] / base, 4) for b in batches if b > 1},
    }
    return report


def _mean_row(jobs: int, seconds: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(seconds)
    return {"seconds": round(mean, 4), "images_per_s": round(jobs / mean, 4), "runs_s": [round(s, 4) for s in seconds]}


def _device_name(renderer: Any) -> str:
    if renderer.device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"{platform.processor() or platform.machine()} CPU"


def table(report: dict[str, Any]) -> str:
    """The report as the few lines a person reads."""
    plan = report["plan"]
    lines = [f"{report['renderer']['model']['name']} on {report['device_name']} ({report['renderer']['dtype']}), "
             f"{plan['width']}x{plan['height']}, {plan['steps']} steps, {plan['jobs']} jobs, "
             f"perf {report['renderer'].get('perf', {})}",
             f"spool on {report['spool']['folder']}: write+fsync 1 MiB {report['spool']['fsync_1mib_ms']} ms, "
             f"1 KiB {report['spool']['fsync_1kib_ms']} ms",
             f"{'run':<18}{'images/s':>10}{'s/image':>10}{'idle gap p50':>14}{'idle %':>8}"]
    for kind in ("plain", "daemon"):
        for batch, row in report[kind].items():
            idle = row.get("renderer_idle", {})
            gap = idle.get("gap", {}).get("p50_ms")
            gap_text = "" if gap is None else f"{gap:.1f} ms"
            idle_text = f"{100 * idle['idle_fraction']:.2f}" if idle else ""
            name = f"{kind} batch {batch}"
            lines.append(f"{name:<18}{row['images_per_s']:>10.3f}{1 / row['images_per_s']:>10.3f}"
                         f"{gap_text:>14}{idle_text:>8}")
    for batch, row in report["daemon"].items():
        lat = row.get("latency_one_at_a_time", {})
        if lat:
            s, r = lat["drop_to_render_start"], lat["drop_to_result"]
            lines.append(f"daemon batch {batch}: drop to render start p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms; "
                         f"drop to result p50 {r['p50_ms']} ms")
    for batch, row in report["daemon"].items():
        if len(row.get("round_ratios", [])) > 1:  # how far single runs scatter on this machine
            # The median of the paired rounds too: one round slowed by a neighbour moves the
            # mean of a short run by more than the daemon's whole cost.
            lines.append(f"daemon/plain by round, batch {batch}: " + " ".join(f"{r:.3f}" for r in row["round_ratios"])
                         + f" (median {statistics.median(row['round_ratios']):.3f})")
    lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items()))
    if report.get("lora"):
        lo = report["lora"]
        lines.append(f"LoRA: switching between two loaded sets {lo['switch_ms']} ms = {lo['switch/step']:.3f} of a "
                     f"denoising step ({lo['step_ms']} ms); a step {lo['step_ms_before_any_lora']} ms before any "
                     f"LoRA was loaded, {lo['step_ms_with_lora']} ms with one, {lo['step_ms']} ms after with "
                     f"adapters off")
    return "\n".join(lines)
