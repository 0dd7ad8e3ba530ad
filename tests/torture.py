"""Crash torture: render many jobs while killing daemons with SIGKILL at random
moments, then check that every job is accounted for exactly once.

Short form in the suite (tests/test_torture.py); long form from the shell:

    python tests/torture.py --jobs 300 --kills 30 --daemons 2

The daemons are real `sbrender run` processes on the tiny-random model.
Exit status 0 when every check holds, 1 otherwise (the problems are printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DaemonProcess, Spool, daemon_env  # noqa: E402


@dataclass
class Plan:
    """The jobs dropped: which ids must succeed and which must fail."""

    succeed: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)


def drop_jobs(spool: Spool, count: int, rng: random.Random) -> Plan:
    plan = Plan()
    for k in range(count):
        kind = rng.choice(["single", "single", "single", "several", "batch", "invalid"])
        name = f"t{k:04d}"
        if kind == "single":
            spool.drop(f"{name}.yaml", f"prompt: torture {k}\nseed: {k}\nsteps: 2\n")
            plan.succeed.add(name)
        elif kind == "several":
            spool.drop(f"{name}.json", {"prompt": f"torture {k}", "count": 2, "steps": 2})
            plan.succeed.add(name)
        elif kind == "batch":
            spool.drop(f"{name}.yaml", f"defaults: {{steps: 2}}\njobs:\n  - prompt: a {k}\n  - prompt: b {k}\n"
                                       f"  - prompt: c {k}\n    steps: 0\n")
            plan.succeed.update({f"{name}-001", f"{name}-002"})
            plan.fail.add(f"{name}-003")
        else:
            spool.drop(f"{name}.yaml", "prompt: [broken\n")
            plan.fail.add(name)
        plan.files.add(f"{name}.{'json' if kind == 'several' else 'yaml'}")
    return plan


def verify(spool: Spool, plan: Plan) -> list[str]:
    """Every job has exactly one result; succeeded ones have their PNGs with the
    recorded sha256; nothing partial is visible; every input is archived once."""
    problems = []
    results = {p.name[:-5] for p in spool.outbox.glob("*.json")}
    expected = plan.succeed | plan.fail
    if results != expected:
        problems.append(f"results differ: missing {sorted(expected - results)[:5]}, "
                        f"unexpected {sorted(results - expected)[:5]}")
    for job_id in sorted(results & expected):
        result = json.loads((spool.outbox / f"{job_id}.json").read_text())
        want = "succeeded" if job_id in plan.succeed else "failed"
        if result["status"] != want:
            problems.append(f"{job_id}: {result['status']}, expected {want}: {result.get('error')}")
        for image in result["images"]:
            path = spool.outbox / image["file"]
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != image["sha256"]:
                problems.append(f"{job_id}: {image['file']} missing or not matching its sha256")
    hidden = [p.name for p in spool.outbox.iterdir() if p.name.startswith(".")]
    if hidden:
        problems.append(f"temp files visible in the outbox: {hidden[:5]}")
    pngs = {p.name for p in spool.outbox.glob("*.png")}
    published = {i["file"] for r in results for i in json.loads((spool.outbox / f"{r}.json").read_text())["images"]}
    if pngs != published:
        problems.append(f"PNGs without a result: {sorted(pngs - published)[:5]}")
    left = [p.name for p in spool.inbox.iterdir()] + [str(p) for p in (spool.state / "work").rglob("*") if p.is_file()]
    if left:
        problems.append(f"inputs not finished: {left[:5]}")
    archived = [p.name for folder in ("done", "failed") for p in (spool.state / folder).iterdir()]
    if sorted(archived) != sorted(plan.files):
        problems.append(f"archive differs from the inputs: {len(archived)} archived for {len(plan.files)} files")
    return problems


def _rendering(spool: Spool) -> bool:
    for path in (spool.state / "daemons").glob("*.json"):
        try:
            if json.loads(path.read_text()).get("state") == "rendering":
                return True
        except (OSError, ValueError):
            pass
    return False


def torture(root: Path, model_cache: Path, *, jobs: int, kills: int, daemons: int = 1, seed: int = 0,
            uptime: float = 3.0, log: bool = False) -> list[str]:
    """Drop the jobs, then ``kills`` times: start the daemons, let them render for
    a random time up to ``uptime`` seconds, SIGKILL one (the others get SIGKILL or
    SIGTERM). Then drain with ``run --once`` and verify. Returns the problems."""
    rng = random.Random(seed)
    spool = Spool(root)
    plan = drop_jobs(spool, jobs, rng)
    # Random kills may hit the same job more than once: that is not the job's fault.
    env = daemon_env(model_cache, SBRENDER_LIMITS_MAX_CRASHES="1000")
    for round_ in range(kills):
        running = [DaemonProcess(spool, env) for _ in range(daemons)]
        for daemon in running:
            daemon.wait_ready()
        # Kill while a render is under way (if any work is left), at a random moment.
        deadline = time.monotonic() + 60
        while not _rendering(spool) and any(spool.inbox.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, uptime))
        victim = rng.choice(running)
        victim.stop(signal.SIGKILL)
        for daemon in running:
            if daemon is not victim:
                daemon.stop(rng.choice([signal.SIGKILL, signal.SIGTERM]))
        done = len(list(spool.outbox.glob("*.json")))
        if log:
            print(f"round {round_ + 1}/{kills}: {done}/{len(plan.succeed | plan.fail)} results", flush=True)
    drain = subprocess.run([sys.executable, "-m", "sbrender", "run", "--once", *spool.cli_args()], env=env,
                           cwd=root, capture_output=True, text=True)
    if drain.returncode != 0:
        return [f"the final run failed ({drain.returncode}): {drain.stderr[-2000:]}"]
    return verify(spool, plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--daemons", type=int, default=1)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--uptime", type=float, default=3.0, help="most seconds a daemon lives before the kill")
    parser.add_argument("--dir", type=Path, help="work here (default: a new temp folder)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="sbrender-torture-"))
    cache = root / "model-cache"
    from sbrender.models import BUILTINS, ensure_builtin

    ensure_builtin(BUILTINS["tiny-random"], cache)
    print(f"torture in {root}: {args.jobs} job files, {args.kills} kills, {args.daemons} daemon(s), seed {args.seed}")
    problems = torture(root / "spool", cache, jobs=args.jobs, kills=args.kills, daemons=args.daemons,
                       seed=args.seed, uptime=args.uptime, log=True)
    for problem in problems:
        print("PROBLEM:", problem)
    print("ok: every job accounted for" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
