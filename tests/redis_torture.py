"""Redis torture: daemons with a stand-in renderer share one Redis queue and one
outbox while daemons are killed with SIGKILL and redis-server with kill -9 (then
restarted on its AOF); then every job must have exactly one result, seen from the
outbox and from Redis, every PNG must match its sha256, nothing partial may show.

Short form in the suite (tests/test_redis_torture.py); long form from the shell:

    python tests/redis_torture.py --jobs 2000 --daemons 4 --kills 20 --restarts 3

Each daemon is a process running the real service and dispatcher over
RedisBroker (`worker` below); only the renderer is a stand-in. Exit status 0
when every check holds, 1 otherwise (the problems are printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redis_server import RedisServer  # noqa: E402

LEASE_S = "1.5"


def worker(root: str, url: str) -> None:
    """One daemon: the real service over the Redis queue, a scripted renderer."""
    from sbrender import logs
    from sbrender.config import load_settings
    from sbrender.service import Service
    from test_dispatcher import ScriptedRenderer

    class StandIn(ScriptedRenderer):
        def render_batch(self, items, on_step=None):  # type: ignore[no-untyped-def]
            def step(i: int, n: int) -> bool:
                time.sleep(0.01)  # long enough for a kill to land mid-render now and then
                return bool(on_step and on_step(i, n))

            return super().render_batch(items, step)

    base = Path(root)
    settings = load_settings(env={}, overrides={
        "queue": url, "redis.lease_seconds": LEASE_S, "inbox": str(base / "inbox"), "outbox": str(base / "outbox"),
        "state": str(base / "state"), "metrics_dir": "off", "defaults.width": 8, "limits.min_side": 8,
        "defaults.height": 8, "defaults.steps": 2, "log.format": "json"})
    logs.configure("json", "warning")
    sys.exit(Service(settings, StandIn()).run())


class Fleet:
    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        log = open(self.root / f"daemon-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(self.root), self.url],
                                           stdout=log, stderr=subprocess.STDOUT))

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def stop(self) -> list[str]:
        problems = []
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            code = proc.wait(timeout=60)
            if code not in (0, -signal.SIGKILL):
                problems.append(f"daemon {proc.pid} exited {code}")
        return problems


def torture(root: Path, *, jobs: int, daemons: int, kills: int, restarts: int, seed: int,
            timeout: float = 600.0) -> list[str]:
    from sbrender.redisqueue import RedisQueue, job_key

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    server = RedisServer(root / "redis").start()
    fleet = Fleet(root, server.url)
    try:
        for _ in range(daemons):
            fleet.start()
        queue = RedisQueue(server.url)
        ids = [f"t{k:05d}" for k in range(jobs)]
        for k, job_id in enumerate(ids):
            queue.submit(job_id, {"prompt": f"torture {k}", "seed": k, "priority": k % 3 - 1}, k % 3 - 1)
        events = ["kill"] * kills + ["restart"] * restarts
        rng.shuffle(events)
        deadline = time.monotonic() + timeout
        client = server.client()

        def finished() -> int:
            try:
                pipe = client.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(job_key(job_id), "state")
                return sum(state == "succeeded" for state in pipe.execute())
            except Exception:  # noqa: BLE001 - the server may be restarting
                return 0

        while time.monotonic() < deadline:
            done = finished()
            if done == jobs:
                break
            if events and done >= jobs * (1 - len(events) / (kills + restarts + 1)):
                if events.pop() == "kill":
                    victim = rng.choice(fleet.alive())
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    fleet.start()
                else:
                    server.kill()
                    server.start()
                    client = server.client()
            time.sleep(0.05)
        problems = fleet.stop()
        problems += check(root / "outbox", server, ids)
        if events:
            problems.append(f"{len(events)} planned kills/restarts never happened")
        return problems
    finally:
        for proc in fleet.alive():
            proc.kill()
        server.kill()


def check(outbox: Path, server: RedisServer, ids: list[str]) -> list[str]:
    from sbrender.redisqueue import job_key

    problems = []
    client = server.client()
    for job_id in ids:
        state, result = client.hmget(job_key(job_id), "state", "result")
        path = outbox / f"{job_id}.json"
        if state != "succeeded" or result is None:
            problems.append(f"{job_id}: state {state} in Redis")
            continue
        if not path.exists():
            problems.append(f"{job_id}: no result in the outbox")
            continue
        published = json.loads(path.read_text())
        if published != json.loads(result):
            problems.append(f"{job_id}: the outbox JSON is not the result Redis kept (two publishers)")
        for image in published["images"]:
            data = (outbox / image["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != image["sha256"]:
                problems.append(f"{job_id}: {image['file']} does not match its sha256")
    partial = [p.name for p in outbox.iterdir() if p.name.startswith(".")]
    if partial:
        problems.append(f"partial files visible: {partial[:5]}")
    return problems


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--daemons", type=int, default=4)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sbrender-redis-torture-") as tmp:
        start = time.monotonic()
        problems = torture(Path(tmp), jobs=args.jobs, daemons=args.daemons, kills=args.kills,
                           restarts=args.restarts, seed=args.seed)
        print(f"{args.jobs} jobs, {args.daemons} daemons, {args.kills} kills, {args.restarts} Redis restarts: "
              f"{time.monotonic() - start:.0f} s")
    for problem in problems:
        print(problem)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
