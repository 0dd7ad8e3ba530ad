"""The status file's step path: a render's steps cost the render thread a tuple
each; the heartbeat thread writes the latest, with the queue depth and the time
the step was made, and a state set after a step is never undone by it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from sbrender.results import parse_iso
from sbrender.status import StatusFile


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wait_for(predicate: Any, message: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(message)


def test_steps_are_written_by_the_heartbeat_thread_with_the_queue_and_their_time(tmp_path: Path) -> None:
    path = tmp_path / "me.json"
    mirrored: list[dict[str, Any]] = []
    status = StatusFile(path, "me", mirrors=(mirrored.append, None))
    stop = threading.Event()
    status.start_heartbeat(stop)
    try:
        status.update("idle", queued=0)
        assert read(path)["state"] == "idle", "a state change is written at once"
        status.update("rendering", current={"job": "cat", "step": 0, "steps": 10}, queued=1)
        made = time.time()
        status.step(3, 10, queued=2)
        data = wait_for(lambda: (d := read(path))["state"] == "rendering" and d["current"]["step"] == 3 and d,
                        "the step was never written")
        assert data["current"] == {"job": "cat", "step": 3, "steps": 10} and data["queued"] == 2
        assert abs(parse_iso(data["progress_at"]) - made) < 1.0, "progress_at is the step's own time"
        assert mirrored[-1]["current"]["step"] in (0, 3) and mirrored[0]["state"] == "idle"
        status.step(4, 10, queued=2)
        status.update("idle", queued=0)  # the render ended before the heartbeat wrote step 4
        assert read(path)["state"] == "idle"
        written = status._written
        status._dirty.set()  # a write by the heartbeat thread now must not bring the step back
        wait_for(lambda: status._written > written, "the heartbeat thread did not write")
        assert status.data["state"] == "idle" and read(path)["state"] == "idle"
    finally:
        stop.set()


def test_without_a_heartbeat_thread_a_step_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "me.json"
    status = StatusFile(path, "me")
    status.update("rendering", current={"job": "cat", "step": 0, "steps": 4}, queued=0)
    status.step(2, 4, queued=5)
    data = read(path)
    assert data["current"]["step"] == 2 and data["queued"] == 5
