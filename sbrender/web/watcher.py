"""One shared watcher of the queue for every HTTP waiter.

However many requests wait, one asyncio task asks the queue (in a worker thread)
about every job someone waits on, streams, or that this front submitted and has
not seen finish, and hands out what it found: results to the futures of waiters,
progress to the streams, which read it after each tick. A waiter costs a future,
not a thread or a poll of its own. On the file spool, inotify on the outbox wakes
the watcher as soon as a result is published; the poll is the backstop (and the
only way on Redis, or on filesystems without inotify).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..client import PENDING, RUNNING, Client
from ..errors import SbrenderError

log = structlog.get_logger("sbrender")

POLL_S = 0.05  # while anything is waited on
SWEEP_S = 1.0  # with inotify on the outbox: every job's result is looked for this often (lost events)
LOST_S = 2.0  # a job neither queued, running nor finished this long is lost (removed by hand): its waiters are told
POSITIONS_S = 1.0  # queue positions (a listing of the whole queue) at most this often, for streams only


class JobLost(SbrenderError):
    """A waited job is no longer queued, running or finished (its file was removed)."""

    kind = "lost"


@dataclass
class Tracked:
    """A job this front submitted: who asked, through which API, since when."""

    caller: str
    api: str
    submitted: float = field(default_factory=time.time)


class Watcher:
    def __init__(self, client: Client, poll_s: float = POLL_S) -> None:
        self.client = client
        self.poll_s = poll_s
        self.tracked: dict[str, Tracked] = {}
        self.progress: dict[str, dict[str, Any]] = {}  # latest known state of each watched, unfinished job
        self._futures: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._streams: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._tick = asyncio.Event()
        self._positions_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._observer: Any = None
        self._published: set[str] = set()  # results inotify saw appear since the last look
        self._swept_at = 0.0
        self._looked: set[str] = set()  # ids read at least once (a new one is read at its first tick)
        self._missing: dict[str, float] = {}  # since when a job has been seen nowhere

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="sbrender-watcher")
        if self.client.queue is None:
            self._observer = _outbox_observer(self.client, lambda job_id: loop.call_soon_threadsafe(self._seen, job_id))

    def _seen(self, job_id: str) -> None:
        self._published.add(job_id)
        self._wake.set()

    async def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- what requests call --------------------------------------------------------------

    def track(self, job_id: str, caller: str, api: str) -> None:
        """A job submitted here: watched until it finishes (it counts against serve.max_queue)."""
        self.tracked[job_id] = Tracked(caller, api)
        self._wake.set()

    def outstanding(self) -> int:
        return len(self.tracked)

    def callers_jobs(self, caller: str, api: str) -> list[str]:
        return [job_id for job_id, t in self.tracked.items() if t.caller == caller and t.api == api]

    async def wait(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The job's result, or None after ``timeout`` seconds. Cancelling the
        awaiting task (a client gone) leaves the job alone."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(job_id, set()).add(future)
        self._wake.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiting = self._futures.get(job_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._futures[job_id]

    @contextlib.contextmanager
    def streaming(self, job_id: str) -> Iterator[None]:
        """While inside: the job's progress (and queue position) is kept in ``progress``."""
        self._streams[job_id] += 1
        self._positions_at = 0.0
        self._wake.set()
        try:
            yield
        finally:
            self._streams[job_id] -= 1
            if self._streams[job_id] <= 0:
                del self._streams[job_id]
                if job_id not in self.tracked:
                    self.progress.pop(job_id, None)

    async def next_tick(self, timeout: float) -> None:
        """Return after the watcher's next look at the queue (or ``timeout``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._tick.wait(), timeout)

    # --- the one loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            ids = sorted(set(self.tracked) | set(self._futures) | set(self._streams))
            if not ids:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            now = time.monotonic()
            positions = bool(self._streams) and now - self._positions_at >= POSITIONS_S
            # With inotify, only the results it saw appear are read, and every one
            # once a SWEEP_S: a tick costs the same for 1 waiter or 1000.
            sweep = self._observer is None or now - self._swept_at >= SWEEP_S
            if sweep:
                check, self._swept_at = ids, now
            else:
                check = [job_id for job_id in ids if job_id in self._published or job_id not in self._looked]
            self._published.clear()
            self._looked = set(ids)
            try:
                results, progress = await asyncio.to_thread(self._look, ids, check, positions, sweep)
            except Exception as err:  # noqa: BLE001 - a queue outage delays waiters, it must not end the watcher
                log.warning("cannot read the queue", error=str(err))
                results, progress = {}, {}
            if positions:
                self._positions_at = time.monotonic()
            self._publish(results, progress, sweep)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    def _publish(self, results: dict[str, dict[str, Any]], progress: dict[str, dict[str, Any]],
                 sweep: bool) -> None:
        now = time.monotonic()
        for job_id, state in list(progress.items() if sweep else ()):  # where a job is is known at sweeps
            if state["state"] != "unknown":
                self._missing.pop(job_id, None)
            elif now - self._missing.setdefault(job_id, now) >= LOST_S:
                self._lose(job_id)
                del progress[job_id]
        for job_id, state in progress.items():
            if state["state"] == "unknown" and job_id in self.progress:
                continue  # not seen this time: keep what was known
            if "position" not in state and "position" in self.progress.get(job_id, {}) and state["state"] == PENDING:
                state = {**state, "position": self.progress[job_id]["position"], "of": self.progress[job_id]["of"]}
            self.progress[job_id] = state
        for job_id, result in results.items():
            self.tracked.pop(job_id, None)
            self.progress[job_id] = {"state": result.get("status"), "result": True}
            for future in self._futures.pop(job_id, ()):
                if not future.done():
                    future.set_result(result)
            if job_id not in self._streams:
                self.progress.pop(job_id, None)
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def _lose(self, job_id: str) -> None:
        self._missing.pop(job_id, None)
        self.tracked.pop(job_id, None)
        error = JobLost(f"job {job_id} is no longer queued, running or finished",
                        hint="its job file or result was removed; submit it again")
        for future in self._futures.pop(job_id, ()):
            if not future.done():
                future.set_exception(error)
        if job_id in self._streams:
            self.progress[job_id] = {"state": "lost"}
        else:
            self.progress.pop(job_id, None)

    def _look(self, ids: list[str], check: list[str], positions: bool,
              sweep: bool) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """In a worker thread: the results of the jobs in ``check`` that finished
        (on Redis, of all ``ids``: one round trip either way), and where the other
        ``ids`` stand."""
        client = self.client
        results: dict[str, dict[str, Any]] = {}
        progress: dict[str, dict[str, Any]] = {}
        if client.queue is not None:  # one round trip for every job, results and steps alike
            for job_id, item in client.queue.look(ids).items():
                if "result" in item:
                    results[job_id] = item.pop("result")
                else:
                    progress[job_id] = item
        else:
            for job_id in check:
                result = client.result(job_id)
                if result is not None:
                    results[job_id] = result
            running = _running(client) if len(results) < len(ids) else {}
            for job_id in ids:
                if job_id not in results:
                    progress[job_id] = running.get(job_id) or {"state": PENDING}
                    if sweep and job_id not in running and not client.is_known(job_id):
                        progress[job_id] = {"state": "unknown"}
        rest = list(progress)
        if not rest:
            return results, progress
        if positions:
            pending = [j.id for j in client.jobs() if j.state == PENDING]
            places = {job_id: n for n, job_id in enumerate(pending, 1)}
            for job_id in rest:
                if job_id in places and progress[job_id]["state"] == PENDING:
                    progress[job_id] = {**progress[job_id], "position": places[job_id], "of": len(pending)}
        return results, progress


def _running(client: Client) -> dict[str, dict[str, Any]]:
    """The jobs the spool's live daemons render now, with their step (their status files)."""
    out = {}
    for daemon in client.daemons():
        current = daemon.get("current") or {}
        if daemon["alive"] and daemon.get("state") == "rendering":
            for job_id in current.get("batch") or [current.get("job")]:
                out[str(job_id)] = {"state": RUNNING, "step": current.get("step", 0), "steps": current.get("steps", 0)}
    return out


def _outbox_observer(client: Client, seen: Any) -> Any:
    """inotify on the outbox: ``seen(job_id)`` for each result published (a
    ``<id>.json`` renamed into place). None where inotify is not available (the
    poll still finds every result)."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:
        return None

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            name = os.path.basename(str(getattr(event, "dest_path", "") or event.src_path))
            if name.endswith(".json") and not name.startswith("."):
                seen(name[:-len(".json")])

    try:
        client.outbox.mkdir(parents=True, exist_ok=True)
        observer = InotifyObserver()
        observer.schedule(Handler(), str(client.outbox), recursive=False)
        observer.daemon = True
        observer.start()
        return observer
    except OSError as err:
        log.warning("no inotify on the outbox; polling it", error=str(err))
        return None
