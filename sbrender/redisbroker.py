"""Redis Streams as a broker: daemons on many hosts share one queue.

Each daemon is a consumer of the group ``render``, named uniquely per process
start. The server keeps who holds what (the pending list) and for how long, on
its own clock. A daemon renews its lease on every entry it holds (``RENEW``,
every third of ``redis.lease_seconds``); entries whose lease lapsed (their
daemon died, or was paused) are taken over by any daemon with XAUTOCLAIM.
Starting, publishing, acknowledging and giving back are scripts that check the
caller still owns the entry, so a daemon that lost its job cannot publish it:
``may_publish`` is asked before the outbox is written, and the result is
committed to Redis, fenced, after. Layout and scripts: ``redisqueue``.

When the server cannot be reached, ``problems`` says so (the daemon pauses)
and nothing is taken or published until it answers again.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from . import redisqueue as rq
from .broker import BatchKey, Delivery, Reservation, Take
from .config import Settings
from .errors import JobError
from .forwarder import InboxForwarder, invalid_error
from .jobs import BadJob, Entry, Job, Rules, parse_job_bytes
from .peers import owner_name
from .results import FAILED, SUCCEEDED

log = structlog.get_logger("sbrender")

COUNT_EVERY_S = 1.0  # how often the queued count (for status and metrics) is read
STATUS_EVERY_S = 1.0  # a rendering daemon's step goes to Redis at most this often


@dataclass
class Held:
    """An entry in this consumer's pending list: fetched, maybe handed out."""

    stream: str
    eid: str
    job_id: str
    entry: Entry
    spec: str  # the document the entry was parsed from
    take: Take | None = None  # set once started


def _order(held: Held) -> tuple[int, int, int]:
    ms, _, seq = held.eid.partition("-")
    return rq.ALL_STREAMS.index(held.stream), int(ms), int(seq or 0)


class RedisBroker:
    def __init__(self, settings: Settings, wake: threading.Event) -> None:
        self.url: str = settings["queue"]
        self.rules = Rules.from_settings(settings)
        self.lease_s: float = settings["redis.lease_seconds"]
        self.max_crashes: int = settings["limits.max_crashes"]
        self.batch_size: int = settings["perf.batch_size"]
        self.wake = wake
        self.consumer = f"{owner_name()}-{secrets.token_hex(3)}"
        self.redis = rq.connect(self.url)
        self._status_redis: Any = None  # publish_status's own connection (the heartbeat thread's)
        self._status_sent: tuple[Any, float] = (None, 0.0)
        self._fetch_script = self.redis.register_script(rq.FETCH)
        self._fetch_start = self.redis.register_script(rq.FETCH_START)
        self._start = self.redis.register_script(rq.START)
        self._renew = self.redis.register_script(rq.RENEW)
        self._commit = self.redis.register_script(rq.COMMIT)
        self._give_back = self.redis.register_script(rq.GIVE_BACK)
        self.forwarder = InboxForwarder(settings, rq.RedisQueue(self.url))
        self._held: dict[str, Held] = {}  # job id -> entry this consumer holds
        self._ready: list[Held] = []  # held, not handed out yet (or deferred), in queue order
        self._lost: set[str] = set()  # handed out, then taken over by another daemon
        self._uncommitted: list[tuple[Held, str, str]] = []  # published, commit to send again
        self._down: str | None = None
        self._progressed: tuple[list[str], int] = ([], 0)
        self._pending = 0
        self._due = {"renew": 0.0, "recover": 0.0, "count": 0.0}
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------

    def prepare(self) -> None:
        self.forwarder.prepare()  # the spool's folders: the inbox it forwards, the outbox, status files
        self._guard(None, self._ensure_groups)

    def _ensure_groups(self) -> None:
        import redis

        for key in rq.ALL_STREAMS:
            try:
                # From 0, not $: jobs submitted before any daemon ran are served too.
                self.redis.xgroup_create(key, rq.GROUP, id="0", mkstream=True)
            except redis.ResponseError as err:
                if not str(err).startswith("BUSYGROUP"):
                    raise

    def open(self) -> None:
        prune = self.redis.register_script(rq.PRUNE)
        self._guard(None, prune, keys=list(rq.ALL_STREAMS), args=[int(rq.PRUNE_IDLE_S * 1000)])
        self._watcher = threading.Thread(target=rq.watch, args=(self.url, self.wake, self._closing),
                                         name="sbrender-redis-watch", daemon=True)
        self._watcher.start()
        self.refresh()

    def close(self) -> bool:
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join()
        # What was fetched but not rendered goes back at once, not after a lease.
        self.give_back([h.take for h in self._ready if h.take is not None])
        for held in [h for h in self._ready if h.take is None]:
            self._release(held)
        self._ready.clear()
        self.forwarder.close()
        if self._status_redis is not None:
            self._status_redis.close()
        return not self._held

    def publish_status(self, data: dict[str, Any]) -> None:
        """The daemon's status, for `sbrender status` on any host: a key that expires
        ``DAEMON_TTL_S`` after the last heartbeat (the server's clock says who is
        alive), removed at a clean stop. Called by the status file's writer thread,
        on its own connection with a short timeout; steps at most once a second;
        nothing while the server is known to be down."""
        if self._down is not None:
            return
        now = time.monotonic()
        state = data.get("state")
        if state == self._status_sent[0] and now - self._status_sent[1] < STATUS_EVERY_S and state != "stopped":
            return
        if self._status_redis is None:
            self._status_redis = rq.connect(self.url, timeout=1.0)
        key = rq.daemon_key(self.consumer)
        if state == "stopped":
            self._status_redis.delete(key)
        else:
            self._status_redis.set(key, json.dumps({**data, "consumer": self.consumer}), ex=rq.DAEMON_TTL_S)
        self._status_sent = (state, now)

    def describe(self) -> dict[str, str]:
        return {"queue": rq.redacted(self.url), "consumer": self.consumer, "lease_s": f"{self.lease_s:g}",
                "inbox": str(self.forwarder.spool.inbox), "outbox": str(self.forwarder.spool.outbox)}

    def problems(self) -> list[str]:
        if self._down is None:
            return []
        try:
            self.redis.ping()
            self._ensure_groups()  # a server that lost its data lost the groups too
            self._reread_own()
        except Exception as err:  # noqa: BLE001 - unavailable() sorts a bug from an outage
            why = rq.unavailable(err)
            if why is None:
                raise
            self._down = why
            return [why]
        log.info("redis answers again", queue=rq.redacted(self.url))
        self._down = None
        self._due = dict.fromkeys(self._due, 0.0)
        return []

    def _reread_own(self) -> None:
        """After an outage: what this consumer still holds on the server and no
        longer here (a result it could not fence was dropped) is taken again now,
        not after a lease. Entries deleted meanwhile are acked away."""
        for key in rq.ALL_STREAMS:
            reply = self.redis.xreadgroup(rq.GROUP, self.consumer, {key: "0"}, count=1000)
            for _, items in reply or []:
                for eid, fields in items:
                    if fields:
                        self._hold(key, eid, fields)
                    else:
                        self.redis.xack(key, rq.GROUP, eid)

    def _guard(self, default: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        """``func``'s value; ``default`` when the server cannot serve (then paused)."""
        try:
            return func(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - unavailable() sorts a bug from an outage
            why = rq.unavailable(err)
            if why is None:
                raise
            if self._down is None:
                log.error("redis unavailable", reason=why, queue=rq.redacted(self.url))
            self._down = why
            return default

    # --- between renders ---------------------------------------------------------------

    def refresh(self) -> None:
        """Renew the leases held, take over entries whose lease lapsed, count the queue."""
        if self._down is not None:
            return
        now = time.monotonic()
        if now >= self._due["renew"]:
            self._due["renew"] = now + self.lease_s / 3
            self._renew_all()
        if now >= self._due["recover"] and len(self._ready) < self.batch_size:
            self._due["recover"] = now + min(max(self.lease_s / 4, 0.05), 5.0)
            self._recover(self.batch_size - len(self._ready))
        if now >= self._due["count"]:
            self._due["count"] = now + COUNT_EVERY_S
            self._count()
        for item in list(self._uncommitted):
            self._uncommitted.remove(item)
            self._send_commit(*item)
        self.forwarder.refresh()

    def _renew_all(self) -> None:
        held = list(self._held.values())
        if not held:
            return
        reply = self._guard(None, self._renew, keys=[h.stream for h in held],
                            args=[self.consumer, *(h.eid for h in held)])
        for h, ok in zip(held, reply or [1] * len(held)):
            if not ok:
                self._lose(h)

    def _lose(self, held: Held) -> None:
        self._drop(held)
        if held.take is not None:
            self._lost.add(held.job_id)
            log.warning("lease lost: another daemon took this job over; it is not published here",
                        job_id=held.job_id)

    def _drop(self, held: Held) -> None:
        if self._held.get(held.job_id) is held:
            del self._held[held.job_id]
        if held in self._ready:
            self._ready.remove(held)

    def _recover(self, count: int) -> None:
        for key in rq.ALL_STREAMS:
            if count <= 0:
                return
            reply = self._guard(None, self.redis.xautoclaim, key, rq.GROUP, self.consumer,
                                int(self.lease_s * 1000), "0-0", count=count)
            # Redis 7 adds a third element, the ids of deleted entries (dropped from the PEL).
            for item in (reply[1] if reply else []):
                if item and item[1]:
                    held = self._hold(key, item[0], item[1])
                    if held is not None:
                        count -= 1
                        log.warning("took over a job whose lease lapsed", job_id=held.job_id)

    def _fetch(self, keys: tuple[str, ...], count: int) -> None:
        """New entries of the first of ``keys`` that has any (non-blocking)."""
        reply = self._guard(None, self._fetch_script, keys=list(keys), args=[self.consumer, count])
        if not reply:
            return
        key, entries = reply
        for eid, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2])) if flat else {}
            if fields:
                self._hold(key, eid, fields)

    def _fetch_first_started(self, keys: tuple[str, ...], count: int) -> None:
        """As ``_fetch``, and the first entry fetched is started in the same round
        trip (the usual case: nothing is held when the loop takes work)."""
        reply = self._guard(None, self._fetch_start, keys=[*keys, rq.DLQ],
                            args=[self.consumer, count, self.max_crashes])
        if not reply:
            return
        key, entries, started = reply
        for k, (eid, flat) in enumerate(entries):
            fields = dict(zip(flat[::2], flat[1::2])) if flat else {}
            held = self._hold(key, eid, fields) if fields else None
            if k > 0:
                continue
            if held is None:
                if started:  # an id this daemon already holds under another entry: not ours to run twice
                    self._guard(None, self._give_back, keys=[rq.job_key(fields.get("id", "")), key],
                                args=[eid, self.consumer])
            elif started:
                held.take = self._take_of(held, started)
            else:
                self._drop(held)

    def _hold(self, key: str, eid: str, fields: dict[str, str]) -> Held | None:
        job_id = fields.get("id", "")
        if job_id in self._held:
            return None
        spec = fields.get("spec", "")
        held = Held(key, eid, job_id, _entry(job_id, spec.encode(), self.rules), spec)
        self._held[job_id] = held
        self._ready.append(held)
        self._ready.sort(key=_order)
        return held

    def _count(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key in rq.ALL_STREAMS:
            pipe.xlen(key)
            pipe.xpending(key, rq.GROUP)
        replies = self._guard(None, pipe.execute)
        if replies is not None:
            self._pending = sum(max(0, n - p["pending"]) for n, p in zip(replies[::2], replies[1::2]))

    def pending(self) -> int:
        return self._pending + sum(1 for h in self._ready if h.take is None)

    def drained(self) -> bool:
        self._count()
        return self._down is None and self.pending() == 0 and not self._ready and not self.forwarder.waiting()

    def wait_s(self, most: float) -> float:
        now = time.monotonic()
        return max(0.0, min(most, self._due["renew"] - now, self._due["recover"] - now))

    # --- taking work -------------------------------------------------------------------

    def take(self, max_images: int, key: BatchKey) -> list[Take]:
        """The first entry in band order, then those behind it with its key. A job
        taken over from a daemon that died renders alone (it may be the culprit)."""
        if self._down is not None:
            return []
        if not self._ready:
            self._fetch_first_started(rq.STREAMS, max(max_images, 1))
        takes: list[Take] = []
        want: Any = None
        images = 0
        while self._ready:
            held = self._ready[0]
            if takes and (want is None or key(held.entry) != want or images + _images(held.entry) > max_images):
                break
            take = self._started(held)
            if take is None:
                if self._down is not None:
                    break
                continue
            if take.delivery.crashes and takes:
                break  # stays first in line, started, for the next call
            self._ready.pop(0)
            takes.append(take)
            images += take.images
            want = None if take.delivery.crashes else key(take.entry)
        return takes

    def take_cancelled(self, ids: set[str]) -> list[Take]:
        """What waits in the cancel lane (queued jobs someone cancelled), out of turn."""
        if self._down is not None:
            return []
        self._fetch((rq.CANCEL_LANE,), 16)
        takes = []
        for held in [h for h in self._ready if h.stream == rq.CANCEL_LANE]:
            take = self._started(held)
            if take is not None:
                self._ready.remove(held)
                takes.append(take)
        return takes

    def _started(self, held: Held) -> Take | None:
        """``held``, started under this consumer's name; None when it is not ours to
        start (moved by a cancel, finished, taken over), or the server is away."""
        if held.take is not None:
            return held.take
        keys = [rq.job_key(held.job_id), held.stream, rq.events_key(held.job_id), rq.DLQ]
        reply = self._guard(None, self._start, keys=keys, args=[held.eid, self.consumer, self.max_crashes,
                                                                   held.job_id])
        if reply is None and self._down is not None:
            return None
        if not reply:
            self._drop(held)
            return None
        held.take = self._take_of(held, reply)
        return held.take

    def _take_of(self, held: Held, started: list[Any]) -> Take:
        """The take of ``held``, from the START script's reply."""
        spec, token, queued_at, crashes = started
        data = str(spec).encode()
        # The job's document as started; parsed again only when it is not the one fetched.
        entry = held.entry if spec == held.spec else _entry(held.job_id, data, self.rules)
        delivery = Delivery(str(token), f"{held.job_id}.json", data, (entry,), float(queued_at),
                            {held.job_id: int(crashes)} if int(crashes) else {})
        return Take(delivery, 0)

    def rendering(self, ids: list[str]) -> None:
        pass  # a crash is counted by the server when another daemon takes the job over

    def progress(self, ids: list[str], step: int, steps: int) -> None:
        """Step i of N into each held job's hash, for `Client.progress`; only when it changed."""
        if self._down is not None or (ids, step) == self._progressed:
            return
        self._progressed = (ids, step)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            if job_id in self._held:
                pipe.hset(rq.job_key(job_id), mapping={"step": step, "steps": steps})
        self._guard(None, pipe.execute)

    def cancelled(self) -> set[str]:
        """Ids with a cancel request, and those this daemon lost to another: a render
        of either stops, and nothing of it is published here."""
        if self._down is not None:
            return set(self._lost)
        return set(self._guard(set(), self.redis.smembers, rq.CANCELS)) | self._lost

    # --- results ---------------------------------------------------------------------

    def reserve(self, take: Take) -> Reservation:
        # The id was reserved at submit (a job hash per id, created once).
        return Reservation(take.entry.id)

    def may_publish(self, take: Take) -> bool:
        """Whether this daemon still owns the entry; its lease is renewed now, so
        that the writes that follow fall within it. False: lost, or not provable
        (the server is away); then the entry is forgotten here."""
        job_id = take.entry.id
        held = self._held.get(job_id)
        if held is None or held.take is not take:
            self._lost.discard(job_id)
            return False
        reply = self._guard(None, self._renew, keys=[held.stream], args=[self.consumer, held.eid])
        if reply and reply[0]:
            return True
        if reply is None:
            log.warning("cannot check the lease with redis away; the result is not published and the job "
                        "is rendered again", job_id=job_id)
            self._drop(held)
        else:
            self._lose(held)
        self._lost.discard(job_id)
        return False

    def done(self, take: Take, ok: bool, result: Mapping[str, Any] | None = None) -> None:
        held = self._held.get(take.entry.id)
        if held is None or held.take is not take:
            return
        self._drop(held)
        status = str(result["status"]) if result else (SUCCEEDED if ok else FAILED)
        self._send_commit(held, status, json.dumps(dict(result or {"id": held.job_id, "status": status}),
                                                   ensure_ascii=False))

    def _send_commit(self, held: Held, status: str, document: str) -> None:
        keys = [rq.job_key(held.job_id), held.stream, rq.events_key(held.job_id), rq.CANCELS]
        reply = self._guard(None, self._commit, keys=keys,
                            args=[held.eid, self.consumer, status, document, held.job_id])
        if reply is None:
            self._uncommitted.append((held, status, document))  # the script is safe to send again
        elif not reply:
            log.error("result written to the outbox, but another daemon had taken the job over; its "
                      "result there may be replaced", job_id=held.job_id)

    def unpublishable(self, take: Take) -> None:
        held = self._held.get(take.entry.id)
        if held is not None:
            log.error("cannot publish result; the job is rendered again once its lease lapses",
                      job_id=held.job_id)
            self._drop(held)

    def give_back(self, takes: list[Take]) -> None:
        for take in takes:
            held = self._held.get(take.entry.id)
            if held is not None and held.take is take:
                self._release(held)
                log.info("render interrupted; job returned to the queue", job_id=held.job_id)

    def _release(self, held: Held) -> None:
        self._drop(held)
        self._guard(None, self._give_back, keys=[rq.job_key(held.job_id), held.stream],
                    args=[held.eid, self.consumer])


def _entry(job_id: str, data: bytes, rules: Rules) -> Entry:
    """The job a queued document holds, checked with the daemon's own rules."""
    try:
        error = invalid_error(json.loads(data))
    except ValueError:
        error = None
    if error is not None:
        return BadJob(job_id, error)
    entries = parse_job_bytes(f"{job_id}.json", data, rules)
    if len(entries) == 1 and entries[0].id == job_id:
        return entries[0]
    return BadJob(job_id, JobError("a queued document must hold exactly one job"))


def _images(entry: Entry) -> int:
    return entry.count if isinstance(entry, Job) else 1
