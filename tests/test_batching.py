"""Cross-job batching through the real daemon and the real tiny pipeline:
which jobs share a pipeline call, that order and priority hold, that each job
keeps its seed, and that one job's trouble stays its own."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conftest import Spool, daemon_env, sbrender
from sbrender.jobs import Rules
from sbrender.queue import JobQueue
from sbrender.spool import Spool as RealSpool


def _run_once(spool: Spool, model_cache: Path, batch: int, **env: str) -> None:
    proc = sbrender("run", "--once", *spool.cli_args(), env=daemon_env(model_cache, SBRENDER_PERF_BATCH_SIZE=str(batch),
                                                                        **env), cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _results(spool: Spool) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in spool.outbox.glob("*.json")}


def _calls(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The pipeline calls, in the order they ran: the jobs of each."""
    calls: dict[tuple[str, ...], str] = {}
    for job_id, result in results.items():
        jobs = tuple(result.get("batch", {}).get("jobs", [job_id]))
        calls[jobs] = min(calls.get(jobs, "~"), result["timings"]["started_at"])
    return [list(jobs) for jobs in sorted(calls, key=lambda k: calls[k])]


def _drop_all(spool: Spool, files: list[tuple[str, str]]) -> None:
    now = time.time()
    for k, (name, text) in enumerate(files):
        spool.drop(name, text, mtime=now - 100 + k)  # arrival order = list order
    time.sleep(0.6)  # complete before the daemon looks


def test_compatible_jobs_share_a_call_in_queue_order(spool: Spool, model_cache: Path) -> None:
    files = [(f"j{k}.yaml", f"prompt: job {k}\nseed: {k}\nsteps: 3\n") for k in range(6)]
    files.insert(3, ("odd.yaml", "prompt: another size\nsteps: 3\nwidth: 128\n"))  # splits the run
    files.append(("urgent.yaml", "prompt: urgent\nsteps: 5\npriority: 5\n"))  # arrives last, renders first
    files.append(("pair.yaml", "- prompt: pair a\n  steps: 3\n  seed: 50\n- prompt: pair b\n  steps: 3\n  count: 2\n"
                               "  seed: 60\n"))
    _drop_all(spool, files)
    _run_once(spool, model_cache, batch=4)
    results = _results(spool)
    assert all(r["status"] == "succeeded" for r in results.values()), results
    assert _calls(results) == [["urgent"], ["j0", "j1", "j2"], ["odd"], ["j3", "j4", "j5", "pair-001"],
                               ["pair-002"]]
    batched = results["j4"]
    assert batched["batch"] == {"jobs": ["j3", "j4", "j5", "pair-001"], "images": 4}
    assert [i["seed"] for i in results["pair-002"]["images"]] == [60, 61]
    assert "batch" not in results["odd"]
    assert sorted(p.name for p in (spool.state / "done").iterdir()) == sorted(name for name, _ in files)


def test_batched_images_keep_their_seeds_and_differ_at_most_in_the_last_bit(tmp_path: Path,
                                                                             model_cache: Path) -> None:
    images: dict[int, dict[str, np.ndarray]] = {}
    for batch in (1, 4):
        spool = Spool(tmp_path / f"b{batch}")
        _drop_all(spool, [(f"s{k}.yaml", f"prompt: a lighthouse, take {k}\nseed: {100 + k}\nsteps: 4\n")
                          for k in range(4)])
        _run_once(spool, model_cache, batch=batch)
        results = _results(spool)
        assert ("batch" in results["s0"]) == (batch > 1)
        images[batch] = {k: np.asarray(Image.open(spool.outbox / f"{k}.png"), dtype=int) for k in results}
    for name in images[1]:
        assert np.abs(images[1][name] - images[4][name]).max() <= 2, name
    assert np.abs(images[4]["s0"] - images[4]["s1"]).mean() > 10, "different seeds, different images"


def test_a_failing_job_fails_alone_and_its_batch_renders_one_by_one(spool: Spool, model_cache: Path) -> None:
    _drop_all(spool, [(f"f{k}.yaml", f"prompt: job {k}\nseed: {k}\nsteps: 3\n") for k in range(4)])
    _run_once(spool, model_cache, batch=4, SBRENDER_TEST_FAULTS="f2=error")
    results = _results(spool)
    assert {k: r["status"] for k, r in results.items()} == {"f0": "succeeded", "f1": "succeeded", "f2": "failed",
                                                            "f3": "succeeded"}
    assert "injected pipeline failure" in results["f2"]["error"]["message"]
    assert "batch" not in results["f0"], "rendered alone after the batch failed"


def test_a_batch_never_takes_a_job_past_one_it_cannot_take(tmp_path: Path) -> None:
    """The queue alone, over a real spool: batches are runs of consecutive entries."""
    spool = RealSpool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state")
    spool.prepare()
    now = time.time()
    for k, (name, text) in enumerate([("a.yaml", "prompt: a\n"), ("b.yaml", "prompt: b\nwidth: 256\n"),
                                      ("c.yaml", "prompt: c\n"), ("d.yaml", "prompt: d\ncount: 3\n"),
                                      ("e.yaml", "prompt: e\n")]):
        path = spool.inbox / name
        path.write_text(text)
        import os

        os.utime(path, (now - 100 + k, now - 100 + k))
    queue = JobQueue(spool, Rules(), 0.0, lambda name: None)
    queue.full_scan()

    def key(entry: Any) -> Any:
        return (entry.width, entry.height)

    taken = []
    assert len(queue) == 5
    while batch := queue.pop_batch(4, key):
        taken.append([p.entry.id for p in batch])
        for pick in batch:
            queue.dispatch(pick.candidate, pick.entry)
        assert len(queue) == sum(len(c.pending()) for c in queue.candidates.values())
    assert taken == [["a"], ["b"], ["c", "d"], ["e"]]
    assert len(queue) == 0


def test_a_batch_that_kills_the_daemon_blames_only_the_guilty_job(spool: Spool, model_cache: Path) -> None:
    """The daemon dies mid-batch: nobody knows which job did it, so after the
    restart each job of that batch renders alone, and only the one that keeps
    killing daemons reaches limits.max_crashes."""
    _drop_all(spool, [(f"b{k}.yaml", f"prompt: job {k}\nseed: {k}\nsteps: 3\n") for k in range(4)])
    env = daemon_env(model_cache, SBRENDER_PERF_BATCH_SIZE="4", SBRENDER_TEST_FAULTS="b2=crash",
                     SBRENDER_LIMITS_MAX_CRASHES="2")
    codes = [sbrender("run", "--once", *spool.cli_args(), env=env, cwd=spool.root).returncode for _ in range(3)]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    results = _results(spool)
    assert {k: r["status"] for k, r in results.items()} == {"b0": "succeeded", "b1": "succeeded", "b2": "failed",
                                                            "b3": "succeeded"}
    assert "a daemon died 2 times while rendering this job" in results["b2"]["error"]["message"]
    assert not list((spool.state / "work").glob("*/*")), "nothing is left claimed"


def test_jobs_with_different_clip_skips_never_share_a_call() -> None:
    from sbrender.jobs import build_job
    from sbrender.renderer import call_key

    one, two, again = (build_job(f"j{k}", {"prompt": "a cat", "clip_skip": skip}, Rules())
                       for k, skip in enumerate((1, 2, 2)))
    assert call_key(one) != call_key(two) and call_key(two) == call_key(again)
