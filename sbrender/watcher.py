"""Watching the inbox: events are hints, the folder is the truth.

The watcher never decides what exists; the daemon's scan of the folder does.
Events only (1) wake the daemon at once instead of at the next periodic rescan,
and (2) tell whether a file is complete: renamed into place or closed after
writing (inotify). Files with no such hint (present at start, events lost,
polling mode) are read once they have been quiet for a settle interval.
"""

from __future__ import annotations

import enum
import importlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog import events
from watchdog.observers.api import BaseObserver

from .ids import is_job_file_name

# A file seen created but never opened for writing was renamed in from another
# folder (watchdog reports that as a creation). The open event of a real writer
# follows the creation within microseconds; this grace covers the gap.
CREATED_GRACE_S = 0.05
# A writer that keeps a file open but silent this long is taken to be gone
# (its close event lost to a queue overflow, say).
STALE_WRITE_S = 30.0


class Hint(enum.Enum):
    CREATED = "created"  # appeared; nobody seen writing yet
    WRITING = "writing"  # a writer has it open
    COMPLETE = "complete"  # closed after writing, or renamed into place


@dataclass(frozen=True)
class Seen:
    hint: Hint
    at: float  # time.monotonic() of the event


class Hints:
    """What the events said about each inbox name, safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, Seen] = {}
        self._dirty: set[str] = set()

    def set(self, name: str, hint: Hint) -> None:
        with self._lock:
            self._seen[name] = Seen(hint, time.monotonic())
            self._dirty.add(name)

    def drop(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)
            self._dirty.add(name)

    def drain(self) -> set[str]:
        """The names events mentioned since the last call."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return dirty

    def get(self, name: str) -> Seen | None:
        with self._lock:
            return self._seen.get(name)


def settles_in(seen: Seen | None, changed_ns: int, settle_s: float, now: float | None = None) -> float:
    """Seconds until a file may be read; zero or less: it may be read now.

    ``changed_ns`` is the file's last change (max of mtime and ctime, wall clock).
    """
    quiet_s = time.time() - changed_ns / 1e9
    if seen is None:
        return settle_s - quiet_s
    now = time.monotonic() if now is None else now
    if seen.hint is Hint.COMPLETE:
        return 0.0
    if seen.hint is Hint.CREATED:
        return CREATED_GRACE_S - (now - seen.at)
    return STALE_WRITE_S - quiet_s


class _Handler(events.FileSystemEventHandler):
    """Turns events into hints and a wake-up. Never raises: an exception here
    would kill watchdog's thread silently."""

    def __init__(self, folder: Path, hints: Hints, wake: threading.Event) -> None:
        self.folder = os.path.realpath(folder)
        self.hints = hints
        self.wake = wake
        self.errors = 0

    def _name(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        if os.path.dirname(os.path.realpath(path)) != self.folder:
            return None
        name = os.path.basename(path)
        return name if is_job_file_name(name) else None

    def on_any_event(self, event: events.FileSystemEvent) -> None:
        try:
            self._record(event)
        except Exception:  # noqa: BLE001 - see class docstring; the rescan covers us
            self.errors += 1
        self.wake.set()

    def _record(self, event: events.FileSystemEvent) -> None:
        if event.is_directory:
            return
        name = self._name(event.src_path)
        if isinstance(event, events.FileMovedEvent):
            if name:
                self.hints.drop(name)
            dest = self._name(event.dest_path)
            if dest:
                self.hints.set(dest, Hint.COMPLETE)
        elif name is None:
            return
        elif isinstance(event, events.FileCreatedEvent):
            self.hints.set(name, Hint.CREATED)
        elif isinstance(event, events.FileModifiedEvent):
            # Only a write means a writer: readers (the daemon, `sbrender jobs`) open
            # files too. A file created and not yet written is caught by the parse
            # check for young files.
            self.hints.set(name, Hint.WRITING)
        elif isinstance(event, events.FileClosedEvent):
            self.hints.set(name, Hint.COMPLETE)
        elif isinstance(event, events.FileDeletedEvent):
            self.hints.drop(name)


def _make_observer(mode: str) -> BaseObserver | None:
    """The observer for a watch mode; None means scanning alone (polling)."""
    if mode == "polling":
        return None
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:
        if mode == "inotify":
            raise
        return None
    _shorten_move_pairing()
    return InotifyObserver()


MOVE_PAIR_S = 0.01


def _shorten_move_pairing() -> None:
    """watchdog holds each unpaired IN_MOVED_FROM for 0.5 s, waiting for its
    IN_MOVED_TO, and every event queued behind it waits too. Each claim moves a
    file out of the inbox, so a job dropped just after a claim was noticed up to
    half a second late. The kernel queues both halves of a rename together, so
    a short wait pairs them; a pair that is split anyway reads as a delete and a
    create, which the hints handle."""
    for module, name in (("watchdog.observers.inotify_move_event_grouper", "InotifyMoveEventGrouper"),
                         ("watchdog.observers.inotify_buffer", "InotifyBuffer")):  # watchdog 7; 4 to 6
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls, "delay", 0) > MOVE_PAIR_S:
            cls.delay = MOVE_PAIR_S


class InboxWatcher:
    """Starts and stops the observer; the daemon asks ``alive`` and ``hint``."""

    def __init__(self, folder: Path, mode: str, wake: threading.Event) -> None:
        self.folder = folder
        self.mode = mode
        self.wake = wake
        self.hints = Hints()
        self._observer: BaseObserver | None = None
        self._handler = _Handler(folder, self.hints, wake)

    @property
    def strategy(self) -> str:
        return "inotify" if self._observer is not None else "polling"

    def start(self) -> None:
        """Start watching. Falls back to polling in ``auto`` mode when inotify fails
        (no inotify on the filesystem, or its watch limit reached)."""
        observer = _make_observer(self.mode)
        if observer is None:
            return
        try:
            observer.schedule(self._handler, str(self.folder), recursive=False)
            observer.start()
        except OSError:
            if self.mode == "inotify":
                raise
            return
        self._observer = observer

    def alive(self) -> bool:
        return self._observer is None or self._observer.is_alive()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def hint(self, name: str) -> Seen | None:
        return self.hints.get(name)

    def drain(self) -> set[str]:
        return self.hints.drain()
