"""The daemon against a large queue: does the work per job stay flat?

    .venv/bin/python examples/bench/scale.py --jobs 10000 [--report scale.json]

Fills a fresh spool's inbox with N job files, then runs the real daemon (queue,
watcher, claims, id reservations, writer thread, fsyncs, archiving) in this
process over a stand-in renderer that returns a flat 64x64 image at once, so
that what is timed is the daemon's own work per job, not a model. Reports:

- the daemon's cost per job over the first 100 jobs with N queued, against the
  same with 100 queued (the ratio should stay near 1: nothing per job looks at
  the whole queue);
- `sbrender jobs --json` and `sbrender status` wall times with N queued;
- resident memory after 100 and after 1000 jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from sbrender import logs
from sbrender.config import load_settings
from sbrender.service import Service
from sbrender.renderer import RenderOutput, call_key

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Flat:
    """A stand-in renderer: no model, a flat image per seed, at once."""

    def __init__(self) -> None:
        self.done: list[tuple[float, float]] = []  # (time, RSS MiB) after each job

    def load(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"model": {"name": "flat", "source": "stand-in"}, "device": "none", "dtype": "none"}

    batch_key = staticmethod(call_key)

    def render(self, job: Any, seeds: list[int], on_step: Any = None) -> RenderOutput:
        images = [Image.new("RGB", (job.width, job.height), (seed % 256, 80, 160)) for seed in seeds]
        self.done.append((time.perf_counter(), rss_mib()))
        return RenderOutput(images, seeds, {"name": "flat"}, {"inference_s": 0.0})


def fill(inbox: Path, n: int) -> None:
    now = time.time()
    for k in range(n):
        path = inbox / f"job-{k:06d}.json"
        path.write_text(json.dumps({"prompt": f"a queued job {k}", "seed": k, "width": 64, "height": 64,
                                    "steps": 1}))
        os.utime(path, (now - n + k, now - n + k))  # queue order = k


def cli_seconds(args: list[str], spool: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sbrender", *args, "--inbox", str(spool / "inbox"), "--outbox",
                    str(spool / "outbox"), "--state", str(spool / "state")], check=False, capture_output=True)
    return time.perf_counter() - start


def run(n: int, stop_after: int, root: Path) -> dict[str, Any]:
    spool = root / f"spool-{n}"
    settings = load_settings(None, env={}, overrides={
        "inbox": str(spool / "inbox"), "outbox": str(spool / "outbox"), "state": str(spool / "state"),
        "metrics_dir": "off", "watch.settle_seconds": 0.0, "model": "tiny-random"})
    for folder in ("inbox", "outbox", "state"):
        (spool / folder).mkdir(parents=True)
    fill(spool / "inbox", n)
    out: dict[str, Any] = {"queued": n}
    if n >= 1000:
        out["jobs_cli_s"] = round(cli_seconds(["jobs", "--json"], spool), 3)
        out["status_cli_s"] = round(cli_seconds(["status", "--json"], spool), 3)
    renderer = Flat()
    daemon = Service(settings, renderer)

    stop_after = min(stop_after, n)  # a smaller queue: stop when it is done

    def watch() -> None:
        while len(renderer.done) < stop_after and not daemon.should_exit.is_set():
            time.sleep(0.01)
        daemon.stop()

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    daemon.run()
    times = [start] + [t for t, _ in renderer.done]
    gaps = [b - a for a, b in zip(times[1:], times[2:101])]
    out["per_job_ms_first_100"] = {"median": round(statistics.median(gaps) * 1000, 3),
                                   "mean": round(statistics.fmean(gaps) * 1000, 3)}
    out["rss_mib"] = {str(k): round(renderer.done[k - 1][1], 1) for k in (100, 1000, 2000) if k <= len(renderer.done)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    logs.configure("json", "warning")  # a line per job would be timed too
    with tempfile.TemporaryDirectory(prefix="sbrender-scale-") as scratch:
        small = run(100, 100, Path(scratch))
        large = run(args.jobs, 2000, Path(scratch))
    report = {"small": small, "large": large,
              "per_job_ratio_large/small": round(large["per_job_ms_first_100"]["median"]
                                                 / small["per_job_ms_first_100"]["median"], 3)}
    if "1000" in large["rss_mib"]:
        report["rss_ratio_1000/100"] = round(large["rss_mib"]["1000"] / large["rss_mib"]["100"], 4)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"per job, first 100 jobs: {small['per_job_ms_first_100']['median']} ms with 100 queued, "
          f"{large['per_job_ms_first_100']['median']} ms with {args.jobs} queued "
          f"(ratio {report['per_job_ratio_large/small']}); means, the writer's back-pressure included: "
          f"{small['per_job_ms_first_100']['mean']} ms and {large['per_job_ms_first_100']['mean']} ms")
    print(f"with {args.jobs} queued: `sbrender jobs --json` {large.get('jobs_cli_s')} s, "
          f"`sbrender status --json` {large.get('status_cli_s')} s")
    print(f"RSS after 100 jobs {large['rss_mib'].get('100')} MiB, after 1000 {large['rss_mib'].get('1000')} MiB "
          f"(ratio {report.get('rss_ratio_1000/100')})")


if __name__ == "__main__":
    main()
