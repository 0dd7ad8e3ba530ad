"""A broker held in memory: the queue semantics of the file spool, with no files.

It serves fast tests of the dispatcher (batching, one-by-one fallback, cancel
mid-render, stop mid-batch), the way pip-tools tests its resolver against a
fake repository; the file spool and the real pipeline are shown end to end
elsewhere. Documents are parsed with the daemon's own rules.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from collections.abc import Mapping
from typing import Any

from .broker import BatchKey, Delivery, Reservation, Take
from .jobs import Rules, parse_job_bytes


class MemoryBroker:
    def __init__(self, rules: Rules | None = None, wake: threading.Event | None = None) -> None:
        self.rules = rules or Rules()
        self.wake = wake or threading.Event()
        self._lock = threading.Lock()  # submit and cancel come from test threads
        self._heap: list[tuple[tuple[int, float, str, int], int, Take]] = []
        self._seq = itertools.count()
        self._cancels: set[str] = set()
        self._ids: dict[str, Delivery] = {}  # result id -> the document that holds it
        self._held: dict[str, set[int]] = {}  # token -> indexes handed out, not yet done
        self.results: dict[str, bool] = {}  # entry id -> ok, as reported by ``done``
        self.finished: list[str] = []  # tokens of documents whose every entry is done
        self.given_back: list[str] = []  # tokens given back by a stop
        self.stuck: list[str] = []  # tokens with a result that could not be published

    # --- what a producer does --------------------------------------------------------

    def submit(self, name: str, data: str | bytes, queued_at: float | None = None,
               crashes: dict[str, int] | None = None) -> Delivery:
        """Queue a document; ``crashes``: as a broker that recovered it from dead daemons reports it."""
        raw = data.encode() if isinstance(data, str) else data
        token = hashlib.sha256(f"{name}:{next(self._seq)}".encode() + raw).hexdigest()[:16]
        delivery = Delivery(token, name, raw, tuple(parse_job_bytes(name, raw, self.rules)),
                            time.time() if queued_at is None else queued_at, crashes or {})
        with self._lock:
            self._queue(delivery, range(len(delivery.entries)))
        self.wake.set()
        return delivery

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancels.add(job_id)
        self.wake.set()

    def _queue(self, delivery: Delivery, indexes: range | list[int]) -> None:
        for index in indexes:
            entry = delivery.entries[index]
            order = (-entry.priority, delivery.queued_at, delivery.source, index)
            heapq.heappush(self._heap, (order, next(self._seq), Take(delivery, index)))

    # --- the broker interface ------------------------------------------------------------

    def prepare(self) -> None:
        pass

    def open(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        return {"broker": "memory"}

    def problems(self) -> list[str]:
        return []

    def refresh(self) -> None:
        pass

    def take(self, max_images: int, key: BatchKey) -> list[Take]:
        with self._lock:
            if not self._heap:
                return []
            first = heapq.heappop(self._heap)[2]
            takes = [first]
            want = key(first.entry)
            images = first.images
            while want is not None and self._heap:
                nxt = self._heap[0][2]
                if key(nxt.entry) != want or images + nxt.images > max_images:
                    break
                heapq.heappop(self._heap)
                takes.append(nxt)
                images += nxt.images
            for take in takes:
                self._held.setdefault(take.delivery.token, set()).add(take.index)
            return takes

    def take_cancelled(self, ids: set[str]) -> list[Take]:
        with self._lock:
            found = [item for item in self._heap if item[2].entry.id in ids]
            for item in found:
                self._heap.remove(item)
                self._held.setdefault(item[2].delivery.token, set()).add(item[2].index)
            heapq.heapify(self._heap)
            return [item[2] for item in found]

    def cancelled(self) -> set[str]:
        with self._lock:
            return set(self._cancels)

    def reserve(self, take: Take) -> Reservation:
        delivery, job_id = take.delivery, take.entry.id
        with self._lock:
            holder = self._ids.setdefault(job_id, delivery)
            if holder is delivery:
                return Reservation(job_id)
            n = 1
            while self._ids.setdefault(f"{job_id}.dup{n}", delivery) is not delivery:
                n += 1
            return Reservation(f"{job_id}.dup{n}", held_by=holder.source)

    def rendering(self, ids: list[str]) -> None:
        pass

    def progress(self, ids: list[str], step: int, steps: int) -> None:
        pass

    def may_publish(self, take: Take) -> bool:
        return True  # a claim is never taken away from a live daemon

    def done(self, take: Take, ok: bool, result: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._cancels.discard(take.entry.id)
            self.results[take.entry.id] = ok
            held = self._held.get(take.delivery.token, set())
            held.discard(take.index)
            queued = any(item[2].delivery is take.delivery for item in self._heap)
            if not held and not queued:
                self._held.pop(take.delivery.token, None)
                self.finished.append(take.delivery.token)

    def unpublishable(self, take: Take) -> None:
        with self._lock:
            self.stuck.append(take.delivery.token)

    def give_back(self, takes: list[Take]) -> None:
        with self._lock:
            for take in takes:
                self._held.get(take.delivery.token, set()).discard(take.index)
                self._queue(take.delivery, [take.index])
                self.given_back.append(take.delivery.token)

    def pending(self) -> int:
        return len(self._heap)

    def drained(self) -> bool:
        return not self._heap

    def wait_s(self, most: float) -> float:
        return most

    def close(self) -> bool:
        with self._lock:
            return not any(self._held.values())
