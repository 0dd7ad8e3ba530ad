"""The daemon's status file, ``state/daemons/<owner>.json``.

What the daemon is doing (loading, idle, rendering, paused, stopping), its
current job and step, queue depth, counts and a heartbeat. Written on every
change (without fsync: it describes only the present): state changes at once,
denoising steps by the heartbeat thread (the latest step, at most every
``STEP_WRITE_S``); and at least every ``HEARTBEAT_S``, so that peers on other
hosts can tell a busy daemon (a model load, a long step) from a dead one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import structlog

from . import peers
from .errors import SpoolError
from .outputs import write_json
from .results import iso

log = structlog.get_logger("sbrender")

MIN_INTERVAL_S = 1.0
STEP_WRITE_S = 0.25  # step updates are written at most this often (each write takes the GIL)
HEARTBEAT_S = 5.0


class StatusFile:
    def __init__(self, path: Path, owner: str, mirrors: tuple[Callable[[dict[str, Any]], None] | None, ...] = (),
                 **fixed: Any) -> None:
        self.folder = path.parent
        self.name = path.name
        self.fixed = {"owner": owner, "pid": os.getpid(), "proc_start": peers.process_start(os.getpid()),
                      "host": peers.hostname(), **fixed}
        self.data: dict[str, Any] = {}
        self._written = 0.0
        self._lock = threading.Lock()  # one write at a time
        self._data_lock = threading.Lock()  # ``data`` is replaced by two threads; never held across a write
        self._step: tuple[int, int, int, float] | None = None  # (step, steps, queued, when): not yet in ``data``
        self._dirty = threading.Event()  # a step to write, for the heartbeat thread
        self._thread: threading.Thread | None = None
        # Where else the status goes each time it is written (a Redis queue: seen from every
        # host; systemd's STATUS=); called in the writing thread, their failures only logged.
        self.mirrors = [m for m in mirrors if m is not None]

    def update(self, state: str, *, force: bool = False, current: dict[str, Any] | None = None,
               **fields: Any) -> bool:
        """Record the state; written when anything in it changed (a new step, too),
        else at most once a second. True when it was written."""
        now = time.time()
        with self._data_lock:
            changed = state != self.data.get("state") or current != self.data.get("current")
            if not (force or changed or now - self._written >= MIN_INTERVAL_S):
                return False
            # progress_at comes only from the main thread (here and ``step``); the
            # heartbeat thread refreshes "heartbeat" alone, so a hung loop shows as stalled.
            stamp = iso(now)
            self.data = {**self.fixed, "state": state, "current": current, **fields, "heartbeat": stamp,
                         "progress_at": stamp}
            self._step = None
        self._later_or_now(force or state != "rendering")
        return True

    def step(self, step: int, steps: int, queued: int) -> None:
        """The current render's next denoising step: the cheap path, taken at every
        step (a dict and a timestamp per step were 1 % of a render). The heartbeat
        thread folds in the latest when it writes."""
        self._step = (step, steps, queued, time.time())
        self._later_or_now(False)

    def _later_or_now(self, now: bool) -> None:
        if now or self._thread is None or not self._thread.is_alive():
            self._write()
        elif not self._dirty.is_set():
            # Written by the heartbeat thread, so that a render thread bound by
            # kernel launches never waits on a file system call.
            self._dirty.set()

    def _snapshot(self) -> dict[str, Any]:
        """``data`` with the latest step folded in."""
        with self._data_lock:
            pending, self._step = self._step, None
            if pending is not None and self.data.get("state") == "rendering":
                step, steps, queued, at = pending
                self.data = {**self.data, "current": {**(self.data.get("current") or {}), "step": step, "steps": steps},
                             "queued": queued, "heartbeat": iso(time.time()), "progress_at": iso(at)}
            return self.data

    def _write(self) -> None:
        with self._lock:
            data = self._snapshot()
            try:
                write_json(self.folder, self.name, data, durable=False)
                self._written = time.time()
            except SpoolError as err:
                log.warning("cannot write status file", error=str(err))
            for mirror in self.mirrors:
                try:
                    mirror(data)
                except Exception as err:  # noqa: BLE001 - the status is a report: it never stops the daemon
                    log.debug("cannot publish the status", error=str(err))

    def start_heartbeat(self, stop: threading.Event, on_beat: Any = None) -> threading.Thread:
        """Keep the heartbeat fresh until ``stop`` is set, whatever the main thread
        does; ``on_beat(state)`` is called on each beat."""

        def beat() -> None:
            next_beat = time.monotonic() + HEARTBEAT_S
            while not stop.is_set():
                if self._dirty.wait(max(0.0, next_beat - time.monotonic())):
                    self._dirty.clear()
                    self._write()
                    # At most STEP_WRITE_S apart: the file shows the latest step, and
                    # the render thread is not asked for the GIL at every step.
                    stop.wait(STEP_WRITE_S)
                    if time.monotonic() < next_beat:
                        continue  # a busy render's steps must not starve the beat
                next_beat = time.monotonic() + HEARTBEAT_S
                if on_beat is not None:
                    on_beat(self.data.get("state"))
                if self.data and time.time() - self._written >= HEARTBEAT_S:
                    with self._data_lock:
                        self.data = {**self.data, "heartbeat": iso(time.time())}
                    self._write()

        def stopper() -> None:
            stop.wait()
            self._dirty.set()

        self._thread = threading.Thread(target=beat, name="sbrender-heartbeat", daemon=True)
        self._thread.start()
        threading.Thread(target=stopper, name="sbrender-heartbeat-stop", daemon=True).start()
        return self._thread

    def text(self) -> str:
        """One line for people (systemd's STATUS=, `sbrender status`)."""
        return describe(self.data)

    def remove(self) -> None:
        try:
            os.unlink(self.folder / self.name)
        except FileNotFoundError:
            pass


def describe(data: dict[str, Any]) -> str:
    """``rendering cat-42 step 12/28, 5 queued``, ``idle, 0 queued``, ``loading model ...``."""
    state = data.get("state", "unknown")
    current = data.get("current") or {}
    queued = f"{data.get('queued', 0)} queued"
    if state == "rendering":
        more = len(current.get("batch", [])) - 1
        job = f"{current.get('job')}" + (f" +{more}" if more > 0 else "")
        return f"rendering {job} step {current.get('step', 0)}/{current.get('steps', '?')}, {queued}"
    if state == "loading":
        return f"loading model {data.get('model')}"
    if state == "paused":
        return "paused: " + "; ".join(current.get("problems", []))
    if state == "idle":
        return f"idle, {queued}"
    return str(state)
