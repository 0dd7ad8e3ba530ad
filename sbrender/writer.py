"""The writer thread: results are encoded, hashed, written and fsynced here,
in the order they were handed over, while the renderer starts the next job.
What piled up while it wrote is published together, with one flush per phase
(``outputs.commit``), so a slow disk costs a flush per group, not per file.

It receives data (a ``results.Draft``: the images and the result but for what
the writes decide; and the folders to fsync before it is published, such as
the id ledger's) and reports data: per job, the result as published (a
success, or a failure when its images could not be written), or None when
nothing could be published. What follows a publish (counting, archiving the
input) is the dispatcher's, on its own thread. The hand-over queue is
bounded: when the disk falls behind, the renderer waits instead of piling
images up in memory.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from .errors import RenderError
from .outputs import PublishedImage, Publication, commit, encode_png, fsync_dir
from .results import Draft

log = structlog.get_logger("sbrender")

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class Report(Generic[Tag]):
    """What became of one handed-over draft."""

    tag: Tag
    result: dict[str, Any] | None  # as published; None: nothing could be published


class Writer(Generic[Tag]):
    def __init__(self, folder: Path, wake: threading.Event, depth: int = 8) -> None:
        self.folder = folder
        self.wake = wake
        self._tasks: queue.Queue[tuple[Draft, Tag, tuple[Path, ...]] | None] = queue.Queue(maxsize=depth)
        self._done: queue.SimpleQueue[Report[Tag]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, draft: Draft, tag: Tag, sync_first: tuple[Path, ...] = ()) -> None:
        """Publish ``draft`` on the writer thread, after an fsync of each folder of
        ``sync_first`` (once per group); its ``Report`` comes back through
        ``completed()`` with ``tag``."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="sbrender-writer", daemon=True)
            self._thread.start()
        self._tasks.put((draft, tag, sync_first))

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
            unsynced = _unsynced(items)
            ready = [item for k, item in enumerate(items) if k not in unsynced]
            try:
                pubs = [_publication(draft) for draft, _, _ in ready]
                published = iter(commit(self.folder, pubs) if pubs else [])
            except BaseException:  # noqa: BLE001 - these results lost, not the writer
                log.exception("unexpected error while publishing results; their files stay claimed")
                published = iter([None] * len(ready))
            for k, (_, tag, _) in enumerate(items):
                self._done.put(Report(tag, None if k in unsynced else next(published)))
            for _ in group:
                self._tasks.task_done()
            self.wake.set()

    def completed(self) -> Iterator[Report[Tag]]:
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


def _unsynced(items: list[tuple[Draft, Tag, tuple[Path, ...]]]) -> set[int]:
    """fsync each folder the group's drafts ask for, once. The indices of the
    drafts whose folder could not be synced: they are not published (their files
    stay claimed, and are redone at the next start)."""
    failed: set[Path] = set()
    for folder in dict.fromkeys(folder for _, _, folders in items for folder in folders):
        try:
            fsync_dir(folder)
        except OSError as err:
            log.error("cannot sync folder; its results are not published", folder=str(folder), error=str(err))
            failed.add(folder)
    return {k for k, (_, _, folders) in enumerate(items) if failed.intersection(folders)}


def _publication(draft: Draft) -> Publication:
    """Encode and hash the draft's images; the files to write and how the result
    is finished. An image that cannot be encoded fails its job, with a result."""
    start = time.perf_counter()
    files: list[tuple[str, bytes]] = []
    images: list[dict[str, Any]] = []
    try:
        for item in draft.images:
            data = encode_png(item.image, item.text)
            files.append((item.name, data))
            images.append(PublishedImage(item.name, item.seed, item.image.width, item.image.height,
                                         hashlib.sha256(data).hexdigest()).to_dict())
    except Exception as err:  # noqa: BLE001 - this job fails, with a result
        log.exception("cannot encode the images", job_id=draft.result.get("id"))
        error = RenderError(f"cannot encode the images: {type(err).__name__}: {err}")
        return Publication(draft.json_name, [], lambda _: draft.fail(error), draft.fail)
    encode_s = time.perf_counter() - start
    return Publication(draft.json_name, files, lambda write_s: draft.finish(images, encode_s + write_s), draft.fail)
