"""The HTTP front's cost: what `sbrender serve` adds to a job, and what 200
waiting clients cost it.

    .venv/bin/python examples/bench/front.py [--jobs 30] [--clients 200] [--report front.json]

Starts a real daemon (`sbrender run`, tiny-random, 64x64, 2 steps: a render of
tens of milliseconds, so that the front's own time is not lost in it) and a real
`sbrender serve` on a fresh spool, then:

1. Latency: the same small job, round after round, through the torch-free Client
   (submit, then wait; its default 0.1 s poll, and a 5 ms poll) and through the
   front (POST /v1/jobs with Prefer: wait; POST /sdapi/v1/txt2img), interleaved so
   that all see the same machine. Prints the p50 of each and the front's added
   p50 against the Client's.
2. Concurrency: N clients post txt2img at once (each its own seed) and wait; the
   server's resident memory is sampled against its idle value, /health is timed
   all along (p50, p99), and every answer is checked to hold its own seed's image.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sbrender.client import Client
from sbrender.models import BUILTINS, ensure_builtin

JOB = {"width": 64, "height": 64, "steps": 2}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(root: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = open(root / f"{args[0]}.log", "w")
    spool = ["--inbox", str(root / "inbox"), "--outbox", str(root / "outbox"), "--state", str(root / "state")]
    return subprocess.Popen([sys.executable, "-m", "sbrender", *args, *spool], env=env, cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_log(path: Path, event: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == event:
                return data
        time.sleep(0.05)
    raise SystemExit(f"no {event!r} in {path} after {timeout} s:\n{path.read_text()[-2000:]}")


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ok(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text


def latency(url: str, client: Client, rounds: int) -> dict[str, Any]:
    ways: dict[str, list[float]] = {"client (0.1 s poll)": [], "client (5 ms poll)": [], "front /v1/jobs": [],
                                    "front /sdapi/v1/txt2img": []}
    with httpx.Client(base_url=url, timeout=120) as http:
        calls = {
            "client (0.1 s poll)": lambda n: client.wait(client.submit("bench", seed=n, **JOB), timeout=120),
            "client (5 ms poll)": lambda n: client.wait(client.submit("bench", seed=n, **JOB), timeout=120,
                                                        poll_s=0.005),
            "front /v1/jobs": lambda n: _ok(http.post("/v1/jobs", json={"prompt": "bench", "seed": n, **JOB},
                                                      headers={"Prefer": "wait=60"})),
            "front /sdapi/v1/txt2img": lambda n: _ok(http.post("/sdapi/v1/txt2img",
                                                               json={"prompt": "bench", "seed": n, **JOB})),
        }
        order = list(calls)
        for n in range(rounds + 2):  # the first two rounds warm up
            order = order[1:] + order[:1]  # each way takes each place in turn
            for way in order:
                time.sleep(0.3)  # the daemon idle again (its archiving done) before each job
                t = time.perf_counter()
                calls[way](n)
                if n >= 2:
                    ways[way].append(time.perf_counter() - t)
    p50 = {way: statistics.median(values) * 1000 for way, values in ways.items()}
    base = p50["client (5 ms poll)"]
    return {"rounds": rounds, "p50_ms": p50,
            "added_p50_ms_vs_client_5ms_poll": {w: v - base for w, v in p50.items() if w.startswith("front")},
            "added_p50_ms_vs_client_default": {w: v - p50["client (0.1 s poll)"] for w, v in p50.items()
                                               if w.startswith("front")}}


async def idle_health(url: str, n: int = 100) -> list[float]:
    """/health with nothing waiting: the baseline of the same machine, same run."""
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(n):
            t = time.perf_counter()
            (await http.get("/health")).raise_for_status()
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
    return times


async def crowd(url: str, pid: int, clients: int) -> dict[str, Any]:
    baseline = await idle_health(url)
    idle = rss_mb(pid)
    peak = idle
    health: list[float] = []
    done = asyncio.Event()

    async def watch_health() -> None:
        nonlocal peak
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while not done.is_set():
                t = time.perf_counter()
                r = await http.get("/health")
                health.append(time.perf_counter() - t)
                assert r.status_code == 200
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.02)

    async def one(http: httpx.AsyncClient, seed: int) -> tuple[int, str]:
        r = await http.post("/sdapi/v1/txt2img", json={"prompt": "crowd", "seed": seed, **JOB})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [seed], info["all_seeds"]
        return seed, hashlib.sha256(base64.b64decode(r.json()["images"][0])).hexdigest()

    watcher = asyncio.create_task(watch_health())
    t = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        answers = await asyncio.gather(*(one(http, 10_000 + k) for k in range(clients)))
    wall = time.perf_counter() - t
    done.set()
    await watcher
    images = {digest for _, digest in answers}
    return {"clients": clients, "wall_s": wall, "rss_idle_mb": idle, "rss_peak_mb": peak,
            "rss_added_mb": peak - idle, "health_requests": len(health),
            "health_p50_ms": p(health, 0.5) * 1000, "health_p99_ms": p(health, 0.99) * 1000,
            "health_idle_p50_ms": p(baseline, 0.5) * 1000, "health_idle_p99_ms": p(baseline, 0.99) * 1000,
            "answers": len(answers), "distinct_images": len(images),
            "each_its_own_seed": sorted(s for s, _ in answers) == list(range(10_000, 10_000 + clients))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="latency rounds")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sbrender-front-") as tmp:
        root = Path(tmp)
        (root / "inbox").mkdir()
        cache = root / "cache"
        ensure_builtin(BUILTINS["tiny-random"], cache)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SBRENDER_")}
        env.update(SBRENDER_MODEL="tiny-random", SBRENDER_CACHE=str(cache), SBRENDER_OFFLINE="true",
                   SBRENDER_LOG_FORMAT="json", SBRENDER_DEFAULTS_WIDTH="64", SBRENDER_DEFAULTS_HEIGHT="64",
                   SBRENDER_LOG_LEVEL="warning", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        daemon = start(root, {**env, "SBRENDER_LOG_LEVEL": "info"}, "run")
        server = start(root, {**env, "SBRENDER_LOG_LEVEL": "info"}, "serve", "--port", "0")
        try:
            url = wait_log(root / "serve.log", "serving")["url"]
            wait_log(root / "run.log", "ready")
            client = Client(root / "inbox", root / "outbox", root / "state")
            report = {"latency": latency(url, client, args.jobs)}
            report["crowd"] = asyncio.run(crowd(url, server.pid, args.clients))
        finally:
            for proc in (server, daemon):
                proc.terminate()
                proc.wait(timeout=60)
    lat, crowd_ = report["latency"], report["crowd"]
    print(f"latency, p50 over {lat['rounds']} rounds (ms):")
    for way, value in lat["p50_ms"].items():
        print(f"  {way:28} {value:8.1f}")
    for way, value in lat["added_p50_ms_vs_client_5ms_poll"].items():
        print(f"  added by {way:19} {value:+8.1f} vs the Client polling every 5 ms, "
              f"{lat['added_p50_ms_vs_client_default'][way]:+.1f} vs its default wait")
    print(f"{crowd_['clients']} clients at once: {crowd_['wall_s']:.1f} s; server RSS {crowd_['rss_idle_mb']:.1f} MB "
          f"idle, {crowd_['rss_peak_mb']:.1f} MB peak (+{crowd_['rss_added_mb']:.1f} MB); /health p50 "
          f"{crowd_['health_p50_ms']:.1f} ms, p99 {crowd_['health_p99_ms']:.1f} ms over "
          f"{crowd_['health_requests']} requests (idle: p50 {crowd_['health_idle_p50_ms']:.1f} ms, p99 "
          f"{crowd_['health_idle_p99_ms']:.1f} ms); {crowd_['distinct_images']} distinct images, each its own "
          f"seed: {crowd_['each_its_own_seed']}")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
