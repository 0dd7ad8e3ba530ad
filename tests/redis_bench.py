"""Dispatch on the Redis queue: jobs claimed and acknowledged per second by many
daemons' brokers (no render, no publishing), as a ratio to raw XREADGROUP + XACK
by as many processes against the same server in the same run. A benchmark, not
a test:

    python tests/redis_bench.py --jobs 20000 --daemons 16

Each broker process runs what a daemon's loop runs per job (refresh; cancelled:
the cancel requests; take: one script that reads and starts the first entry,
owner-checked; may_publish: a renewal; done: the fenced commit); the raw
processes only read and ack.

``--cpu N`` runs one broker loop over N more jobs in this process and prints
the CPU time a job costs, the client's (this process) and the server's
(redis-server's, from /proc): on a shared machine the rates above swing with
the neighbours' load, CPU seconds much less.

Then ``--latency N`` jobs are submitted one at a time (``Client.submit``) to an
idle daemon (the real service, in this process, over a stand-in renderer that
returns a flat image at once): the time from the submit's call to the render's
start, percentiles.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redis_server import RedisServer  # noqa: E402


def _broker_loop(url: str, root: str, ready: object, go: object) -> None:
    from sbrender.config import load_settings
    from sbrender.redisbroker import RedisBroker
    from sbrender.renderer import call_key

    settings = load_settings(env={}, overrides={"queue": url, "inbox": f"{root}/inbox", "outbox": f"{root}/outbox",
                                                "state": f"{root}/state", "watch.rescan_seconds": 3600})
    broker = RedisBroker(settings, threading.Event())
    broker.prepare()
    ready.release()  # type: ignore[attr-defined]
    go.wait()  # type: ignore[attr-defined]
    idle = 0
    while idle < 3:
        broker.refresh()
        broker.cancelled()  # the dispatcher asks at every turn
        takes = broker.take(1, call_key)
        if not takes:
            idle += 1
            time.sleep(0.01)
            continue
        idle = 0
        for take in takes:
            if broker.may_publish(take):
                broker.done(take, True, {"id": take.entry.id, "status": "succeeded"})


def _raw_loop(url: str, stream: str, ready: object, go: object) -> None:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    name = f"raw-{multiprocessing.current_process().pid}"
    ready.release()  # type: ignore[attr-defined]
    go.wait()  # type: ignore[attr-defined]
    while True:
        reply = client.xreadgroup("raw", name, {stream: ">"}, count=1)
        if not reply:
            return
        for _, items in reply:
            for eid, _ in items:
                client.xack(stream, "raw", eid)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_job(url: str, root: str, server_pid: int, jobs: int) -> tuple[float, float]:
    """(client, server) CPU seconds per job of one broker loop over ``jobs`` queued jobs."""
    from sbrender.config import load_settings
    from sbrender.redisbroker import RedisBroker
    from sbrender.redisqueue import RedisQueue
    from sbrender.renderer import call_key

    queue = RedisQueue(url)
    for k in range(jobs):
        queue.submit(f"c{k}", {"prompt": "bench"}, 0)
    settings = load_settings(env={}, overrides={"queue": url, "inbox": f"{root}/inbox", "outbox": f"{root}/outbox",
                                                "state": f"{root}/state", "watch.rescan_seconds": 3600})
    broker = RedisBroker(settings, threading.Event())
    broker.prepare()
    client0, server0, done = time.process_time(), _cpu_s(server_pid), 0
    while done < jobs:
        broker.refresh()
        broker.cancelled()
        takes = broker.take(1, call_key)
        if not takes:
            break
        for take in takes:
            if broker.may_publish(take):
                broker.done(take, True, {"id": take.entry.id, "status": "succeeded"})
                done += 1
    return (time.process_time() - client0) / max(done, 1), (_cpu_s(server_pid) - server0) / max(done, 1)


def _latency(url: str, root: Path, jobs: int) -> list[float]:
    """Seconds from ``Client.submit`` to the renderer's call, each job alone on an idle daemon."""
    from PIL import Image

    from sbrender import logs
    from sbrender.client import Client
    from sbrender.config import load_settings
    from sbrender.renderer import RenderOutput, call_key
    from sbrender.service import Service

    started: list[float] = []

    class Flat:
        batch_key = staticmethod(call_key)

        def load(self) -> float:
            return 0.0

        def describe(self) -> dict[str, object]:
            return {"model": {"name": "flat", "source": "stand-in"}, "device": "none", "dtype": "none"}

        def render(self, job: object, seeds: list[int], on_step: object = None) -> RenderOutput:
            started.append(time.perf_counter())
            return RenderOutput([Image.new("RGB", (64, 64)) for _ in seeds], seeds, {"name": "flat"},
                                {"inference_s": 0.0})

    logs.configure("json", "warning")
    folders = {name: str(root / name) for name in ("inbox", "outbox", "state")}
    settings = load_settings(env={}, overrides={"queue": url, **folders, "metrics_dir": "off"})
    service = Service(settings, Flat())
    thread = threading.Thread(target=service.run, name="bench-daemon", daemon=True)
    thread.start()
    service.ready.wait(60)
    client = Client.from_settings(settings)
    out = []
    try:
        for k in range(jobs):
            time.sleep(0.05)  # idle, as between real submits
            before = len(started)
            submitted = time.perf_counter()
            job_id = client.submit("latency", job_id=f"lat-{k}", width=64, height=64, steps=1)
            client.wait(job_id, timeout=60)
            out.append(started[before] - submitted)
    finally:
        service.stop()
        thread.join()
    return out


def _run(target: object, args: tuple[object, ...], n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, ready, go)) for _ in range(n)]  # type: ignore[arg-type]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    for proc in procs:
        proc.join()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--daemons", type=int, default=16)
    parser.add_argument("--latency", type=int, default=50, help="jobs submitted one at a time to an idle daemon")
    parser.add_argument("--cpu", type=int, default=2000, help="jobs through one broker loop, for CPU per job")
    args = parser.parse_args()
    from sbrender.redisqueue import RedisQueue

    with tempfile.TemporaryDirectory(prefix="sbrender-redis-bench-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            client = server.client()
            client.config_set("appendfsync", "everysec")  # as a production server runs
            raw = "{sbr}:bench:raw"
            pipe = client.pipeline(transaction=False)
            for k in range(args.jobs):
                pipe.xadd(raw, {"id": f"r{k}"})
            pipe.execute()
            client.xgroup_create(raw, "raw", id="0")
            raw_s = _run(_raw_loop, (server.url, raw), args.daemons)
            queue = RedisQueue(server.url)
            for k in range(args.jobs):
                queue.submit(f"b{k}", {"prompt": "bench"}, 0)
            ours_s = _run(_broker_loop, (server.url, tmp), args.daemons)
            left = client.xlen("{sbr}:q:normal")
            assert server.proc is not None
            cpu = _cpu_per_job(server.url, f"{tmp}/cpu", server.proc.pid, args.cpu) if args.cpu else None
            latency = sorted(_latency(server.url, Path(tmp) / "latency", args.latency)) if args.latency else []
        finally:
            server.kill()
    raw_rate, ours_rate = args.jobs / raw_s, args.jobs / ours_s
    print(f"{args.daemons} processes, {args.jobs} jobs each way; redis-server on this machine")
    print(f"raw XREADGROUP + XACK:       {raw_rate:8.0f} jobs/s")
    print(f"sbrender brokers (fenced):   {ours_rate:8.0f} jobs/s  ({ours_rate / raw_rate:.2f} of raw)")
    if cpu:
        print(f"CPU per job, one broker loop: client {cpu[0] * 1e6:.0f} us, redis-server {cpu[1] * 1e6:.0f} us "
              f"({args.cpu} jobs)")
    if latency:
        p50, p90 = latency[len(latency) // 2], latency[min(len(latency) - 1, round(0.9 * (len(latency) - 1)))]
        print(f"submit to render start, idle daemon: p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms "
              f"({len(latency)} jobs)")
    if left:
        print(f"{left} entries left unacknowledged")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
