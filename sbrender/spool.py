"""The spool's folders and the moves between them.

    inbox/          producers drop job files here (atomic rename recommended)
    state/work/     a file the daemon has claimed (atomic rename out of the inbox)
    state/done/     archived input: every job in it succeeded
    state/failed/   archived input: at least one job in it failed
    outbox/         <id>.png / <id>-<k>.png, then <id>.json last

A claim is an atomic rename, so a file is in exactly one place at any moment
and every input stays accounted for. The state folder must share the inbox's
filesystem, or the rename would be a copy.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import SpoolError
from .ids import is_job_file_name
from .outputs import TEMP_PREFIX, TEMP_SUFFIX

SUBFOLDERS = ("work", "done", "failed")


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
        return f"{self.ino}-{self.mtime_ns}"


class Spool:
    """Paths and atomic moves; holds no queue state of its own."""

    def __init__(self, inbox: Path, outbox: Path, state: Path) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.state = state
        self.work = state / "work"
        self.done = state / "done"
        self.failed = state / "failed"

    def prepare(self) -> None:
        """Create missing folders and check they can work together; ``SpoolError`` otherwise."""
        for folder in (self.inbox, self.outbox, self.work, self.done, self.failed):
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

    def check(self) -> None:
        """Fail when the folders exist but are unusable, without creating anything."""
        for folder in (self.inbox, self.outbox):
            if not folder.is_dir():
                raise SpoolError(f"folder {folder} does not exist",
                                 hint="start the daemon once, or create it, or fix the setting")

    # --- listing -----------------------------------------------------------------

    def _list(self, folder: Path) -> list[FileInfo]:
        out = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if is_job_file_name(entry.name):
                        info = FileInfo.of(Path(entry.path))
                        if info is not None:
                            out.append(info)
        except FileNotFoundError:
            return []
        return out

    def inbox_files(self) -> list[FileInfo]:
        return self._list(self.inbox)

    def claimed_files(self) -> list[FileInfo]:
        return self._list(self.work)

    def archived_files(self) -> list[tuple[str, FileInfo]]:
        return [("done", f) for f in self._list(self.done)] + [("failed", f) for f in self._list(self.failed)]

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

    # --- outbox ------------------------------------------------------------------

    def result_path(self, job_id: str) -> Path:
        return self.outbox / f"{job_id}.json"

    def remove_stale_temps(self) -> list[Path]:
        """Temp files left in the outbox by a crashed writer on this host."""
        removed = []
        for entry in os.scandir(self.outbox):
            name = entry.name
            if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                continue
            parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
        return removed

    @property
    def status_path(self) -> Path:
        return self.state / "daemon.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hostname() -> str:
    return socket.gethostname()
