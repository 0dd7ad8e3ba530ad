"""The broker seam: where jobs come from and where their outcome is reported.

The render loop (``dispatcher``) talks only to this interface. The file spool
(``filebroker.FileBroker``: inbox, claims, work folders) is one implementation;
``memorybroker.MemoryBroker`` serves fast tests of the loop; a network queue
is another. A broker hands out job documents as neutral ``Delivery`` records
and never sees a renderer; the dispatcher never sees a file.

Life of a delivered entry: ``take`` (or ``take_cancelled``) -> ``reserve`` its
result id -> rendered -> ``may_publish`` -> published by the dispatcher's
writer -> ``done``; or
``give_back`` when a stop interrupted its render; or ``unpublishable`` when no
result could be written (it stays held, to be redone after a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .jobs import Entry, Job


@dataclass(frozen=True, eq=False)
class Delivery:
    """One job document as the broker delivered it: a file, a stream message."""

    token: str  # this very document, the same after a restart (a re-run is recognised by it)
    source: str  # its name, for results and logs (the file name)
    data: bytes
    entries: tuple[Entry, ...]
    queued_at: float  # epoch seconds: when it was queued
    # Per job id: how often a daemon died while rendering it (see ``limits.max_crashes``).
    crashes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Take:
    """One entry of a delivery, handed to the dispatcher: never handed out twice."""

    delivery: Delivery
    index: int

    @property
    def entry(self) -> Entry:
        return self.delivery.entries[self.index]

    @property
    def images(self) -> int:
        return self.entry.count if isinstance(self.entry, Job) else 1


@dataclass(frozen=True)
class Reservation:
    """Where an entry's result goes."""

    result_id: str | None  # None: this very delivery published it already (before a restart)
    prior_status: str | None = None  # then, its status
    held_by: str | None = None  # the id belongs to another document: named here, result_id is ``<id>.dupN``
    # Folders to fsync before the result is published: the reservation is visible
    # at once and made durable with the result's group, off the render's path.
    sync_before_publish: tuple[Path, ...] = ()


# Entries with equal keys may share one pipeline call; None renders alone. The
# renderer says which (``Renderer.batch_key``); a broker may still take an entry
# alone (one that was in a batch when a daemon died: which one crashed is unknown).
BatchKey = Callable[[Entry], Hashable | None]


class Broker(Protocol):
    def prepare(self) -> None:
        """Create and check what the broker needs (folders, a connection).
        Raises ``SbrenderError`` with what to fix."""

    def open(self) -> None:
        """Take back what dead peers left, start watching for work, look once."""

    def describe(self) -> dict[str, str]:
        """What the daemon's "ready" log line says of it (folders, watch strategy)."""

    def problems(self) -> list[str]:
        """Why nothing may be taken now (a volume gone, a server unreachable);
        empty when all is well. Pausing is the caller's; resuming is noticed here."""

    def refresh(self) -> None:
        """Learn what changed since the last look (new work, dead peers). Called
        between renders and by the housekeeper, never inside a denoising step."""

    def take(self, max_images: int, key: BatchKey) -> list[Take]:
        """The next entry in queue order and those right behind it with the same
        key (not None), up to ``max_images`` images; held by this daemon. Empty
        when nothing is ready."""

    def take_cancelled(self, ids: set[str]) -> list[Take]:
        """Queued entries with these ids, taken out of turn to be cancelled."""

    def rendering(self, ids: list[str]) -> None:
        """The renderer's call of these ids starts now (empty: nothing renders; a
        call's ids stand until the next call or this). On the render's path, so
        it must be cheap: for a broker that counts a crash against the jobs a
        dead daemon was rendering."""

    def progress(self, ids: list[str], step: int, steps: int) -> None:
        """The render of these ids is at ``step`` of ``steps``: for a broker that
        tells clients (the file spool's daemons say it in their status files).
        Called by the housekeeper during a render, a few times a second."""

    def cancelled(self) -> set[str]:
        """Ids someone asked to cancel (queued or running anywhere), and ids this
        daemon lost to another (a network queue's lease): a render of them stops."""

    def reserve(self, take: Take) -> Reservation:
        """Claim the entry's result id for this delivery; ids are never reused."""

    def may_publish(self, take: Take) -> bool:
        """Asked before the entry's result is written: whether this daemon still
        holds it. False: another took it over (a lease lapsed); nothing of it may
        be published here, and the broker has forgotten it."""

    def done(self, take: Take, ok: bool, result: Mapping[str, Any] | None = None) -> None:
        """The entry's result is published (``ok``: succeeded; ``result``: the
        document, None when published before a restart). When every entry of its
        delivery is, the delivery is archived or acknowledged."""

    def unpublishable(self, take: Take) -> None:
        """No result could be published: its delivery stays held, for the next start."""

    def give_back(self, takes: list[Take]) -> None:
        """A stop interrupted their render: their deliveries go back to the queue."""

    def pending(self) -> int:
        """Entries queued; cheap, no I/O (asked at every status update)."""

    def drained(self) -> bool:
        """Nothing is queued or on its way (``sbrender run --once`` stops)."""

    def wait_s(self, most: float) -> float:
        """How long the loop may sleep before it should look again (at most ``most``)."""

    def close(self) -> bool:
        """Stop watching; True when this daemon holds nothing any more."""
