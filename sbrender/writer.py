"""The daemon's side of the writer process (``publisher``): results are encoded,
hashed, written and fsynced there, in the order they were handed over, while
the renderer starts the next job. What piled up while it wrote is published
together, with one flush per phase (``outputs.commit``), so a slow disk costs
a flush per group, not per file.

It receives data (a ``results.Draft``: the images and the result but for what
the writes decide; and the folders to fsync before it is published, such as
the id ledger's) and reports data: per job, the result as published (a
success, or a failure when its images could not be written), or None when
nothing could be published (then the job's file stays claimed and renders
again at the next start). What follows a publish (counting, archiving the
input) is the dispatcher's, on its own thread. At most ``depth`` drafts are
in flight: when the disk falls behind, the renderer waits instead of piling
images up in memory.

A process, not a thread: at 4-step renders the render is bound by Python, and
a writer thread's work took the GIL from it. The process is spawned by the
thread that reads its reports, which lives exactly as long as it: the kernel
kills the process when that thread ends (``PR_SET_PDEATHSIG``). If the process
dies, what it had not reported is reported unpublished, and the next draft
starts a new one.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from . import logs, outputs, publisher
from .results import Draft

log = structlog.get_logger("sbrender")

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class Report(Generic[Tag]):
    """What became of one handed-over draft."""

    tag: Tag
    result: dict[str, Any] | None  # as published; None: nothing could be published


class _Child:
    """One writer process and the pipe's two ends; spawned by its reader thread."""

    def __init__(self, folder: Path, depth: int) -> None:
        to_child, self.feed_fd = os.pipe()
        self.reply_fd, from_child = os.pipe()
        spec = {"folder": str(folder), "in": to_child, "out": from_child, "parent": os.getpid(),
                "owner": outputs.writing_as(), "log_format": logs.current()[0], "log_level": logs.current()[1],
                "depth": depth, "path": [str(p) for p in sys.path]}
        # The daemon's own import path, and nothing from the working folder (-I).
        code = "import json, sys; sys.path[:] = json.loads(sys.argv[1])['path']; from sbrender.publisher import main; main()"
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", code, json.dumps(spec)],
                                         stdin=subprocess.DEVNULL, pass_fds=(to_child, from_child),
                                         start_new_session=True)  # no terminal's signals
        except BaseException:
            for fd in (self.feed_fd, self.reply_fd):
                os.close(fd)
            raise
        finally:
            os.close(to_child)
            os.close(from_child)
        self.feed = Connection(self.feed_fd, readable=False)
        self.replies = Connection(self.reply_fd, writable=False)


class Writer(Generic[Tag]):
    def __init__(self, folder: Path, wake: threading.Event, depth: int = 8) -> None:
        self.folder = folder
        self.wake = wake
        self.depth = depth
        self._cond = threading.Condition()
        # Held to send and to close a pipe: a closed descriptor's number may be reused at once.
        self._feed_lock = threading.Lock()
        self._tags: deque[Tag] = deque()  # handed over, not yet reported, in order
        self._done: deque[Report[Tag]] = deque()
        self._child: _Child | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()  # the running process said hello (or died)

    def start(self) -> None:
        """Spawn the writer process now, not with the first draft. One that cannot
        start is logged, and tried again with the first draft."""
        with self._cond:
            try:
                self._ensure_child()
            except Exception as err:  # noqa: BLE001 - logged; put tries again
                log.error("cannot start the writer process", error=f"{type(err).__name__}: {err}",
                          hint="check the process and memory limits")

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the writer process has started (its imports done), so that
        its start-up takes no CPU from the first renders. False on timeout."""
        return self._ready.wait(timeout)

    @property
    def pid(self) -> int | None:
        """The writer process's, while one runs."""
        child = self._child
        return child.proc.pid if child is not None else None

    def put(self, draft: Draft, tag: Tag, sync_first: tuple[Path, ...] = ()) -> None:
        """Publish ``draft`` in the writer process, after an fsync of each folder
        of ``sync_first`` (once per group); its ``Report`` comes back through
        ``completed()`` with ``tag``."""
        try:
            frame = pickle.dumps((draft, sync_first), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - this result lost, not the daemon
            log.exception("cannot hand a result to the writer process; its file stays claimed",
                          job_id=draft.result.get("id"))
            frame = pickle.dumps(None)  # reported unpublished, in its turn
        with self._cond:
            while len(self._tags) >= self.depth and self._child is not None:
                self._cond.wait()
            try:
                child = self._ensure_child()
            except Exception as err:  # noqa: BLE001 - this result lost, not the daemon
                log.error("cannot start the writer process; the result is not published",
                          error=f"{type(err).__name__}: {err}",
                          hint="check the process and memory limits; the job renders again at the next start")
                self._done.append(Report(tag, None))
                self.wake.set()
                return
            self._tags.append(tag)
        try:
            with self._feed_lock:
                child.feed.send_bytes(frame)
        except OSError:
            pass  # it died: its reader reports everything in flight, this one too

    def _ensure_child(self) -> _Child:
        """The running child, or a new one (spawned by its reader thread). Under the lock."""
        if self._child is not None:
            return self._child
        spawned: list[_Child | BaseException] = []
        ready = threading.Event()
        self._ready.clear()
        self._reader = threading.Thread(target=self._read, args=(spawned, ready), name="sbrender-writer",
                                        daemon=True)
        self._reader.start()
        ready.wait()
        if isinstance(spawned[0], BaseException):
            self._reader.join()
            raise spawned[0]
        self._child = spawned[0]
        log.debug("writer process started", pid=self._child.proc.pid)
        return self._child

    def _read(self, spawned: list[_Child | BaseException], ready: threading.Event) -> None:
        # This thread spawns the child: the kernel's parent-death signal is bound
        # to it, and it lives until the child has exited. It blocks the stop
        # signals (the main thread handles them), and the child inherits the mask:
        # one sent while it starts waits until it has chosen to ignore them.
        signal.pthread_sigmask(signal.SIG_BLOCK, publisher.STOP_SIGNALS)
        try:
            child = _Child(self.folder, self.depth)
        except BaseException as err:  # noqa: BLE001 - reported to the starter
            spawned.append(err)
            ready.set()
            return
        spawned.append(child)
        ready.set()
        try:
            child.replies.recv()  # its hello: started
            self._ready.set()
            while True:
                results = child.replies.recv()
                with self._cond:
                    self._done.extend(Report(self._tags.popleft(), result) for result in results)
                    self._cond.notify_all()
                self.wake.set()
        except (EOFError, OSError):
            pass
        finally:
            self._ready.set()  # no one waits for a dead one
            code = child.proc.wait()
            child.replies.close()
            with self._cond:
                if self._tags:
                    log.error("the writer process died; results in flight are not published, their files "
                              "stay claimed and render again at the next start", exit_code=code,
                              results=len(self._tags))
                self._done.extend(Report(tag, None) for tag in self._tags)
                self._tags.clear()
                if self._child is child:
                    self._child = None
                self._cond.notify_all()
            with self._feed_lock:
                child.feed.close()
            self.wake.set()

    def completed(self) -> Iterator[Report[Tag]]:
        """What was published since the last call, in order; never waits."""
        while True:
            try:
                yield self._done.popleft()
            except IndexError:
                return

    def busy(self) -> bool:
        return bool(self._tags)

    def drain(self) -> None:
        """Wait until everything handed over is published."""
        with self._cond:
            while self._tags:
                self._cond.wait()

    def stop(self) -> None:
        """Publish what was handed over, then end the writer process."""
        with self._cond:
            child, reader = self._child, self._reader
            self._child = None
        if child is not None:
            with self._feed_lock:
                child.feed.close()  # its end of input: it publishes the rest and exits
        if reader is not None:
            reader.join()
        self._reader = None
