"""The spool's folders and the moves between them.

    inbox/                 producers drop job files here (atomic rename recommended)
    state/cancel/<id>      a request to cancel a job (``sbrender cancel``)
    state/retried/         results moved aside by ``sbrender retry``
    state/work/<owner>/    files a daemon has claimed (atomic rename out of the inbox),
                           and ``.rendering~<id>`` for each job it is rendering
    state/done/            archived input: every job in it succeeded
    state/failed/          archived input: at least one job in it failed
    state/daemons/         one status file per daemon, with its heartbeat
    state/ids/<id>         the id ledger: the claim token of the file the id is
                           reserved for, while it runs or has a result (ledger.py)
    state/attempts/        how often a file was being rendered when a daemon died
    outbox/                <id>.png / <id>-<k>.png, then <id>.json last

A claim is an atomic rename, so a file is in exactly one place at any moment
and every input stays accounted for. The state folder must share the inbox's
filesystem, or the rename would be a copy. Several daemons may share a spool:
each claims into its own work folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import ledger, peers
from .errors import SpoolError
from .ids import is_job_file_name
from .outputs import temp_owner

# A job being rendered is named in its daemon's work folder by an empty file,
# ``.rendering~<id>``, renamed from the previous job's mark (or a spare,
# ``.spare~<k>``) when its render starts: one rename per job and no file created,
# where the status file written before each render cost a new inode. Recovery
# counts a crash against the jobs a dead daemon's marks name. As the status file
# did, a mark stays until the next render, or until the loop finds nothing to do.
MARK_PREFIX = ".rendering~"
SPARE_PREFIX = ".spare~"


@dataclass(frozen=True)
class FileInfo:
    """A job file as last seen: name, place and the stat fields that matter."""

    name: str
    path: Path
    mode: int
    size: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileInfo | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return cls(path.name, path, st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Changes whenever the content may have changed."""
        return (self.ino, self.size, self.mtime_ns, self.ctime_ns)

    @property
    def changed_ns(self) -> int:
        return max(self.mtime_ns, self.ctime_ns)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def claim_token(self) -> str:
        """Identifies this very file (not its name) across renames: inode and mtime."""
        return ledger.claim_token(self.ino, self.mtime_ns)


class Spool:
    """Paths and atomic moves; holds no queue state of its own."""

    def __init__(self, inbox: Path, outbox: Path, state: Path, owner: str | None = None) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.state = state
        self.owner = owner or peers.owner_name()
        self.works = state / "work"
        self.work = self.works / self.owner
        self.done = state / "done"
        self.failed = state / "failed"
        self.daemons = state / "daemons"
        self.ids = state / "ids"
        self.attempts = state / "attempts"
        self.cancel = state / "cancel"
        self.retried = state / "retried"
        self.ledger = ledger.Ledger(self.ids, self.result_path, self.work_folders)

    def prepare(self) -> None:
        """Create missing folders and check they can work together; ``SpoolError`` otherwise."""
        for folder in (self.inbox, self.outbox, self.work, self.done, self.failed, self.daemons, self.ids,
                       self.attempts, self.cancel, self.retried):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SpoolError(f"cannot create folder {folder}: {err.strerror}",
                                 hint="create it, or point the setting at a writable place") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise SpoolError(f"folder {folder} is not writable by this user",
                                 hint="fix its owner or mode, or point the setting elsewhere")
        if os.stat(self.inbox).st_dev != os.stat(self.work).st_dev:
            raise SpoolError(
                f"the state folder {self.state} is on another filesystem than the inbox {self.inbox}; "
                "claiming a job by rename would not be atomic",
                hint="put the state folder on the inbox's filesystem (set state: or SBRENDER_STATE)")

    def identity(self) -> dict[Path, tuple[int, int]]:
        """(device, inode) of each spool folder, to notice one vanishing or being
        replaced (an unmounted volume shows an empty folder in its place)."""
        out = {}
        for folder in (self.inbox, self.outbox, self.state, self.work):
            st = os.stat(folder)
            out[folder] = (st.st_dev, st.st_ino)
        return out

    def identity_problems(self, expected: dict[Path, tuple[int, int]]) -> list[str]:
        problems = []
        for folder, ident in expected.items():
            try:
                st = os.stat(folder)
            except OSError as err:
                problems.append(f"{folder} is gone ({err.strerror}); is its volume mounted?")
                continue
            if (st.st_dev, st.st_ino) != ident:
                problems.append(f"{folder} was replaced by another folder (a volume mounted or unmounted "
                                "over it, or the folder re-created)")
        return problems

    # --- listing -----------------------------------------------------------------

    def _list(self, folder: Path) -> list[FileInfo]:
        return list(self._iter(folder))

    @staticmethod
    def _iter(folder: Path) -> Iterator[FileInfo]:
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if is_job_file_name(entry.name):
                        info = FileInfo.of(Path(entry.path))
                        if info is not None:
                            yield info
        except FileNotFoundError:
            return

    def inbox_files(self) -> Iterator[FileInfo]:
        """The inbox's job files, one at a time: a rescan of a large queue holds no
        list of them all."""
        return self._iter(self.inbox)

    def work_folders(self) -> list[Path]:
        """Where daemons keep claimed files: one folder per daemon, and ``state/work/``
        itself (where versions before owners claimed)."""
        try:
            with os.scandir(self.works) as it:
                owners = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return [self.works, *owners]

    def orphans(self) -> Iterator[tuple[str, FileInfo]]:
        """Files claimed by daemons that are gone (and by pre-owner versions, which
        claimed straight into state/work/). Never a live peer's."""
        for info in self._list(self.works):
            yield "", info
        for owner in self.gone_owners():
            for info in self._list(self.works / owner):
                yield owner, info

    def gone_owners(self) -> list[str]:
        """The daemons with a work folder here that are gone (never this one)."""
        try:
            owners = [e.name for e in os.scandir(self.works) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return [o for o in owners if o != self.owner and not peers.is_alive(o, self.status_path(o))]

    def forget_owner(self, owner: str) -> bool:
        """Remove a gone (or stopping) daemon's work folder, its rendering marks
        and spares, and its status file. False when the folder still holds
        claimed files: they stay, with the status file that names their owner,
        for recovery."""
        folder = self.works / owner
        self.drop_marks(owner)
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
        except OSError:
            return False  # not empty: a file is still claimed
        try:
            os.unlink(self.status_path(owner))
        except FileNotFoundError:
            pass
        return True

    def adopt(self, info: FileInfo) -> Path | None:
        """Move an orphaned claimed file into our own work folder. None when a peer
        adopted it first."""
        target = self.work / info.name
        if os.path.lexists(target):
            return None
        try:
            os.rename(info.path, target)
        except FileNotFoundError:
            return None
        return target

    # --- what is rendering ------------------------------------------------------------

    def move_mark(self, slot: int, old: str | None, new: str | None) -> None:
        """Rename this daemon's mark number ``slot`` from naming job ``old`` to
        naming job ``new`` (None: a spare). Created when missing (the first
        render, a bigger batch). Raises ``OSError``."""
        source, target = self._mark(slot, old), self._mark(slot, new)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            if new is not None:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                                 0o644))

    def _mark(self, slot: int, job_id: str | None) -> Path:
        return self.work / (f"{SPARE_PREFIX}{slot}" if job_id is None else f"{MARK_PREFIX}{job_id}")

    def drop_marks(self, owner: str) -> None:
        """Remove the marks and spares of ``owner`` (gone, or stopping)."""
        folder = self.works / owner
        for name in _names(folder):
            if name.startswith((MARK_PREFIX, SPARE_PREFIX)):
                try:
                    os.unlink(folder / name)
                except FileNotFoundError:
                    pass

    def rendering(self, owner: str) -> list[str] | None:
        """The jobs the daemon ``owner`` marked as rendering; None when its folder
        has neither marks nor spares (a version before marks: ask its status file)."""
        names = _names(self.works / owner)
        if not any(name.startswith((MARK_PREFIX, SPARE_PREFIX)) for name in names):
            return None
        return [name[len(MARK_PREFIX):] for name in names if name.startswith(MARK_PREFIX)]

    # --- moves -------------------------------------------------------------------

    def claim(self, name: str) -> Path | None:
        """Move ``inbox/name`` into the work folder. None when it is gone (taken or
        deleted). A name already in the work folder is left in the inbox."""
        target = self.work / name
        if os.path.lexists(target):
            raise SpoolError(f"{name} is already claimed and not finished")
        try:
            os.rename(self.inbox / name, target)
        except FileNotFoundError:
            return None
        return target

    def archive(self, path: Path, ok: bool) -> Path:
        """Move a claimed file into done/ or failed/, never over another file."""
        folder = self.done if ok else self.failed
        target = folder / path.name
        n = 1
        while os.path.lexists(target):
            target = folder / f"{path.name}.{n}"
            n += 1
        os.rename(path, target)
        return target

    def unclaim(self, path: Path) -> None:
        """Put an interrupted claimed file back into the inbox for the next daemon."""
        target = self.inbox / path.name
        if not os.path.lexists(target):
            os.rename(path, target)

    # --- ids and attempts ----------------------------------------------------------

    def reserve(self, job_id: str, claim: str, *, sync: bool = True) -> bool:
        """Reserve ``job_id`` for the file with this claim token: True when it is ours
        (new, taken over from a stale reservation, or this very file's before a
        crash); False when another file's live reservation holds it (ledger.py).
        ``sync=False``: the caller fsyncs ``ids`` before the result is published."""
        return self.ledger.reserve(job_id, claim, sync=sync)

    def count_attempt(self, claim: str, job_id: str) -> int:
        """One more daemon died while rendering this job of this file; the count."""
        path = self.attempts / f"{claim}-{job_id}"
        try:
            count = int(path.read_text() or 0) + 1
        except (OSError, ValueError):
            count = 1
        path.write_text(str(count))
        return count

    def clear_attempts(self, claim: str) -> None:
        # A listing, not a glob: asked once per finished file, and the folder is
        # nearly always empty (a glob compiled a new pattern each time).
        prefix = f"{claim}-"
        try:
            names = [name for name in os.listdir(self.attempts) if name.startswith(prefix)]
        except FileNotFoundError:
            return
        for name in names:
            try:
                os.unlink(self.attempts / name)
            except FileNotFoundError:
                pass

    # --- cancel requests -------------------------------------------------------------

    def cancel_requests(self) -> list[str]:
        """Job ids someone asked to cancel (``state/cancel/<id>``)."""
        try:
            return [name for name in os.listdir(self.cancel) if not name.startswith(".")]
        except FileNotFoundError:
            return []

    def is_cancelled(self, job_id: str) -> bool:
        return os.path.exists(self.cancel / job_id)

    def clear_cancel(self, job_id: str) -> None:
        try:
            os.unlink(self.cancel / job_id)
        except FileNotFoundError:
            pass

    # --- outbox ------------------------------------------------------------------

    def result_path(self, job_id: str) -> Path:
        return self.outbox / f"{job_id}.json"

    def remove_stale_temps(self) -> list[Path]:
        """Temp files left in the outbox and state by daemons that are gone."""
        removed = []
        for folder in (self.outbox, self.state, self.daemons, self.ids):
            for entry in os.scandir(folder):
                owner = temp_owner(entry.name)
                if owner is None or owner == self.owner or peers.is_alive(owner, self.status_path(owner)):
                    continue
                try:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
                except FileNotFoundError:
                    pass
        return removed

    # --- daemons -------------------------------------------------------------------

    def status_path(self, owner: str) -> Path:
        """The status file of the daemon named ``owner``."""
        return self.daemons / f"{owner}.json"

    def status_files(self) -> Iterator[tuple[str, Path]]:
        """``(owner, path)`` of each daemon's status file."""
        try:
            with os.scandir(self.daemons) as it:
                names = [e.name for e in it]
        except FileNotFoundError:
            return
        for name in sorted(names):
            if name.endswith(".json") and not name.startswith("."):
                yield name[: -len(".json")], self.daemons / name


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
