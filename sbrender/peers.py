"""Daemons sharing a spool: who they are, and whether they are still alive.

Each daemon has an owner name (``<host>-<pid>-<start>``), a work folder of its own
(``state/work/<owner>/``) and a status file (``state/daemons/<owner>.json``)
with a heartbeat. A claimed file belongs to the daemon whose work folder holds
it; only a daemon that is gone has its files taken back. Gone means: on this
host, its process no longer exists; on another host, its heartbeat is older
than ``STALE_S`` (a crashed machine cannot say goodbye). Hosts are told apart by
name: two daemons on one spool need different host names.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from .results import parse_iso


# Heartbeats are written at least every few seconds (each denoising step, each
# rescan); a peer on another host silent this long is taken to be gone.
STALE_S = 120.0


def hostname() -> str:
    return socket.gethostname()


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _host_part(host: str | None = None) -> str:
    # Owner names appear in file names: letters, digits, '.', '_' and '-' only.
    return re.sub(r"[^A-Za-z0-9._-]", "_", host or hostname())


def owner_name(host: str | None = None, pid: int | None = None) -> str:
    """``<host>-<pid>-<start>``: the process start time tells this run from an
    earlier one that had the same pid (a container's PID 1, a reboot)."""
    pid = pid or os.getpid()
    return f"{_host_part(host)}-{pid}-{process_start(pid) or 0}"


def split_owner(owner: str) -> tuple[str, int | None, str | None]:
    """(host, pid, start) of an owner name; pid None when it is not one of ours."""
    parts = owner.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), parts[2]
    return owner, None, None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), which tells a
    process from a later one that reused its pid. None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def heartbeat_age(status: dict[str, Any] | None, now: float | None = None) -> float | None:
    """Seconds since the status file's heartbeat, or None when there is none."""
    beat = parse_iso(status.get("heartbeat")) if status else None
    if beat is None:
        return None
    return (time.time() if now is None else now) - beat


def is_alive(owner: str, status_path: Path) -> bool:
    """Whether the daemon named ``owner`` (its status file at ``status_path``) may
    still be working on its files."""
    host, pid, start = split_owner(owner)
    if host == _host_part():
        return pid is not None and pid_alive(pid) and start == (process_start(pid) or "0")
    age = heartbeat_age(read_status(status_path))
    return age is not None and age < STALE_S
