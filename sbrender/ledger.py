"""The id ledger: which job ids are in use, and who may take one.

``state/ids/<id>`` is a reservation: it holds the claim token (inode and mtime)
of the job file whose job has the id. A daemon reserves an id before it renders
under it, so two files never both render as ``<id>``.

A reservation is *live* while its job is running or its result is there: a
claimed file in a daemon's work folder has its token, or ``outbox/<id>.json``
exists. Otherwise it is *stale* (its result was removed by a person, or by
``sbrender retry``): the id is free again, and the next file to reserve it takes
the reservation over. Every command tells this one story: an id whose result a
person removed, and that no queued or running job holds, is free again.

A reservation is a symbolic link whose target is the token (it is never
followed): ``symlink(2)`` creates the name and its content in one step and fails
if the name exists, so a crash never leaves an empty or half-written one, and
reserving costs one system call and no file data to flush. The folder's fsync,
which makes a reservation survive a power cut, may be left to the caller
(``sync=False``): the daemon's writer makes it with the result's group, before the
result is published. A reservation lost to a power cut before then had no
result either, and is made again when its file is recovered. Reservations written as plain files by earlier versions
are read as before. Only a taker-over removes one, and only under the ledger's
lock (``flock`` on ``state/ids/.lock``, released by the kernel when a holder
dies), after checking again that it is still the stale one: a fresh reservation
can appear only where none is, so two files never both win.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .outputs import fsync_dir

LOCK_NAME = ".lock"


def claim_token(ino: int, mtime_ns: int) -> str:
    """Identifies one file (not its name) across renames: ``<inode>-<mtime_ns>``."""
    return f"{ino}-{mtime_ns}"


class Ledger:
    """The reservations in ``ids``, judged live by the results (``result_path(id)``)
    and the files claimed in ``work_folders()``: the spool's layout, from spool.py."""

    def __init__(self, ids: Path, result_path: Callable[[str], Path],
                 work_folders: Callable[[], Iterable[Path]]) -> None:
        self.ids = ids
        self.result_path = result_path
        self.work_folders = work_folders

    def holder(self, job_id: str) -> str | None:
        """The claim token reserving ``job_id``, live or stale; None when there is none."""
        path = self.ids / job_id
        try:
            return os.readlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
        try:
            return path.read_text()  # a plain file, as earlier versions wrote them
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_live(self, job_id: str, token: str) -> bool:
        """Whether a reservation of ``job_id`` by ``token`` still stands: its file is
        claimed (running), or the id has a result."""
        # The work folders first, then the outbox: a job's result is published
        # before its file leaves the work folder, so one finishing meanwhile is
        # seen in one place or the other.
        if token in self.claimed_tokens():
            return True
        return self.result_path(job_id).exists()

    def in_use(self, job_id: str) -> bool:
        """Whether ``job_id`` has a result or a live reservation."""
        if self.result_path(job_id).exists():
            return True
        held = self.holder(job_id)
        return held is not None and self.is_live(job_id, held)

    def claimed_tokens(self) -> set[str]:
        """The claim tokens of every file claimed by any daemon."""
        tokens = set()
        for folder in self.work_folders():
            for st in _stats(folder):
                tokens.add(claim_token(st.st_ino, st.st_mtime_ns))
        return tokens

    def reserve(self, job_id: str, token: str, *, sync: bool = True) -> bool:
        """Reserve ``job_id`` for the file with this claim token. True when it is
        ours (new, taken over from a stale reservation, or reserved by this very
        file before a crash); False when a live reservation of another file holds it.
        ``sync=False``: the folder's fsync is the caller's (see the module's doc)."""
        path = self.ids / job_id
        if _place(token, path):
            if sync:
                fsync_dir(self.ids)
            return True
        held = self.holder(job_id)
        if held == token:
            return True
        if held is not None and self.is_live(job_id, held):
            return False
        with self._locked():
            held = self.holder(job_id)  # again: another taker may have been first
            if held == token:
                return True
            if held is not None:
                if self.is_live(job_id, held):
                    return False
                os.unlink(path)
            won = _place(token, path)  # False: a fresh reservation came in meanwhile
        if won and sync:
            fsync_dir(self.ids)
        return won

    def release(self, job_id: str, token: str) -> bool:
        """Remove the reservation of ``job_id`` if ``token`` still holds it (``sbrender
        retry``, once the old result is moved aside). True when removed."""
        if self.holder(job_id) != token:
            return False
        with self._locked():
            if self.holder(job_id) != token:
                return False
            os.unlink(self.ids / job_id)
        return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.ids / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _place(token: str, target: Path) -> bool:
    """Create the reservation ``target`` holding ``token``; False when the name exists."""
    try:
        os.symlink(token, target)
    except FileExistsError:
        return False
    return True


def _stats(folder: Path) -> Iterator[os.stat_result]:
    """The stat of each job file in ``folder`` (not hidden, not a folder)."""
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return
