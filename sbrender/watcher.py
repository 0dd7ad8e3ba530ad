"""Watching the inbox: events are hints, the folder is the truth.

The watcher never decides what exists; the daemon's scan of the folder does.
Events only (1) wake the daemon at once instead of at the next periodic rescan,
and (2) tell whether a file is complete: renamed into place or closed after
writing (inotify). Files with no such hint (present at start, events lost,
polling mode) are read once they have been quiet for a settle interval.
"""

from __future__ import annotations

import enum
import functools
import operator
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import inotify
from .ids import is_job_file_name

log = structlog.get_logger("sbrender")

# A file seen created but never written (a hard link, or a writer slow to start):
# the first write of a real writer follows the creation within microseconds;
# this grace covers the gap.
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
        self._lost = False  # events were lost: every name must be looked at

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

    def forget(self, name: str) -> None:
        """Drop a name's hint without asking for another look at it."""
        with self._lock:
            self._seen.pop(name, None)

    def lost(self) -> None:
        """Events were lost (a queue overflow, a gap in watching): no hint can be
        trusted, and names no event will mention wait for a full scan."""
        with self._lock:
            self._seen.clear()
            self._lost = True

    def take_lost(self) -> bool:
        """Whether events were lost since the last call."""
        with self._lock:
            lost, self._lost = self._lost, False
            return lost

    def retain(self, names: set[str], since: float) -> None:
        """Keep only the hints of ``names`` (the folder's listing, begun at
        ``since``) and those newer than the listing: a name that left the inbox by
        a rename we do not watch (a peer's claim, a user's ``mv``) leaves no event."""
        with self._lock:
            self._seen = {name: seen for name, seen in self._seen.items() if name in names or seen.at >= since}

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


# inotify events -> what they say of a name. A claim renames a file out of the
# inbox (IN_MOVED_FROM): not asked for, so a claim wakes nobody; the claimer
# forgets the name's hint itself (``InboxWatcher.forget``).
HINTS_BY_EVENT = ((inotify.IN_CREATE, Hint.CREATED), (inotify.IN_MODIFY, Hint.WRITING),
                  (inotify.IN_CLOSE_WRITE, Hint.COMPLETE), (inotify.IN_MOVED_TO, Hint.COMPLETE),
                  (inotify.IN_DELETE, None))
MASK = functools.reduce(operator.or_, (kind for kind, _ in HINTS_BY_EVENT))


def _record(hints: Hints, events: list[tuple[int, str]]) -> None:
    """One read's events as hints. Only a write means a writer: readers (the
    daemon, `sbrender jobs`) open files too."""
    for mask, name in events:
        if mask & inotify.IN_Q_OVERFLOW:
            hints.lost()  # every file waits out its settle time, as at start, and is looked at
            continue
        if mask & inotify.IN_ISDIR or not is_job_file_name(name):
            continue
        for kind, hint in HINTS_BY_EVENT:
            if mask & kind:
                hints.set(name, hint) if hint is not None else hints.drop(name)


class InboxWatcher:
    """Starts and stops the inotify reader; the daemon asks ``alive`` and ``hint``."""

    def __init__(self, folder: Path, mode: str, wake: threading.Event) -> None:
        self.folder = folder
        self.mode = mode
        self.wake = wake
        self.hints = Hints()
        self._events: inotify.FolderEvents | None = None

    @property
    def strategy(self) -> str:
        return "inotify" if self._events is not None else "polling"

    def start(self) -> None:
        """Start watching. Falls back to polling in ``auto`` mode when inotify fails
        (not Linux, no inotify on the filesystem, or its watch limit reached)."""
        if self.mode == "polling":
            return
        self.hints.lost()  # events before now (a restart's gap) are not known
        events = inotify.FolderEvents(self.folder, MASK, self._on_events)
        try:
            events.start()
        except OSError as err:
            if self.mode == "inotify":
                raise
            log.warning("cannot watch the inbox with inotify; polling it", folder=str(self.folder), error=str(err),
                        hint="raise fs.inotify.max_user_watches / max_user_instances, or set watch.mode: polling")
            return
        self._events = events

    def _on_events(self, events: list[tuple[int, str]]) -> None:
        try:
            _record(self.hints, events)
        finally:
            self.wake.set()

    def alive(self) -> bool:
        return self._events is None or self._events.alive()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._events is not None:
            self._events.stop()
            self._events = None

    def hint(self, name: str) -> Seen | None:
        return self.hints.get(name)

    def forget(self, name: str) -> None:
        """The daemon took ``name`` out of the inbox: its hint no longer applies."""
        self.hints.forget(name)

    def drain(self) -> set[str]:
        return self.hints.drain()

    def events_lost(self) -> bool:
        """Whether a full scan is due because events were lost (or watching restarted)."""
        return self.hints.take_lost()

    def retain(self, names: set[str], since: float) -> None:
        self.hints.retain(names, since)
