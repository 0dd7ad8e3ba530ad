"""The writer process: results come back in order, in groups; folders a result
depends on (the id ledger) are synced before the result is published, once per
group, and one that cannot be synced keeps its results unpublished. The process
ignores the signals a terminal or systemd sends to the group, dies with its
daemon, and a new one replaces one that died, with what was in flight reported
unpublished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import process_running
from sbrender import publisher
from sbrender.peers import pid_alive
from sbrender.results import Draft, ImageToWrite
from sbrender.writer import Report, Writer


def draft(job_id: str) -> Draft:
    image = ImageToWrite(f"{job_id}.png", Image.new("RGB", (8, 8), (10, 20, 30)), 7, {"parameters": job_id})
    return Draft(job_id, {"id": job_id, "status": "succeeded", "images": [], "timings": {}}, time.time(),
                 time.time(), {"inference_s": 0.0}, (image,))


def wait_for(predicate: Any, message: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(message)


def reports(w: Writer[str]) -> dict[str, dict[str, Any] | None]:
    got: list[Report[str]] = list(w.completed())
    return {r.tag: r.result for r in got}


def test_results_come_back_in_order_and_the_process_ends_at_stop(tmp_path: Path) -> None:
    w: Writer[str] = Writer(tmp_path, threading.Event(), depth=3)
    names = [f"job{k}" for k in range(7)]  # more than the depth: put waits for room
    for name in names:
        w.put(draft(name), name)
    pid = w.pid
    w.drain()
    got = list(w.completed())
    assert [r.tag for r in got] == names, "reports come back in order"
    assert all(r.result is not None and r.result["status"] == "succeeded" for r in got)
    assert got[0].result is not None and got[0].result["images"][0]["file"] == "job0.png"
    w.stop()
    assert pid is not None and not pid_alive(pid), "stop waits for the process"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.json" for n in names] + [f"{n}.png" for n in names])


def test_the_ledger_folder_is_synced_before_the_results_that_need_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    outbox, ids = tmp_path / "outbox", tmp_path / "ids"
    outbox.mkdir()
    ids.mkdir()
    synced: list[tuple[Path, list[str]]] = []  # (folder, results already published then)
    real = publisher.fsync_dir

    def spy(folder: Path) -> None:
        synced.append((folder, sorted(p.name for p in outbox.glob("*.json"))))
        real(folder)

    monkeypatch.setattr(publisher, "fsync_dir", spy)
    out = publisher.publish(outbox, [(draft("cat"), (ids,)), (draft("dog"), (ids,)), (draft("owl"), ())])
    assert all(r is not None and r["status"] == "succeeded" for r in out)
    ledger_syncs = [published for folder, published in synced if folder == ids]
    assert ledger_syncs == [[]], "once for the group, before any of its results"
    assert sorted(p.name for p in outbox.iterdir()) == ["cat.json", "cat.png", "dog.json", "dog.png",
                                                         "owl.json", "owl.png"]


def test_a_result_whose_folder_cannot_be_synced_is_not_published(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    w: Writer[str] = Writer(outbox, threading.Event())
    w.put(draft("cat"), "cat", (tmp_path / "gone",))
    w.put(draft("dog"), "dog")
    w.drain()
    w.stop()
    out = reports(w)
    assert out["cat"] is None, "not published: its file stays claimed and renders again at the next start"
    assert out["dog"] is not None and out["dog"]["status"] == "succeeded"
    assert not (outbox / "cat.json").exists() and not (outbox / "cat.png").exists()
    assert (outbox / "dog.json").exists()


def test_the_process_ignores_sigterm_and_sigint_and_publishes_on(tmp_path: Path) -> None:
    w: Writer[str] = Writer(tmp_path, threading.Event())
    w.start()
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # systemd sends both to every process of the unit
    os.kill(pid, signal.SIGINT)
    w.put(draft("cat"), "cat")
    w.drain()
    assert w.pid == pid, "the same process"
    assert reports(w)["cat"] is not None
    w.stop()


def test_a_dead_process_reports_what_was_in_flight_and_is_replaced(tmp_path: Path) -> None:
    woken = threading.Event()
    w: Writer[str] = Writer(tmp_path, woken)
    w.start()
    first = w.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # cannot publish what it is handed
    w.put(draft("cat"), "cat")
    w.put(draft("dog"), "dog")
    os.kill(first, signal.SIGKILL)
    w.drain()
    assert reports(w) == {"cat": None, "dog": None}, "unpublished: their files stay claimed"
    assert woken.is_set()
    assert not list(tmp_path.glob("*.json"))
    w.put(draft("owl"), "owl")
    w.drain()
    assert w.pid not in (None, first)
    assert reports(w)["owl"] is not None and (tmp_path / "owl.json").exists()
    w.stop()


def test_the_process_dies_with_its_daemon(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves no writer behind to publish what it
    was handed while the daemon's jobs are recovered elsewhere: here the writer
    is stopped (SIGSTOP) with three drafts in its pipe when its daemon dies, and
    it never publishes them."""
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        from pathlib import Path
        from PIL import Image
        from sbrender.results import Draft, ImageToWrite
        from sbrender import logs
        from sbrender.writer import Writer
        logs.configure("json", "warning")  # stdout carries the pid alone
        w = Writer(Path({str(tmp_path)!r}), threading.Event())
        w.start()
        # Started: it unblocks the stop signals once it has asked to die with us.
        while int(dict(l.split(":\\t") for l in open(f"/proc/{{w.pid}}/status").read().splitlines())["SigBlk"], 16) & (1 << (signal.SIGTERM - 1)):
            time.sleep(0.01)
        os.kill(w.pid, signal.SIGSTOP)
        for k in range(3):
            image = ImageToWrite(f"job{{k}}.png", Image.new("RGB", (8, 8)), 7, {{}})
            w.put(Draft(f"job{{k}}", {{"id": f"job{{k}}"}}, time.time(), time.time(), {{}}, (image,)), k)
        print(w.pid, flush=True)
        signal.pause()
    """)
    daemon = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        daemon.kill()
        daemon.wait()
        os.kill(child, signal.SIGCONT)  # a writer still alive would now publish all three
        wait_for(lambda: not process_running(child), "the writer process outlived its daemon")
        assert not list(tmp_path.iterdir()), "nothing published after the daemon died"
    finally:
        daemon.kill()
        daemon.wait()
        if child and process_running(child):
            os.kill(child, signal.SIGKILL)
