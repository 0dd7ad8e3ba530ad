"""The writer thread: results are encoded, hashed, written and fsynced here,
in the order they were handed over, while the renderer starts the next job.
What piled up while it wrote is published together, with one flush per phase
(``outputs.commit``), so a slow disk costs a flush per group, not per file.

It only publishes. What follows a publish (counting, archiving the input) is
the daemon loop's, which collects finished work with ``completed()``; so queue
state is touched by one thread only. The hand-over queue is bounded: when the
disk falls behind, the renderer waits instead of piling images up in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from .outputs import Publication, commit

log = structlog.get_logger("sbrender")

Work = Callable[[], Any]


class Writer:
    def __init__(self, folder: Path, wake: threading.Event, depth: int = 8) -> None:
        self.folder = folder
        self.wake = wake
        self._tasks: queue.Queue[tuple[Work, Any] | None] = queue.Queue(maxsize=depth)
        self._done: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, work: Work, tag: Any) -> None:
        """Run ``work`` (it returns a ``Publication``) on the writer thread and
        publish what it returns; ``(tag, the published result)`` comes back through
        ``completed()``, with None as the result when it could not be published."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="sbrender-writer", daemon=True)
            self._thread.start()
        self._tasks.put((work, tag))

    def _run(self) -> None:
        stop = False
        while not stop:
            group = [self._tasks.get()]
            while group[-1] is not None and len(group) < self._tasks.maxsize:
                try:
                    group.append(self._tasks.get_nowait())
                except queue.Empty:
                    break
            if group[-1] is None:
                stop = True
            items = [item for item in group if item is not None]
            pubs: list[tuple[Any, Publication | None]] = []
            for work, tag in items:
                try:
                    pubs.append((tag, work()))
                except BaseException:  # noqa: BLE001 - one result lost, not the writer
                    log.exception("unexpected error while publishing a result; its file stays claimed")
                    pubs.append((tag, None))
            ready = [pub for _, pub in pubs if pub is not None]
            try:
                published = iter(commit(self.folder, ready) if ready else [])
            except BaseException:  # noqa: BLE001
                log.exception("unexpected error while publishing results; their files stay claimed")
                published = iter([None] * len(ready))
            for tag, pub in pubs:
                self._done.put((tag, next(published) if pub is not None else None))
            for _ in group:
                self._tasks.task_done()
            self.wake.set()

    def completed(self) -> Iterator[tuple[Any, Any]]:
        """What was published since the last call, in order; never waits."""
        while True:
            try:
                yield self._done.get_nowait()
            except queue.Empty:
                return

    def busy(self) -> bool:
        return self._tasks.unfinished_tasks > 0

    def drain(self) -> None:
        """Wait until everything handed over is published."""
        if self._thread is not None and self._thread.is_alive():
            self._tasks.join()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        self._thread = None
