"""The parts of examples/bench/gpu-window.sh, one per subcommand; each adds its
findings to REPORT_DIR/report.json (and a section of report.md) as it goes, so
a part stopped by its time limit leaves what it measured.

  versions   GPU, driver, torch, CUDA, cuDNN, Triton, diffusers, sbrender
  model      build the model (sd15-random: once per cache)
  start      one real `sbrender run --once` on an empty spool: seconds to READY,
             and what it compiled (torch's cache counters, its "compiled" log line)
  bench      load in this process, then per compiled batch size: timed renders
             and one UNet step under torch.profiler, grouped by kernel kind

The settings come from SBRENDER_* variables (the shell script sets them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPORT: Path = Path(".")
# Kernel (or, on a CPU, operator) name -> group; first match wins.
KERNEL_GROUPS: tuple[tuple[str, str], ...] = (
    ("attention", r"fmha|flash|attention|sdpa|_mha|softmax"),
    ("normalization", r"group_norm|layer_norm|native_norm|norm_"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd|nchwtonhwc|nhwctonchw"),
    ("matmul", r"gemm|gemv|cublas|cutlass|xmma|matmul|addmm|\bmm\b|bmm|sm90_"),
    ("fused (triton)", r"^triton_"),
    ("copy, cast, pointwise", r"copy|cast|elementwise|vectorized|memcpy|memset|cat|fill|gelu|silu|mul|add|tanh"),
    ("other", r"."),
)


def record(part: str, data: dict[str, Any], text: str) -> None:
    """Merge ``data`` into report.json under ``part`` and append ``text`` to report.md."""
    path = REPORT / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault(part, {}).update(data)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    os.replace(temp, path)
    with open(REPORT / "report.md", "a") as f:
        f.write(text.rstrip() + "\n\n")


def settings() -> Any:
    from sbrender.config import load_settings

    return load_settings(None)


def versions(_: argparse.Namespace) -> None:
    import diffusers
    import torch

    import sbrender

    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                             "diffusers": diffusers.__version__, "sbrender": sbrender.__version__,
                             "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        found.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", multiprocessors=p.multi_processor_count,
                     gpu_memory_gib=round(p.total_memory / 2**30, 1))
        try:
            query = "name,driver_version,power.limit,clocks.max.sm,clocks.max.mem,memory.total"
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], text=True,
                                 capture_output=True, timeout=20).stdout.strip()
            found["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out.split(","))))
        except (OSError, subprocess.SubprocessError) as err:
            found["nvidia_smi"] = f"not run: {err}"
    else:
        found["gpu"] = None
    try:
        found["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True, capture_output=True,
                                      timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    record("versions", found, "## Versions\n\n" + "\n".join(f"- {k}: {v}" for k, v in found.items()))


def model(_: argparse.Namespace) -> None:
    from sbrender.models import BUILTINS, ensure_builtin

    s = settings()
    started = time.perf_counter()
    if s.model in BUILTINS:
        ensure_builtin(BUILTINS[s.model], s.cache)
    seconds = round(time.perf_counter() - started, 1)
    record("model", {"name": s.model, "seconds": seconds}, f"## Model\n\n{s.model} ready in {seconds} s")


def start(args: argparse.Namespace) -> None:
    """A real daemon start on an empty spool (`run --once` exits once ready and
    idle): seconds from the process's start to its READY line."""
    spool = Path(args.work) / f"spool-{args.label}"
    folders = [spool / name for name in ("inbox", "outbox", "state")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sbrender", "run", "--once", "--log-format", "json",
                             "--inbox", str(folders[0]), "--outbox", str(folders[1]), "--state", str(folders[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict[str, Any] = {"label": args.label}
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)  # into the run's log
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name == "model loaded":
            found["model_load_s"] = event.get("seconds")
        elif name in ("compiled", "compile cache"):
            found[name.replace(" ", "_")] = {k: v for k, v in event.items() if k not in ("event", "timestamp")}
        elif name == "ready":
            found["ready_s"] = round(time.perf_counter() - started, 2)
            record(f"start_{args.label}", found, _start_text(found))
    found["exit"] = proc.wait()
    record(f"start_{args.label}", found, f"(the {args.label} start's process exited {found['exit']})")


def _start_text(found: dict[str, Any]) -> str:
    compiled = found.get("compiled")
    if compiled is None:
        return (f"## Start: {found['label']}\n\nREADY after **{found['ready_s']} s** from the process's start "
                f"(model load {found.get('model_load_s')} s); nothing compiled (perf.compile off).")
    counts = ", ".join(f"{k} {compiled[k]}" for k in ("fxgraph_hits", "fxgraph_misses", "aot_autograd_hits",
                                                     "aot_autograd_misses") if k in compiled)
    return (f"## Start: {found['label']}\n\nREADY after **{found['ready_s']} s** from the process's start "
            f"(model load and warm-up {found.get('model_load_s')} s; compiling and warm-up "
            f"{compiled.get('seconds')} s). {compiled.get('start', '')}. Torch's counters: {counts}. "
            f"Bundle: {compiled.get('bundle')} ({compiled.get('bundle_bytes', 0) / 1e6:.1f} MB). "
            f"Cache: {found.get('compile_cache', {}).get('folder')} ({found.get('compile_cache', {}).get('bundle')}).")


def bench(args: argparse.Namespace) -> None:
    import torch

    from sbrender import speedups
    from sbrender.jobs import Job
    from sbrender.pipeline import DiffusersRenderer

    s = settings()
    deadline = time.monotonic() + args.seconds
    started = time.perf_counter()
    renderer = DiffusersRenderer(s)
    renderer.load()
    cuda = renderer.device == "cuda"
    record("bench", {"load_s": round(time.perf_counter() - started, 2), "perf": renderer.describe()["perf"],
                     "device": renderer.device, "dtype": str(renderer.dtype)},
           f"## Bench ({renderer.device}, {renderer.dtype})\n\nLoaded in this process in "
           f"{time.perf_counter() - started:.1f} s. Switches: {renderer.describe()['perf']}.")
    d = s.section("defaults")

    def jobs(count: int, salt: int) -> list[tuple[Job, list[int]]]:
        return [(Job(id=f"b{count}-{salt}-{k}", prompt=f"a lighthouse on a cliff at dusk, study {k}",
                     negative_prompt="", steps=d["steps"], guidance_scale=d["guidance_scale"], width=d["width"],
                     height=d["height"], seed=1000 + k, count=1, sampler=d["sampler"], scheduler=d["scheduler"],
                     priority=0), [1000 + k]) for k in range(count)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    captured: dict[str, Any] = {}
    hook = renderer.pipe.unet.register_forward_pre_hook(
        lambda module, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    for size in speedups.warm_up_counts(s):
        if time.monotonic() > deadline:
            record("bench", {f"b{size}": "skipped: out of time"}, f"- batch {size}: skipped, out of time")
            continue
        renderer.render_batch(jobs(size, 0))  # the first call after the warm-up records the VAE's graph
        runs = []
        for k in range(args.calls):
            if runs and time.monotonic() > deadline:
                break
            sync()
            t = time.perf_counter()
            renderer.render_batch(jobs(size, k + 1))
            sync()
            runs.append(time.perf_counter() - t)
        call_s = sum(runs) / len(runs)
        row = {"calls": len(runs), "s_per_call": round(call_s, 4), "s_per_image": round(call_s / size, 4),
               "images_per_s": round(size / call_s, 3), "runs_s": [round(r, 4) for r in runs]}
        if cuda:
            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record("bench", {f"b{size}": row}, f"- batch {size}: {row['s_per_image']} s/image, "
                                           f"{row['images_per_s']} images/s ({len(runs)} calls of {call_s:.3f} s)")
        if time.monotonic() < deadline:
            _profile_step(renderer.pipe.unet, captured, size, cuda)
    hook.remove()
    calls = {}
    for router in __import__("sbrender.buckets", fromlist=["routers"]).routers(renderer.pipe.unet, renderer.pipe.vae):
        calls[router.name] = dict(router.calls)
    record("bench", {"router_calls": calls}, f"Calls by path (compiled, split, eager): {calls}")


def _profile_step(unet: Any, captured: dict[str, Any], size: int, cuda: bool) -> None:
    """One UNet call with the arguments of the pipeline's last step (so it runs the
    same compiled graph), under torch.profiler; time by kernel group, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = captured["args"], captured["kwargs"]
    with torch.inference_mode():
        unet(*args, **kwargs)  # not timed: the profiler's own start-up
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                unet(*args, **kwargs)
            end.record()
            torch.cuda.synchronize()
            step_ms = start.elapsed_time(end) / 5
        else:
            t = time.perf_counter()
            unet(*args, **kwargs)
            step_ms = (time.perf_counter() - t) * 1000
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            unet(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        is_kernel = (str(event.device_type).endswith("CUDA")) if cuda else event.key.startswith(("aten::", "triton_",
                                                                                                  "cpp_fused"))
        if is_kernel and us > 0:
            kernels.append((event.key, us / 1000, event.count))
    total = sum(ms for _, ms, _ in kernels) or 1.0
    groups: dict[str, float] = {}
    for name, ms, _ in kernels:
        group = next(g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.IGNORECASE))
        groups[group] = groups.get(group, 0.0) + ms
    top = sorted(kernels, key=lambda k: -k[1])[:12]
    rows = {"unet_rows": int(args[0].shape[0]) if args else None, "step_ms": round(step_ms, 3),
            "kernel_ms": round(total, 3), "kernels_seen": len(kernels),
            "groups_ms": {g: round(ms, 3) for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "ms": round(ms, 3), "count": c} for n, ms, c in top]}
    table = "\n".join(f"| {g} | {ms:.2f} | {100 * ms / total:.1f} % |" for g, ms in
                      sorted(groups.items(), key=lambda kv: -kv[1]))
    tops = "\n".join(f"| {n[:90]} | {ms:.3f} | {c} |" for n, ms, c in top)
    record("profile", {f"b{size}": rows},
           f"### One UNet step at batch {size} ({rows['unet_rows']} rows with CFG): {step_ms:.2f} ms\n\n"
           f"{len(kernels)} {'kernels' if cuda else 'operators'}, {total:.2f} ms in them.\n\n"
           f"| group | ms | share |\n|---|---:|---:|\n{table}\n\n| top | ms | calls |\n|---|---:|---:|\n{tops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="folder of report.json and report.md")
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("versions").set_defaults(run=versions)
    sub.add_parser("model").set_defaults(run=model)
    p = sub.add_parser("start")
    p.add_argument("--label", required=True)
    p.add_argument("--work", required=True, help="folder for the spool")
    p.set_defaults(run=start)
    p = sub.add_parser("bench")
    p.add_argument("--calls", type=int, default=3, help="timed pipeline calls per batch size")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("PART_LIMIT", "140")) - 20,
                   help="stop starting new measurements after this (default: the part's limit less 20 s)")
    p.set_defaults(run=bench)
    args = parser.parse_args()
    global REPORT
    REPORT = Path(args.report)
    REPORT.mkdir(parents=True, exist_ok=True)
    args.run(args)


if __name__ == "__main__":
    main()
