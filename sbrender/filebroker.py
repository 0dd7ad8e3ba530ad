"""The file spool as a broker: job files in an inbox folder, claimed by rename.

It owns everything that knows files: the folders (``spool``), the inbox queue
(``queue``), the watcher, peers and crash recovery, claim back-off, cancel
requests (``state/cancel/<id>``) and the id ledger (``state/ids``). A delivery's
token is the claim token of its file (inode and mtime), which survives the
renames of a claim, a crash and a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from . import peers
from .broker import BatchKey, Delivery, Reservation, Take
from .config import Settings
from .errors import SpoolError
from .jobs import Entry, Rules
from .outputs import read_json
from .queue import Candidate, JobQueue, Pick
from .spool import FileInfo, Spool
from .watcher import InboxWatcher

log = structlog.get_logger("sbrender")


class FileBroker:
    """One daemon's view of a spool that it may share with peers."""

    def __init__(self, settings: Settings, wake: threading.Event) -> None:
        self.spool = Spool(settings.inbox, settings.outbox, settings.state)
        self.rescan_s: float = settings["watch.rescan_seconds"]
        self.watcher = InboxWatcher(settings.inbox, settings["watch.mode"], wake)
        # LoRA names are checked when a job renders, against loras_dir as it is then
        # (a file added after the start is found), not against a catalog from the start.
        rules = Rules.from_settings(settings, with_loras=False)
        self.queue = JobQueue(self.spool, rules, settings["watch.settle_seconds"], self.watcher.hint)
        self._identity: dict[object, tuple[int, int]] = {}
        self._problems: list[str] = []
        self._next_scan = 0.0
        self._temps_cleaned = False
        self._crashes: dict[str, dict[str, int]] = {}  # claim token -> job id -> crashes counted
        self._solo: set[str] = set()  # ids of a batch that was rendering when a daemon died
        self._blocked: dict[str, float] = {}  # names whose claim failed: not before this time
        self._held: dict[str, Candidate] = {}  # claim token -> the claimed file's candidate
        self._cancels: set[str] = set()  # the cancel requests last seen
        self._marks: list[str | None] = []  # per mark slot, the job it names (None: a spare)

    @property
    def owner(self) -> str:
        return self.spool.owner

    # --- life cycle ----------------------------------------------------------------

    def prepare(self) -> None:
        self.spool.prepare()

    def open(self) -> None:
        self._identity = self.spool.identity()
        self._recover()
        self.watcher.start()
        self._full_scan()
        self._next_scan = time.monotonic() + self.rescan_s

    def close(self) -> bool:
        self.watcher.stop()
        return self.spool.forget_owner(self.owner)

    def describe(self) -> dict[str, str]:
        return {"inbox": str(self.spool.inbox), "outbox": str(self.spool.outbox), "watch": self.watcher.strategy}

    def problems(self) -> list[str]:
        """Spool folders missing or replaced: then nothing is read, claimed or
        written, rather than taking an empty mount point for an empty queue."""
        problems = self.spool.identity_problems(self._identity)
        if not problems and self._problems:
            self.watcher.restart()  # the folders are back: watch them again, look at everything
            self._full_scan()
        self._problems = problems
        return problems

    def refresh(self) -> None:
        """The names events reported, or everything when the periodic rescan is due
        (events are hints and can be lost); a dead watcher is replaced."""
        if not self.watcher.alive():
            log.error("watcher thread died; restarting it and rescanning")
            self.watcher.restart()
            self._next_scan = 0.0
        now = time.monotonic()
        if now >= self._next_scan or self.watcher.events_lost():
            self._recover()
            self._full_scan()
            self._next_scan = now + self.rescan_s
        else:
            self.queue.refresh(self.watcher.drain())

    def _full_scan(self) -> None:
        """Every inbox file looked at; the watcher's hints of names gone pruned."""
        self.watcher.events_lost()  # this scan is the look a loss asked for; one during it asks again
        since = time.monotonic()
        self.watcher.retain(self.queue.full_scan(), since)

    def wait_s(self, most: float) -> float:
        wait = min(most, self._next_scan - time.monotonic())
        if self.queue.waiting:
            wait = min(wait, self.queue.look_again_in(0.1))
        return max(wait, 0.0)

    def pending(self) -> int:
        return len(self.queue)

    def drained(self) -> bool:
        # Asked when nothing could be taken: what is left waits to settle, or for a
        # claim that failed (tried after the next rescan, which --once does not wait for).
        return not self.queue.waiting

    # --- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        """Take over files claimed by daemons that are gone (a crash, a kill, a
        power cut). The jobs a dead daemon was rendering get a crash counted."""
        owners: dict[str, list[str]] = {}
        for owner, info in list(self.spool.orphans()):
            if owner not in owners:
                owners[owner] = self._was_rendering(owner)
            path = self.spool.adopt(info)
            adopted = FileInfo.of(path) if path is not None else None
            if adopted is None:
                continue  # a peer was quicker
            cand = self.queue.add_claimed(adopted)
            rendering = owners[owner]
            culprits = [e.id for e in cand.entries if e.id in rendering]
            for job_id in culprits:
                crashes = self.spool.count_attempt(adopted.claim_token, job_id)
                self._crashes.setdefault(adopted.claim_token, {})[job_id] = crashes
                if len(rendering) > 1:
                    # Which job of the batch crashed is unknown: each renders alone
                    # from now on, so only the guilty one keeps counting crashes.
                    self._solo.add(job_id)
                log.warning("recovered a file claimed by a daemon that is gone", file=info.name,
                            previous_owner=owner or "unknown", rendering=job_id, crashes=crashes)
            if not culprits:
                log.warning("recovered a file claimed by a daemon that is gone", file=info.name,
                            previous_owner=owner or "unknown")
        # Temp files are listed (outbox and all) only at start and when a peer
        # was found gone, not at every rescan.
        if owners or not self._temps_cleaned:
            self._temps_cleaned = True
            for path in self.spool.remove_stale_temps():
                log.info("removed stale temp file", file=str(path))
        for owner in owners.keys() - {""}:
            self.spool.forget_owner(owner)
        for owner in self.spool.gone_owners():
            if owner not in owners:
                self.spool.drop_marks(owner)  # a daemon that died with nothing claimed: its marks are moot

    def _was_rendering(self, owner: str) -> list[str]:
        """The jobs a gone daemon was rendering: its marks, or, for a version
        before marks, the job in its status file."""
        marked = self.spool.rendering(owner) if owner else None
        if marked is not None:
            return marked
        status = peers.read_status(self.spool.status_path(owner)) or {}
        current = status.get("current") or {} if status.get("state") == "rendering" else {}
        return [str(i) for i in current.get("batch") or [current.get("job")] if i]

    # --- taking work -------------------------------------------------------------------

    def take(self, max_images: int, key: BatchKey) -> list[Take]:
        def solo_key(entry: Entry) -> object:
            return None if entry.id in self._solo else key(entry)

        return self._claimed(self.queue.pop_batch(max_images, solo_key), popped=True)

    def take_cancelled(self, ids: set[str]) -> list[Take]:
        picks = [pick for job_id in sorted(ids) if (pick := self.queue.find(job_id)) is not None]
        return self._claimed(picks, popped=False)

    def _claimed(self, picks: Iterable[Pick], popped: bool) -> list[Take]:
        """The picks whose files this daemon now holds, unchanged since parsed,
        each handed out once."""
        out: list[Take] = []
        for pick in picks:
            cand = pick.candidate
            if not cand.claimed and self._claim_blocked(cand.name):
                if popped:
                    self.queue.defer(pick)
                continue
            if not cand.claimed:
                try:
                    path = self.spool.claim(cand.name)
                except SpoolError as err:
                    # Tried again after the next rescan, not at once: a name that
                    # cannot be claimed (still held in our work folder) must not spin.
                    log.warning("cannot claim file yet", file=cand.name, reason=str(err))
                    self._blocked[cand.name] = time.monotonic() + self.rescan_s
                    if popped:
                        self.queue.defer(pick)
                    continue
                self.watcher.forget(cand.name)  # out of the inbox: what its events said is moot
                info = FileInfo.of(path) if path is not None else None
                if info is None:
                    self.queue.drop(cand)  # taken away before we got to it
                    continue
                if not self.queue.reload_claimed(cand, info):
                    log.info("file changed before it was claimed; read again", file=cand.name)
                    continue
            elif self.queue.stale(pick):
                continue  # its file was read again after a claim in this batch
            self.queue.dispatch(cand, pick.entry)
            index = next(i for i, e in enumerate(cand.entries) if e is pick.entry)
            out.append(Take(self._delivery(cand), index))
        return out

    def _delivery(self, cand: Candidate) -> Delivery:
        token = cand.info.claim_token
        self._held[token] = cand
        return Delivery(token, cand.name, cand.data, tuple(cand.entries), cand.info.mtime_ns / 1e9,
                        self._crashes.get(token, {}))

    def _claim_blocked(self, name: str) -> bool:
        until = self._blocked.get(name)
        if until is not None and until <= time.monotonic():
            del self._blocked[name]
            return False
        return until is not None

    # --- cancel requests -----------------------------------------------------------------

    def cancelled(self) -> set[str]:
        """Requests for ids this daemon does not hold stay, for a peer or for a file
        not seen yet; a request whose job has its result is cleared."""
        out = set()
        for job_id in self.spool.cancel_requests():
            if self.spool.result_path(job_id).exists():
                self.spool.clear_cancel(job_id)
            else:
                out.add(job_id)
        self._cancels = out
        return out

    # --- results ---------------------------------------------------------------------

    def reserve(self, take: Take) -> Reservation:
        """The entry's own id, or, when that id already has a result from another
        file, ``<id>.dupN``. None when this file's own result is already there
        (published before a restart)."""
        token, job_id = take.delivery.token, take.entry.id
        sync = (self.spool.ids,)  # the writer syncs the ledger with the result's group
        existing = read_json(self.spool.result_path(job_id))
        if existing is not None and existing.get("input", {}).get("claim") == token:
            return Reservation(None, existing.get("status"))
        if existing is None and self.spool.reserve(job_id, token, sync=False):
            return Reservation(job_id, sync_before_publish=sync)
        n = 1
        while True:
            dup_id = f"{job_id}.dup{n}"
            other = read_json(self.spool.result_path(dup_id))
            if other is not None and other.get("input", {}).get("claim") == token:
                return Reservation(None, other.get("status"))
            if other is None and self.spool.reserve(dup_id, token, sync=False):
                break
            n += 1
        holder = (existing or {}).get("input", {}).get("file", "another job file")
        return Reservation(dup_id, held_by=holder, sync_before_publish=sync)

    def rendering(self, ids: list[str]) -> None:
        """Marks in the work folder (``spool.MARK_PREFIX``), for recovery to count
        a crash against these jobs; the status file, for people, is written off
        the render's path. A job already marked keeps its mark."""
        wanted = list(dict.fromkeys(ids))
        slots = [job_id if job_id in wanted else None for job_id in self._marks]
        for job_id in wanted:
            if job_id not in slots:
                free = slots.index(None) if None in slots else len(slots)
                slots[free:free + 1] = [job_id]
        try:
            for k, new in enumerate(slots):
                old = self._marks[k] if k < len(self._marks) else None
                if new != old:
                    self.spool.move_mark(k, old, new)
        except OSError as err:
            # The render goes on; a crash during it may not be counted against it.
            log.warning("cannot mark the jobs being rendered", error=str(err))
        self._marks = slots

    def progress(self, ids: list[str], step: int, steps: int) -> None:
        pass  # a daemon's progress is in its status file

    def may_publish(self, take: Take) -> bool:
        return True  # a claim is never taken away from a live daemon

    def done(self, take: Take, ok: bool, result: Mapping[str, Any] | None = None) -> None:
        if take.entry.id in self._cancels:  # a request not seen yet is cleared by cancelled(), once the result is there
            self.spool.clear_cancel(take.entry.id)
        cand = self._held.get(take.delivery.token)
        if cand is None or not self.queue.finish(cand, ok):
            return
        self.spool.clear_attempts(take.delivery.token)
        archived = self.spool.archive(cand.path, ok=not cand.any_failed)
        self._forget(cand)
        log.debug("input archived", file=str(archived))

    def unpublishable(self, take: Take) -> None:
        cand = self._held.get(take.delivery.token)
        if cand is not None:
            log.error("cannot publish result; the job file stays in the work folder", job_id=take.entry.id,
                      file=cand.name)
            cand.stuck = True
            self._forget(cand)

    def give_back(self, takes: list[Take]) -> None:
        for token in dict.fromkeys(t.delivery.token for t in takes):
            cand = self._held.get(token)
            if cand is not None and not cand.stuck:
                self.spool.unclaim(cand.path)
                self._forget(cand)
                log.info("render interrupted; file returned to the inbox", file=cand.name)

    def _forget(self, cand: Candidate) -> None:
        self.queue.drop(cand)
        self._held.pop(cand.info.claim_token, None)
        self._crashes.pop(cand.info.claim_token, None)
