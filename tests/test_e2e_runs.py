"""End to end, one daemon run per test: start-up failures, `run --once`, order,
reproducibility, and stopping in the middle of a render."""

from __future__ import annotations

import collections
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Spool, daemon_env, sbrender, wait_for
from sbrender.peers import owner_name


def _run_once(spool: Spool, model_cache: Path, **env: str) -> Any:
    proc = sbrender("run", "--once", *spool.cli_args(), env=daemon_env(model_cache, **env), cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_priority_then_first_come_first_served(spool: Spool, model_cache: Path) -> None:
    now = time.time()
    spool.drop("a.yaml", "prompt: a\n", mtime=now - 5)
    spool.drop("b.yaml", "prompt: b\n", mtime=now - 20)  # earliest arrival among priority 0
    spool.drop("c.yaml", "prompt: c\npriority: 5\n", mtime=now - 1)
    spool.drop("d.yaml", "prompt: d\n", mtime=now - 5)  # same arrival as a: by name
    spool.drop("e.json", {"prompt": "e", "priority": -1}, mtime=now - 30)
    spool.drop("f.yaml", "- prompt: f1\n  priority: 9\n- prompt: f2\n", mtime=now - 5)
    time.sleep(0.6)  # past the settle interval: every file is complete when the daemon looks
    _run_once(spool, model_cache)
    started = {p.stem: json.loads(p.read_text())["timings"]["started_at"] for p in spool.outbox.glob("*.json")}
    order = sorted(started, key=lambda k: started[k])
    assert order == ["f-001", "c", "b", "a", "d", "f-002", "e"]
    assert not list(spool.inbox.iterdir()), "every input left the inbox"
    assert sorted(p.name for p in (spool.state / "done").iterdir()) == ["a.yaml", "b.yaml", "c.yaml", "d.yaml",
                                                                        "e.json", "f.yaml"]


def test_same_seed_gives_identical_pngs_across_runs(tmp_path: Path, model_cache: Path) -> None:
    pngs = []
    for run in ("one", "two"):
        spool = Spool(tmp_path / run)
        spool.drop("same.yaml", "prompt: a lighthouse at dusk\nseed: 1234\ncount: 2\nsteps: 3\n")
        _run_once(spool, model_cache)
        result = json.loads((spool.outbox / "same.json").read_text())
        assert result["status"] == "succeeded"
        pngs.append([(spool.outbox / i["file"]).read_bytes() for i in result["images"]])
    assert pngs[0] == pngs[1]
    assert pngs[0][0] != pngs[0][1]


@pytest.mark.parametrize("model, env, expected", [
    ("/nonexistent/sd-folder", {}, "model /nonexistent/sd-folder is a path, and /nonexistent/sd-folder does not exist"),
    ("someone/not-in-cache", {"SBRENDER_OFFLINE": "true"}, "offline is on"),
])
def test_missing_model_stops_the_start(spool: Spool, model_cache: Path, tmp_path: Path, model: str,
                                       env: dict[str, str], expected: str) -> None:
    spool.drop("waiting.yaml", "prompt: must not be lost\n")
    proc = sbrender("run", "--model", model, *spool.cli_args(), cwd=spool.root,
                    env=daemon_env(model_cache, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", **env))
    assert proc.returncode == 2  # bad configuration
    assert expected in proc.stderr
    assert (spool.inbox / "waiting.yaml").exists(), "a failed start must not touch the queue"


def test_folder_without_pipeline_is_refused(spool: Spool, model_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    proc = sbrender("run", "--model", str(tmp_path / "empty-model"), *spool.cli_args(), cwd=spool.root,
                    env=daemon_env(model_cache))
    assert proc.returncode == 2 and "has no model_index.json" in proc.stderr


def test_local_folder_model_loads_through_the_same_path(spool: Spool, model_cache: Path) -> None:
    folder = next((model_cache / "models").glob("tiny-random-v*"))
    spool.drop("from-folder.yaml", "prompt: from a folder\nseed: 3\n")
    _run_once(spool, model_cache, SBRENDER_MODEL=str(folder))
    result = json.loads((spool.outbox / "from-folder.json").read_text())
    assert result["status"] == "succeeded"
    assert result["model"]["source"] == "folder" and result["model"]["location"] == str(folder)


def test_bad_config_is_refused_with_the_key(spool: Spool, model_cache: Path) -> None:
    proc = sbrender("run", *spool.cli_args(), cwd=spool.root,
                    env=daemon_env(model_cache, SBRENDER_LIMITS_MAX_STEPS="lots"))
    assert proc.returncode == 2
    assert "limits.max_steps" in proc.stderr and "SBRENDER_LIMITS_MAX_STEPS" in proc.stderr


def _status(spool: Spool) -> dict[str, Any]:
    """The status file of the one daemon that served this spool."""
    try:
        (path,) = (spool.state / "daemons").glob("*.json")
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_sigterm_mid_render_stops_fast_and_loses_nothing(spool: Spool, model_cache: Path, start_daemon: Any) -> None:
    daemon: DaemonProcess = start_daemon(spool)
    spool.drop("long.yaml", "prompt: a long render\nsteps: 40\nseed: 8\n")
    deadline = time.monotonic() + 60
    while (_status(spool).get("current") or {}).get("step", 0) < 2:
        assert time.monotonic() < deadline, "render never started"
        time.sleep(0.05)
    stop_sent = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    # 40 steps take seconds here; the stop comes at the next step.
    assert time.monotonic() - stop_sent < 10
    assert (spool.inbox / "long.yaml").exists(), "the interrupted job goes back to the inbox"
    assert not (spool.outbox / "long.json").exists() and not list(spool.outbox.glob("long*.png"))
    assert not [p for p in spool.outbox.iterdir() if p.name.startswith(".")], "no temp files left"
    assert not list((spool.state / "daemons").iterdir()), "a cleanly stopped daemon leaves no status file"
    # The next run renders it, once.
    proc = sbrender("run", "--once", *spool.cli_args(), env=daemon_env(model_cache, SBRENDER_LIMITS_MAX_STEPS="150"),
                    cwd=spool.root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((spool.outbox / "long.json").read_text())["status"] == "succeeded"


def _dead_owner() -> str:
    """The owner name of a daemon process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return owner_name(pid=int(proc.stdout))


def test_files_claimed_by_a_crashed_run_are_rendered_on_restart(spool: Spool, model_cache: Path) -> None:
    """Files left claimed by a daemon that died mid-job are recovered, with what it
    left half-written cleaned up; a live daemon's files are not touched."""
    dead = _dead_owner()
    (spool.state / "work" / dead).mkdir(parents=True)
    (spool.state / "work" / dead / "orphan.yaml").write_text("prompt: left behind\nseed: 4\n")
    (spool.state / "work" / "legacy.yaml").write_text("prompt: claimed by an older layout\n")
    # A previous run that had the pid this test has now (a container's PID 1 after a restart).
    earlier = owner_name(pid=os.getpid()).rsplit("-", 1)[0] + "-1"
    (spool.state / "work" / earlier).mkdir()
    (spool.state / "work" / earlier / "same-pid.yaml").write_text("prompt: same pid, earlier run\n")
    alive = owner_name(pid=os.getppid())  # the pytest runner's parent: alive, not a daemon
    (spool.state / "work" / alive).mkdir()
    (spool.state / "work" / alive / "peer.yaml").write_text("prompt: a live peer's job\n")
    spool.outbox.mkdir()
    partial = spool.outbox / f".orphan.png~{dead}~deadbeef.tmp"
    partial.write_bytes(b"partial")
    _run_once(spool, model_cache)
    assert json.loads((spool.outbox / "orphan.json").read_text())["status"] == "succeeded"
    assert json.loads((spool.outbox / "legacy.json").read_text())["status"] == "succeeded"
    assert json.loads((spool.outbox / "same-pid.json").read_text())["status"] == "succeeded"
    assert (spool.state / "done" / "orphan.yaml").exists()
    assert not partial.exists(), "stale temp files are removed"
    assert not (spool.state / "work" / dead).exists()
    assert (spool.state / "work" / alive / "peer.yaml").exists(), "a live owner's file is not taken"
    assert not (spool.outbox / "peer.json").exists()


def test_a_file_that_keeps_crashing_daemons_is_failed(spool: Spool, model_cache: Path) -> None:
    """A job that kills the daemon (SIGKILL mid-render) is retried after each restart
    until limits.max_crashes, then failed; the job behind it renders."""
    spool.drop("poison.yaml", "prompt: crashes every time\nmetadata: {row: 9}\n", mtime=time.time() - 60)
    spool.drop("after-poison.yaml", "prompt: next in line\n")
    env = daemon_env(model_cache, SBRENDER_TEST_FAULTS="poison=crash", SBRENDER_LIMITS_MAX_CRASHES="2")
    codes = [sbrender("run", "--once", *spool.cli_args(), env=env, cwd=spool.root).returncode for _ in range(3)]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    result = json.loads((spool.outbox / "poison.json").read_text())
    assert result["status"] == "failed"
    assert "a daemon died 2 times while rendering this job" in result["error"]["message"]
    assert result["params"]["prompt"] == "crashes every time" and result["metadata"] == {"row": 9}
    assert (spool.state / "failed" / "poison.yaml").exists()
    assert json.loads((spool.outbox / "after-poison.json").read_text())["status"] == "succeeded"
    assert not list((spool.state / "work").glob("*/*")), "nothing is left claimed"
    retry = sbrender("retry", "poison", *spool.cli_args(), env=env, cwd=spool.root)
    assert retry.returncode == 0, retry.stderr
    assert json.loads((spool.inbox / "poison.json").read_text())["prompt"] == "crashes every time"


@pytest.mark.parametrize("fault, expected", [
    ("oom", "out of GPU memory rendering 1 image(s) of 64x64"),
    ("nan", "the model produced NaN values"),
    ("error", "the pipeline failed: RuntimeError: injected pipeline failure"),
])
def test_renderer_faults_fail_the_job_and_the_daemon_goes_on(spool: Spool, model_cache: Path, fault: str,
                                                            expected: str) -> None:
    spool.drop("faulty.yaml", "prompt: doomed\npriority: 1\n")
    spool.drop("healthy.yaml", "prompt: fine\n")
    _run_once(spool, model_cache, SBRENDER_TEST_FAULTS=f"faulty={fault}")
    result = json.loads((spool.outbox / "faulty.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "render"
    assert expected in result["error"]["message"]
    assert not list(spool.outbox.glob("faulty*.png"))
    assert json.loads((spool.outbox / "healthy.json").read_text())["status"] == "succeeded"


def test_model_load_failure_stops_the_start(spool: Spool, model_cache: Path) -> None:
    spool.drop("kept.yaml", "prompt: must stay queued\n")
    proc = sbrender("run", *spool.cli_args(), env=daemon_env(model_cache, SBRENDER_TEST_FAULTS="load"),
                    cwd=spool.root)
    assert proc.returncode == 1 and "cannot load the model: injected fault" in proc.stderr
    assert (spool.inbox / "kept.yaml").exists()
    # A failed start leaves no ghost: no status file stuck in "loading", no work folder.
    assert not list((spool.state / "daemons").iterdir())
    assert not list((spool.state / "work").iterdir())
    status = sbrender("status", "--json", *spool.cli_args(), env=daemon_env(model_cache), cwd=spool.root)
    assert json.loads(status.stdout)["daemons"] == [], status.stdout


def test_state_on_another_filesystem_is_refused(spool: Spool, model_cache: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(spool.inbox).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    state = shm / f"sbrender-test-{os.getpid()}"
    proc = sbrender("run", "--inbox", str(spool.inbox), "--outbox", str(spool.outbox), "--state", str(state),
                    env=daemon_env(model_cache), cwd=spool.root)
    assert proc.returncode == 2 and "another filesystem" in proc.stderr


def test_vanished_outbox_pauses_instead_of_losing_work(spool: Spool, start_daemon: Any) -> None:
    """An outbox that disappears (an unmounted volume) stops the daemon from taking
    jobs; when the same folder is back, it goes on."""
    daemon: DaemonProcess = start_daemon(spool)
    spool.drop("before.yaml", "prompt: before\n")
    spool.result("before")
    hidden = spool.root / "outbox-unmounted"
    os.rename(spool.outbox, hidden)
    deadline = time.monotonic() + 30
    while not daemon.events("queue unavailable; paused until it is back"):
        assert time.monotonic() < deadline, "the missing outbox was not noticed"
        time.sleep(0.05)
    spool.drop("during.yaml", "prompt: during\n")
    time.sleep(1.5)  # several rescans
    assert (spool.inbox / "during.yaml").exists(), "no job is taken while the outbox is gone"
    os.rename(hidden, spool.outbox)
    assert spool.result("during")["status"] == "succeeded"
    assert daemon.events("queue is back; resuming")


@pytest.mark.xdist_group("crowd")  # many daemons: not beside the other crowds
def test_three_daemons_share_a_spool_and_survive_a_kill(spool: Spool, model_cache: Path) -> None:
    """Each job renders exactly once across three daemons; the files of the one
    killed mid-job are taken back by a peer, never those of a live one."""
    env = daemon_env(model_cache, SBRENDER_WATCH_RESCAN_SECONDS="0.3")
    daemons = [DaemonProcess(spool, env) for _ in range(3)]
    try:
        for daemon in daemons:
            daemon.wait_ready()
        ids = [f"shared-{k:02d}" for k in range(30)]
        for job_id in ids:
            spool.drop(f"{job_id}.yaml", f"prompt: {job_id}\nsteps: 4\nseed: 1\n")
        victim = daemons[1]
        deadline = time.monotonic() + 120
        while not any(p.is_file() for p in (spool.state / "work" / _owner_of(victim)).glob("*")):
            assert time.monotonic() < deadline, "the victim never claimed a job"
            time.sleep(0.01)
        victim.stop(signal.SIGKILL)
        results = [spool.result(job_id) for job_id in ids]
    finally:
        codes = [d.stop() for d in daemons if d is not daemons[1]]
    assert codes == [0, 0]
    assert {r["status"] for r in results} == {"succeeded"}
    finished = collections.Counter(line["job_id"] for d in daemons for line in d.events("job finished"))
    assert set(finished) == set(ids) and set(finished.values()) == {1}, "each job rendered exactly once"
    recovered = [line for d in daemons for line in d.events("recovered a file claimed by a daemon that is gone")]
    assert recovered and recovered[0]["previous_owner"] == _owner_of(victim)
    assert not (spool.state / "work" / _owner_of(victim)).exists()
    assert sorted(p.name for p in (spool.state / "done").iterdir()) == sorted(f"{i}.yaml" for i in ids)


def _owner_of(daemon: DaemonProcess) -> str:
    return daemon.owner


def test_second_signal_forces_exit(spool: Spool, model_cache: Path) -> None:
    daemon = DaemonProcess(spool, daemon_env(model_cache, SBRENDER_TEST_FAULTS="stuck=stall"))
    daemon.wait_ready()
    spool.drop("stuck.yaml", "prompt: slow steps\nsteps: 50\n")
    deadline = time.monotonic() + 60
    while (_status(spool).get("current") or {}).get("step", 0) < 1:  # the first step's 10 s sleep ended
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The status file is written while the loop still does its between-steps
    # bookkeeping; a signal landing there would stop the render at once, before
    # the second. Two seconds later the next step's 10 s sleep (the fault) has
    # begun, even on a loaded machine: both signals land inside it.
    time.sleep(2.0)
    daemon.proc.send_signal(signal.SIGINT)
    # Signals sent before the first one's handler ran are merged into one: signal
    # again until the daemon exits. Only a handler that ran twice exits with 130;
    # one signal would let the stalled step finish and exit 0.
    def signalled_again() -> bool:
        daemon.proc.send_signal(signal.SIGINT)
        try:
            daemon.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return False
        return True

    wait_for(signalled_again, timeout=30, message="the daemon did not exit on a second signal")
    assert daemon.proc.returncode == 128 + signal.SIGINT
    daemon.stop()
    assert (spool.state / "work" / _owner_of(daemon) / "stuck.yaml").exists(), "kept claimed for recovery"


def test_a_failed_write_fails_the_job_and_nothing_partial_shows(spool: Spool, model_cache: Path) -> None:
    """A file-size limit makes the big PNG's write fail (EFBIG, as a full disk
    fails with ENOSPC): that job fails with the error, no partial PNG is visible,
    and the small job after it succeeds."""
    spool.drop("too-big.yaml", "prompt: noise\nwidth: 192\nheight: 192\nsteps: 2\npriority: 1\n")
    spool.drop("small.yaml", "prompt: fits\n")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = sbrender("run", "--once", *spool.cli_args(), env=daemon_env(model_cache), cwd=spool.root,
                    preexec_fn=limit_file_size)
    assert proc.returncode == 0, proc.stderr
    failed = json.loads((spool.outbox / "too-big.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["type"] == "spool"
    assert "cannot write" in failed["error"]["message"] and "too-big.png" in failed["error"]["message"]
    assert not (spool.outbox / "too-big.png").exists()
    assert not [p.name for p in spool.outbox.iterdir() if p.name.startswith(".")]
    assert json.loads((spool.outbox / "small.json").read_text())["status"] == "succeeded"


def test_status_of_a_live_a_stalled_and_a_stopped_daemon(spool: Spool, model_cache: Path) -> None:
    env = daemon_env(model_cache)

    def status() -> tuple[int, dict[str, Any]]:
        proc = sbrender("status", "--json", "--stale-after", "3", *spool.cli_args(), env=env, cwd=spool.root)
        return proc.returncode, json.loads(proc.stdout)

    code, report = status()
    assert code == 1 and report == {"healthy": False, "daemons": []}
    daemon = DaemonProcess(spool, env)
    try:
        daemon.wait_ready()
        code, report = status()
        assert code == 0 and report["healthy"] is True
        (live,) = report["daemons"]
        assert live["health"] == "ok" and live["state"] == "idle" and live["pid"] == daemon.proc.pid
        text = sbrender("status", *spool.cli_args(), env=env, cwd=spool.root)
        assert text.returncode == 0 and ": ok: idle, 0 queued (model tiny-random on cpu" in text.stdout
        daemon.proc.send_signal(signal.SIGSTOP)  # hung: no loop, no heartbeat
        # Stalled once its last progress is more than --stale-after (3 s) old.
        def stalled() -> tuple[int, dict[str, Any]] | None:
            code, report = status()
            return (code, report) if [d["health"] for d in report["daemons"]] == ["stalled"] else None

        code, report = wait_for(stalled, timeout=60, message="a stopped daemon was never reported stalled")
        assert code == 1 and report["daemons"][0]["health"] == "stalled"
        daemon.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: status()[0] == 0, timeout=60, message="a resumed daemon was not reported healthy again")
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
        assert daemon.stop() == 0
    code, report = status()
    assert code == 1 and report["daemons"] == []


def test_prometheus_metrics_file(spool: Spool, model_cache: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    daemon = DaemonProcess(spool, daemon_env(model_cache))
    try:
        daemon.wait_ready()
        spool.drop("m-ok.yaml", "prompt: counted\ncount: 2\n")
        spool.drop("m-bad.yaml", "prompt: counted\nsteps: 0\n")
        spool.result("m-ok"), spool.result("m-bad")
        path = spool.state / "metrics" / f"sbrender-{_owner_of(daemon)}.prom"
        deadline = time.monotonic() + 30
        while True:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(path.read_text()) for s in family.samples}
            if samples.get(("sbrender_jobs_total", (("status", "failed"),))) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        assert daemon.stop() == 0
    assert samples[("sbrender_jobs_total", (("status", "succeeded"),))] == 1
    assert samples[("sbrender_jobs_total", (("status", "failed"),))] == 1
    assert samples[("sbrender_images_total", ())] == 2
    assert samples[("sbrender_render_seconds_count", ())] == 1
    assert samples[("sbrender_model_load_seconds", ())] > 0
    assert samples[("sbrender_queue_depth", ())] == 0
    assert not path.exists(), "a cleanly stopped daemon removes its metrics file"


def test_failed_result_published_before_a_crash_archives_as_failed(spool: Spool, model_cache: Path) -> None:
    """The file's job failed and its result was out when the daemon died: the
    restart finishes the file without a second result, archived as failed."""
    from sbrender.spool import FileInfo

    dead = _dead_owner()
    folder = spool.state / "work" / dead
    folder.mkdir(parents=True)
    (folder / "was-bad.yaml").write_text("prompt: x\nsteps: 0\n")
    claim = FileInfo.of(folder / "was-bad.yaml").claim_token
    spool.outbox.mkdir()
    earlier = {"id": "was-bad", "status": "failed", "input": {"file": "was-bad.yaml", "claim": claim},
               "error": {"type": "invalid_job", "message": "steps is 0"}}
    (spool.outbox / "was-bad.json").write_text(json.dumps(earlier))
    _run_once(spool, model_cache)
    assert json.loads((spool.outbox / "was-bad.json").read_text()) == earlier
    assert (spool.state / "failed" / "was-bad.yaml").exists()
    assert not list(spool.outbox.glob("was-bad.dup*"))
