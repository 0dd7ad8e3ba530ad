"""Queue mechanics at volume, in-process, with a stand-in renderer.

These check the watcher, the scanner and the claims under load: thousands of
files, a dead watcher thread. The real renderer is shown end to end in the
test_e2e_* modules; here only the image-making is replaced, so that 5,000 jobs
take a minute instead of hours on a CPU.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import wait_for
from sbrender.config import load_settings
from sbrender.service import Service
from sbrender.jobs import Job
from sbrender.renderer import RenderOutput, StepCallback, call_key


class SolidRenderer:
    """Makes one flat-coloured image per seed, and counts renders per job id."""

    def __init__(self) -> None:
        self.renders: collections.Counter[str] = collections.Counter()

    def load(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"model": {"name": "solid", "source": "test", "location": "", "random_weights": True},
                "device": "cpu", "dtype": "none", "versions": {}}

    batch_key = staticmethod(call_key)

    def render(self, job: Job, seeds: list[int], on_step: StepCallback | None = None) -> RenderOutput:
        self.renders[job.id] += 1
        images = [Image.new("RGB", (job.width, job.height), (seed % 256, 0, 0)) for seed in seeds]
        return RenderOutput(images, seeds, {"name": job.sampler}, {"inference_s": 0.0})


@pytest.fixture(params=["inotify", "polling"])
def running(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[Service, SolidRenderer, Path]]:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={}, overrides={
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"), "state": str(tmp_path / "state"),
        "watch.mode": request.param, "watch.rescan_seconds": 0.5, "watch.settle_seconds": 0.2,
        "defaults.width": 64, "defaults.height": 64})
    renderer = SolidRenderer()
    daemon = Service(settings, renderer)
    thread = threading.Thread(target=daemon.run, name="daemon-under-test")
    thread.start()
    assert daemon.ready.wait(30), "the daemon did not get ready"
    yield daemon, renderer, tmp_path
    daemon.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()


def _wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    missing = paths
    while missing:
        missing = [p for p in missing if not p.exists()]
        assert time.monotonic() < deadline, f"{len(missing)} results missing, e.g. {missing[:3]}"
        time.sleep(0.1)


@pytest.mark.xdist_group("crowd")  # 5,000 files: not beside the other crowds
def test_flood_of_5000_files_all_rendered_none_twice(running: tuple[Service, SolidRenderer, Path]) -> None:
    """Dropped at once, more events than inotify's queue holds: the rescan finds what
    the events lost."""
    daemon, renderer, root = running
    inbox, outbox = root / "inbox", root / "outbox"
    names = [f"flood-{k:05d}" for k in range(5000)]
    for name in names:
        temp = inbox / f".{name}.json.tmp"
        temp.write_text(json.dumps({"prompt": name, "seed": 1}))
        os.rename(temp, inbox / f"{name}.json")
    _wait_for([outbox / f"{name}.json" for name in names], timeout=600)
    assert renderer.renders == {name: 1 for name in names}
    results = {json.loads((outbox / f"{name}.json").read_text())["status"] for name in names}
    assert results == {"succeeded"}
    assert not list(outbox.glob("*.dup*")), "no job was taken for a duplicate of itself"
    assert not os.listdir(inbox)
    # Each input is archived after its result is out.
    done = root / "state" / "done"
    wait_for(lambda: len(os.listdir(done)) == 5000, message=lambda: f"{len(os.listdir(done))} of 5000 archived")


@pytest.mark.parametrize("running", ["inotify"], indirect=True)
def test_dead_watcher_is_restarted(running: tuple[Service, SolidRenderer, Path]) -> None:
    daemon, renderer, root = running
    watcher = daemon.broker.watcher
    events = watcher._events
    events.stop()  # what a failed read or an exception in the reader thread leaves behind
    deadline = time.monotonic() + 30
    while watcher._events is events or not watcher.alive():
        assert time.monotonic() < deadline, "the dead watcher was not replaced"
        time.sleep(0.05)
    (root / "inbox" / ".after.json.tmp").write_text(json.dumps({"prompt": "after the restart"}))
    os.rename(root / "inbox" / ".after.json.tmp", root / "inbox" / "after.json")
    _wait_for([root / "outbox" / "after.json"], timeout=30)


STOP_SCRIPT = """
import os, random, signal, sys, threading, time
sys.path.insert(0, {tests!r})
from test_queue_mechanics import SolidRenderer
from sbrender.config import load_settings
from sbrender.service import Service
from sbrender.errors import ShutdownRequested

class Endless(SolidRenderer):
    def render(self, job, seeds, on_step=None):
        step = 0
        while True:  # steps as fast as possible: the status file is written at each one
            step += 1
            if on_step(step, 10**9):
                raise ShutdownRequested()

root = {root!r}
os.makedirs(root + "/inbox", exist_ok=True)
open(root + "/inbox/endless.json", "w").write('{{"prompt": "x"}}')
settings = load_settings(env={{}}, overrides={{"inbox": root + "/inbox", "outbox": root + "/outbox",
    "state": root + "/state", "watch.mode": "polling", "watch.settle_seconds": 0, "metrics_dir": "off"}})
threading.Timer(0.5 + random.random(), os.kill, (os.getpid(), signal.SIGTERM)).start()
sys.exit(Service(settings, Endless()).run())
"""


@pytest.mark.parametrize("attempt", range(3))
def test_one_sigterm_always_stops_a_busy_daemon(tmp_path: Path, attempt: int) -> None:
    """The signal may land while the status file is being written (each step):
    the handler must not wait on anything the interrupted code holds."""
    import subprocess
    import sys

    script = STOP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path / "spool"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "spool" / "inbox" / "endless.json").exists(), "the interrupted job went back"


def test_the_loop_looks_again_when_a_waiting_file_may_be_read(tmp_path: Path) -> None:
    """A file renamed in from another folder (a creation event, no writer) waits
    only its short grace; a file with no event at all, its settle time. The
    loop sleeps until then, not a fixed interval."""
    from sbrender.jobs import Rules
    from sbrender.queue import JobQueue
    from sbrender.spool import Spool
    from sbrender.watcher import CREATED_GRACE_S, Hint, Seen

    spool = Spool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state")
    spool.prepare()
    (spool.inbox / "moved.yaml").write_text("prompt: moved in\n")
    hints = {"moved.yaml": Seen(Hint.CREATED, time.monotonic())}
    queue = JobQueue(spool, Rules(), 5.0, hints.get)
    queue.refresh(["moved.yaml"])
    assert queue.waiting == {"moved.yaml"} and len(queue) == 0
    assert 0 < queue.look_again_in(1.0) <= CREATED_GRACE_S
    hints["moved.yaml"] = Seen(Hint.CREATED, time.monotonic() - 2 * CREATED_GRACE_S)  # the grace is over
    queue.refresh([])
    assert not queue.waiting and len(queue) == 1

    (spool.inbox / "quiet.yaml").write_text("prompt: no events\n")  # polling: only its age tells
    queue.refresh(["quiet.yaml"])
    assert queue.waiting == {"quiet.yaml"}
    assert 4.0 < queue.look_again_in(10.0) <= 5.0
    assert queue.look_again_in(0.1) == 0.1
