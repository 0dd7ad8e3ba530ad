"""What `sbrender run` checks before it imports torch and diffusers.

A start that cannot work (a model that is not there, a spool folder that cannot be
made) stops at once with what to fix, instead of after seconds of imports, at
every restart under systemd. Each check is a row of ``CHECKS``; it raises an
``SbrenderError`` for what the daemon itself would refuse, and creates nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import checkpoints, models
from .config import Settings
from .errors import ConfigError, JobError, SpoolError
from .spool import Spool


def check_model(s: Settings) -> None:
    models.check(s.model, s["model_config"], offline=models.is_offline(s["offline"]))


def check_vae(s: Settings) -> None:
    """The vae setting names a usable file (else every job without its own would fail)."""
    if s["vae"] not in checkpoints.VAE_CHOICES:
        try:
            checkpoints.vae_catalog(s.vae_dir).lookup(s["vae"], "vae")
        except JobError as err:
            raise ConfigError(f"setting vae: {err.message}", hint=err.hint or "set vae: Automatic") from None


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where ``mkdir -p`` would start)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_folders(s: Settings) -> None:
    """The folders ``Spool.prepare`` makes or uses: each one exists as a writable
    folder, or can be made under one; claims stay on the inbox's filesystem."""
    spool = Spool(s.inbox, s.outbox, s.state)
    for folder in (spool.inbox, spool.outbox, spool.work, spool.done, spool.failed, spool.daemons, spool.ids,
                   spool.attempts, spool.cancel, spool.retried):
        found = _existing(folder)
        if not found.is_dir():
            raise SpoolError(f"cannot create folder {folder}: {found} is not a folder",
                             hint="move it away, or point the setting at another place")
        if not os.access(found, os.W_OK | os.X_OK):
            raise SpoolError(f"folder {folder} is not writable by this user" if found == folder else
                             f"cannot create folder {folder}: {found} is not writable by this user",
                             hint="fix its owner or mode, or point the setting elsewhere")
    if os.stat(_existing(spool.inbox)).st_dev != os.stat(_existing(spool.work)).st_dev:
        raise SpoolError(
            f"the state folder {spool.state} is on another filesystem than the inbox {spool.inbox}; "
            "claiming a job by rename would not be atomic",
            hint="put the state folder on the inbox's filesystem (set state: or SBRENDER_STATE)")


CHECKS: tuple[Callable[[Settings], None], ...] = (check_model, check_vae, check_folders)


def check(settings: Settings) -> None:
    """Raise the first problem that would stop the daemon's start; torch-free."""
    for row in CHECKS:
        row(settings)
