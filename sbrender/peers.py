"""Daemons sharing a spool: who they are, and whether they are still alive.

Each daemon has an owner name (``<host>-<pid>``), a work folder of its own
(``state/work/<owner>/``) and a status file (``state/daemons/<owner>.json``)
with a heartbeat. A claimed file belongs to the daemon whose work folder holds
it; only a daemon that is gone has its files taken back. Gone means: on this
host, its process no longer exists; on another host, its heartbeat is older
than ``STALE_S`` (a crashed machine cannot say goodbye).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any


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


def owner_name(host: str | None = None, pid: int | None = None) -> str:
    # Owner names appear in file names: letters, digits, '.', '_' and '-' only.
    host = re.sub(r"[^A-Za-z0-9._-]", "_", host or hostname())
    return f"{host}-{pid or os.getpid()}"


def split_owner(owner: str) -> tuple[str, int | None]:
    host, _, pid = owner.rpartition("-")
    return host, int(pid) if pid.isdigit() else None


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
    if not status or not isinstance(status.get("heartbeat"), str):
        return None
    try:
        beat = datetime.fromisoformat(status["heartbeat"].replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return (time.time() if now is None else now) - beat


def is_alive(owner: str, daemons_dir: Path) -> bool:
    """Whether the daemon named ``owner`` may still be working on its files."""
    host, pid = split_owner(owner)
    status = read_status(daemons_dir / f"{owner}.json")
    if host == owner_name(pid=1).rpartition("-")[0]:  # this host
        if pid is None or not pid_alive(pid):
            return False
        recorded = (status or {}).get("proc_start")
        return recorded is None or recorded == process_start(pid)
    age = heartbeat_age(status)
    return age is not None and age < STALE_S
