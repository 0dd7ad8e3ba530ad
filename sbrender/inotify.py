"""inotify(7) on one folder, read by one thread, through libc (Linux only).

The daemon's inbox watcher needs a few event kinds and nothing else. watchdog
subscribes to every kind (its move pairing needs ``IN_MOVED_FROM``), so each
claim, which renames a file out of the inbox, woke three of its threads and
took the GIL from the render several times per job. Here only the kinds asked
for reach Python: a claim costs no wake-up at all.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import select
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
# The watch is gone (the folder was removed, moved away or unmounted): the reader stops.
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_BYTES = 64 * 1024

# Called in the reader thread with one read's events, as (mask, name) pairs; an
# IN_Q_OVERFLOW comes with the name "" (events were lost: look at everything).
Handler = Callable[[list[tuple[int, str]]], None]


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


def available() -> bool:
    return _libc() is not None


def parse(buffer: bytes) -> list[tuple[int, str]]:
    """The (mask, name) pairs of one read of an inotify fd."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(buffer):
        _, mask, _, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        raw = buffer[offset:offset + length].split(b"\0", 1)[0]
        offset += length
        events.append((mask, os.fsdecode(raw)))
    return events


class FolderEvents:
    """A thread delivering the events of ``mask`` for the entries of ``folder``.

    ``start`` raises ``OSError`` when inotify cannot watch it (not Linux, the
    per-user watch limit reached, the folder missing). The thread ends, and
    ``alive`` turns False, when the folder's watch goes away, when reading
    fails, or when the handler raises.
    """

    def __init__(self, folder: Path, mask: int, handler: Handler) -> None:
        self.folder = folder
        self.mask = mask
        self.handler = handler
        self._fd = -1
        self._stop_r = self._stop_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Lock()

    def start(self) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this system")
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        # The folder's own removal or move is always asked for: the reader then ends.
        wd = libc.inotify_add_watch(fd, os.fsencode(self.folder), self.mask | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
        if wd < 0:
            err = _errno_error("inotify_add_watch", self.folder)
            os.close(fd)
            raise err
        self._fd = fd
        try:
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            self._thread = threading.Thread(target=self._run, name="sbrender-inotify", daemon=True)
            self._thread.start()
        except BaseException as err:
            self._thread = None
            self.stop()  # no descriptor left behind
            raise OSError(errno.EAGAIN, f"cannot start the inotify reader: {err}") from err

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """End the thread and close the descriptors; safe to call twice, from any thread."""
        with self._stopping:
            if self._stop_w >= 0:
                os.write(self._stop_w, b"\0")
            if self._thread is not None:
                self._thread.join()
            for fd in (self._fd, self._stop_r, self._stop_w):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                buffer = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return  # the fd is unusable: alive() says so, and the owner starts another
            events = parse(buffer)
            self.handler(events)
            if any(mask & GONE for mask, _ in events):
                return


def _errno_error(call: str, path: Path | None = None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}", *([str(path)] if path is not None else []))
