"""The queue: which job renders next.

Order: highest priority first, then first come first served (the file's
modification time, then its name, then the job's place in a batch). Files are
parsed when they are complete, while still in the inbox, so that their
priority counts; a file is claimed only when one of its jobs is next, which
keeps the inbox the place where waiting work is visible.

Work per job does not grow with the queue: entries sit in a heap, and only the
names the watcher reports (or the periodic rescan) are looked at again.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import ids
from .errors import UnsafeFileError
from .jobfile import read_bytes
from .jobs import BadJob, Entry, Job, Rules, parse_job_bytes
from .spool import FileInfo, Spool
from .watcher import Seen, settles_in


@dataclass
class Candidate:
    """A job file known to the queue, in the inbox or claimed."""

    info: FileInfo
    claimed: bool
    entries: list[Entry] = field(default_factory=list)
    data: bytes = b""
    generation: int = 0
    finished: set[str] = field(default_factory=set)
    any_failed: bool = False
    in_flight: int = 0  # entries dispatched whose results are not yet published
    stuck: bool = False  # a result could not be published: the file stays claimed

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def path(self) -> Path:
        return self.info.path

    def pending(self) -> list[Entry]:
        return [e for e in self.entries if e.id not in self.finished]


@dataclass(frozen=True)
class Pick:
    candidate: Candidate
    entry: Entry


def _sort_key(entry: Entry, info: FileInfo, index: int) -> tuple[int, int, str, int]:
    return (-entry.priority, info.mtime_ns, info.name, index)


class JobQueue:
    """Candidates by name, plus a heap of their pending entries."""

    def __init__(self, spool: Spool, rules: Rules, settle_s: float, hint: Callable[[str], Seen | None]) -> None:
        self.spool = spool
        self.rules = rules
        self.settle_s = settle_s
        self.hint = hint
        self.candidates: dict[str, Candidate] = {}
        self.waiting: set[str] = set()  # in the inbox, not yet complete
        self._settled_at = math.inf  # time.monotonic() when the first waiting file may be read
        self._heap: list[tuple[tuple[int, int, str, int], int, str, int, int]] = []
        self._by_id: dict[str, str] = {}  # job id -> candidate name, for cancels
        self._pending = 0  # len(): pending entries over all candidates
        self._deferred: list[Pick] = []  # popped, could not be claimed; back at the next full scan
        self._seq = itertools.count()
        # Never reused, so heap entries of a forgotten file cannot match a new one of that name.
        self._generations = itertools.count(1)

    # --- learning about files ------------------------------------------------------

    def add_claimed(self, info: FileInfo) -> Candidate:
        """A file already in the work folder (a restart after a crash or stop)."""
        cand = Candidate(info, claimed=True, generation=next(self._generations))
        self._load(cand, final=True)
        self._put(cand)
        return cand

    def full_scan(self) -> set[str]:
        """Look at every inbox file: the folder is the truth, events are only hints.
        Entries deferred since the last scan are back in their places. The names
        seen."""
        deferred, self._deferred = self._deferred, []
        for pick in deferred:
            self.requeue(pick)
        self._settled_at = math.inf  # recomputed: every inbox file is looked at again
        seen: set[str] = set()
        for info in self.spool.inbox_files():
            seen.add(info.name)
            self._consider(info)
        for name, cand in list(self.candidates.items()):
            if not cand.claimed and name not in seen:
                self._forget(name)
        return seen

    def refresh(self, names: Iterable[str]) -> None:
        """Look again at some inbox names (from events, or still settling)."""
        self._settled_at = math.inf  # recomputed: every waiting name is looked at again
        for name in set(names) | set(self.waiting):
            info = FileInfo.of(self.spool.inbox / name)
            if info is None:
                if name in self.candidates and not self.candidates[name].claimed:
                    self._forget(name)
                self.waiting.discard(name)
            elif ids.is_job_file_name(name):
                self._consider(info)

    def _forget(self, name: str) -> None:
        cand = self.candidates.pop(name, None)
        self._pending -= len(cand.pending()) if cand is not None else 0
        for entry in cand.entries if cand is not None else ():
            if self._by_id.get(entry.id) == name:
                del self._by_id[entry.id]
        self.waiting.discard(name)

    def _consider(self, info: FileInfo) -> None:
        known = self.candidates.get(info.name)
        if known is not None and known.claimed:
            self.waiting.add(info.name)  # a newer file of the same name: look again once the claim ends
            return
        if known is not None and known.info.key == info.key:
            return
        if info.is_regular:
            left = settles_in(self.hint(info.name), info.changed_ns, self.settle_s)
            if left > 0:
                self._settled_at = min(self._settled_at, time.monotonic() + left)
                self.waiting.add(info.name)
                return
        cand = Candidate(info, claimed=False, generation=next(self._generations))
        if self._load(cand, final=False):
            self._put(cand)
            self.waiting.discard(info.name)
        else:
            self.waiting.add(info.name)

    def _put(self, cand: Candidate) -> None:
        old = self.candidates.get(cand.name)
        if old is not None:
            self._pending -= len(old.pending())
        self.candidates[cand.name] = cand
        self._pending += len(cand.pending())

    def _load(self, cand: Candidate, final: bool) -> bool:
        """Read and parse; False when the file looks unfinished and should be retried."""
        try:
            cand.data = read_bytes(cand.path, self.rules.read_cap)
        except FileNotFoundError:
            return False
        except UnsafeFileError as err:
            cand.entries = [BadJob(_file_id(cand.name), err, 0, cand.name)]
        else:
            cand.entries = parse_job_bytes(cand.name, cand.data, self.rules)
            if not final and self._maybe_unfinished(cand):
                return False
        for index, entry in enumerate(cand.entries):
            self._by_id[entry.id] = cand.name
            heapq.heappush(self._heap, (_sort_key(entry, cand.info, index), next(self._seq), cand.name,
                                        cand.generation, index))
        return True

    def _maybe_unfinished(self, cand: Candidate) -> bool:
        """A file that fails to parse and changed within the settle interval may be
        half-written by a writer that does not rename: give it time."""
        bad = len(cand.entries) == 1 and isinstance(cand.entries[0], BadJob)
        young = time.time() - cand.info.changed_ns / 1e9 < max(self.settle_s, 0.5)
        return bad and young and not isinstance(cand.entries[0].error, UnsafeFileError)

    # --- taking work ---------------------------------------------------------------

    def _peek(self) -> Pick | None:
        """The next entry to process, left in the heap; stale heap items are dropped."""
        while self._heap:
            _, _, name, generation, index = self._heap[0]
            cand = self.candidates.get(name)
            if cand is None or cand.generation != generation or index >= len(cand.entries) \
                    or cand.entries[index].id in cand.finished:
                heapq.heappop(self._heap)
                continue
            return Pick(cand, cand.entries[index])
        return None

    def pop(self) -> Pick | None:
        """The next entry to process, or None when nothing is ready."""
        pick = self._peek()
        if pick is not None:
            heapq.heappop(self._heap)
        return pick

    def pop_batch(self, max_images: int, key: Callable[[Entry], Hashable | None]) -> list[Pick]:
        """The next entry and those right behind it in queue order that can share its
        pipeline call (the same ``key``, not None), up to ``max_images`` images. Only
        consecutive entries: a batch never overtakes an entry it cannot take along."""
        first = self.pop()
        if first is None:
            return []
        picks = [first]
        want = key(first.entry)
        images = _images(first.entry)
        while want is not None and (pick := self._peek()) is not None:
            if key(pick.entry) != want or images + _images(pick.entry) > max_images:
                break
            heapq.heappop(self._heap)
            picks.append(pick)
            images += _images(pick.entry)
        return picks

    def reload_claimed(self, cand: Candidate, info: FileInfo) -> bool:
        """After the claim, read the file from the work folder. True when its content
        is what was parsed in the inbox; otherwise its entries are queued afresh."""
        cand.info = info
        cand.claimed = True
        try:
            data = read_bytes(info.path, self.rules.read_cap)
        except (UnsafeFileError, OSError):
            data = None
        if data == cand.data:
            return True
        self._pending -= len(cand.pending()) if self.candidates.get(cand.name) is cand else 0
        cand.generation = next(self._generations)
        self._load(cand, final=True)
        self._pending += len(cand.pending()) if self.candidates.get(cand.name) is cand else 0
        return False

    def requeue(self, pick: Pick) -> None:
        """A popped entry that could not be processed now: back in its place."""
        cand = pick.candidate
        index = next((i for i, e in enumerate(cand.entries) if e is pick.entry), None)
        if index is not None and self.candidates.get(cand.name) is cand:
            heapq.heappush(self._heap, (_sort_key(pick.entry, cand.info, index), next(self._seq), cand.name,
                                        cand.generation, index))

    def defer(self, pick: Pick) -> None:
        """A popped entry whose file cannot be claimed now: back in the queue at
        the next full scan, not at once (it would be picked again and again)."""
        self._deferred.append(pick)

    def stale(self, pick: Pick) -> bool:
        """Whether the file was read again since this entry was popped."""
        return all(e is not pick.entry for e in pick.candidate.entries)

    def dispatch(self, cand: Candidate, entry: Entry) -> None:
        """An entry handed on to be published: never picked again."""
        if entry.id not in cand.finished and self.candidates.get(cand.name) is cand:
            self._pending -= 1
        cand.finished.add(entry.id)
        cand.in_flight += 1

    def finish(self, cand: Candidate, ok: bool) -> bool:
        """A dispatched entry's result is published; True when its whole file is done."""
        cand.in_flight -= 1
        cand.any_failed |= not ok
        return not cand.pending() and not cand.in_flight and not cand.stuck

    def find(self, job_id: str) -> Pick | None:
        """The pending entry with this id, if the queue holds it."""
        cand = self.candidates.get(self._by_id.get(job_id, ""))
        if cand is None:
            return None
        entry = next((e for e in cand.entries if e.id == job_id and e.id not in cand.finished), None)
        return Pick(cand, entry) if entry is not None else None

    def drop(self, cand: Candidate) -> None:
        """Forget a finished or vanished file; a newer file of the same name that
        waited for it stays waiting."""
        waiting = cand.name in self.waiting
        self._forget(cand.name)
        if waiting:
            self.waiting.add(cand.name)

    def look_again_in(self, most: float) -> float:
        """How long to wait before looking at the waiting files again: ``most``, or
        less when one of them may be read sooner (a file renamed in from another
        folder, after its short grace; a file with no events, once settled)."""
        return max(0.0, min(most, self._settled_at - time.monotonic()))

    def __len__(self) -> int:
        """Pending entries, kept as a running count: asked at every status update."""
        return self._pending


def _images(entry: Entry) -> int:
    return entry.count if isinstance(entry, Job) else 1


def _file_id(name: str) -> str:
    stem = ids.stem(name)
    return stem if ids.id_problem(stem) is None else ids.safe_id_for(name)

