"""The writer process: it encodes, hashes, writes and fsyncs the daemon's results.

The daemon renders with Python on one thread; every other thread of its
process that runs Python or makes a system call takes the GIL from the render
(measured on the CPU: a 4-step render ran 5-7 % slower beside the writer
thread). So results are published by this small child process, which loads no
torch: ``writer.Writer`` spawns it and hands it drafts over a pipe.

It lives and dies with its daemon:

- it asks the kernel for SIGKILL when the daemon's thread that spawned it ends
  (``PR_SET_PDEATHSIG``), so a daemon killed with SIGKILL never leaves a writer
  publishing behind it while a peer or the next start recovers its jobs;
- it ignores SIGINT and SIGTERM, which a terminal and systemd send to the whole
  group: the daemon drains it on a clean stop by closing the pipe, and it exits
  once everything handed over is published;
- its temp files carry the daemon's owner name, so peers judge them by the
  daemon's life (``spool.remove_stale_temps``).

The pipe carries pickled ``(draft, sync_first)`` pairs from the daemon (a
pickle of None for a draft that could not be handed over), and back an empty
list once started, then one list of results per group, in order: each the
result as published, or None when nothing could be published.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from . import outputs
from .errors import RenderError
from .outputs import PublishedImage, Publication, commit, encode_png, fsync_dir
from .results import Draft

log = structlog.get_logger("sbrender")

Item = tuple[Draft | None, tuple[Path, ...]]  # None: handed over broken; reported unpublished

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # a terminal, systemd, an orphaned group


def publish(folder: Path, items: list[Item]) -> list[dict[str, Any] | None]:
    """Publish a group of drafts into ``folder``, after an fsync of each folder
    their ``sync_first`` names (once for the group); per item, in order, the
    result as published or None."""
    unsynced = _unsynced(items)
    ready = [(k, draft) for k, (draft, _) in enumerate(items) if k not in unsynced and draft is not None]
    out: list[dict[str, Any] | None] = [None] * len(items)
    try:
        pubs = [_publication(draft) for _, draft in ready]
        for (k, _), result in zip(ready, commit(folder, pubs) if pubs else []):
            out[k] = result
    except BaseException:  # noqa: BLE001 - these results lost, not the writer
        log.exception("unexpected error while publishing results; their files stay claimed")
        return [None] * len(items)
    return out


def _unsynced(items: list[Item]) -> set[int]:
    """fsync each folder the group's drafts ask for, once. The indices of the
    drafts whose folder could not be synced: they are not published (their files
    stay claimed, and are redone at the next start)."""
    failed: set[Path] = set()
    for folder in dict.fromkeys(folder for _, folders in items for folder in folders):
        try:
            fsync_dir(folder)
        except OSError as err:
            log.error("cannot sync folder; its results are not published", folder=str(folder), error=str(err))
            failed.add(folder)
    return {k for k, (_, folders) in enumerate(items) if failed.intersection(folders)}


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


# --- the child process ------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the spawning thread ends (Linux); gone already: exit now.
    Named for ps and top (``comm``): not ``python``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, b"sbrender-writer", 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the daemon's own stop still closes the pipe
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _receive(inbox: Connection, frames: queue.SimpleQueue[bytes | None]) -> None:
    """Empties the pipe as the daemon fills it, so that a big image never blocks
    the daemon's render thread while this process fsyncs."""
    try:
        while True:
            frames.put(inbox.recv_bytes())
    except (EOFError, OSError):
        frames.put(None)


def serve(folder: Path, inbox: Connection, outbox: Connection, depth: int) -> None:
    """Publish what arrives, in groups of what piled up (at most ``depth``), until
    the daemon closes the pipe."""
    frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(inbox, frames), name="sbrender-publisher-pipe", daemon=True).start()
    outbox.send([])  # hello: started, every import done
    done = False
    while not done:
        group = [frames.get()]
        while group[-1] is not None and len(group) < depth:
            try:
                group.append(frames.get_nowait())
            except queue.Empty:
                break
        if group[-1] is None:
            done = True
            group.pop()
        if group:
            outbox.send(publish(folder, [_item(frame) for frame in group]))


def _item(frame: bytes) -> Item:
    try:
        item = pickle.loads(frame)
    except Exception:  # noqa: BLE001 - this result lost, not the writer
        log.exception("cannot read a result handed over by the daemon; its file stays claimed")
        return None, ()
    return (None, ()) if item is None else item


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv or sys.argv)[1])
    _die_with_parent(spec["parent"])
    # The daemon stops us, by closing the pipe. The stop signals came blocked from
    # the spawning thread: one sent since then is discarded here, not fatal.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    from . import logs

    logs.configure(spec["log_format"], spec["log_level"])
    outputs.write_as(spec["owner"])
    serve(Path(spec["folder"]), Connection(spec["in"], writable=False), Connection(spec["out"], readable=False),
          spec["depth"])


if __name__ == "__main__":
    main()
