"""One root for every error sbrender raises on purpose.

Each error knows how to describe itself for a person (``str``) and for a
result file (``to_dict``). A request to stop is not an error: ``ShutdownRequested``
derives from ``BaseException`` so that ``except Exception`` never swallows it.
"""

from __future__ import annotations

from typing import Any


class SbrenderError(Exception):
    """Root of sbrender's errors; ``str(err)`` is a message a person can act on."""

    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "message": str(self)}
        return out


class ConfigError(SbrenderError):
    """The configuration (file, environment or flags) holds a bad value."""

    kind = "config"


class JobError(SbrenderError):
    """A job file or one of its jobs is not valid; the job fails, the daemon goes on."""

    kind = "invalid_job"

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.field is not None:
            out["field"] = self.field
        return out


class DuplicateJobError(JobError):
    """A job id that already has a result; ids are never silently reused."""

    kind = "duplicate_id"


class UnsafeFileError(JobError):
    """A job file that is not a plain regular file (symlink, FIFO, hard link, too large)."""

    kind = "unsafe_file"


class JobCancelled(SbrenderError):
    """Someone cancelled the job (``sbrender cancel``) before it finished."""

    kind = "cancelled"


class RenderError(SbrenderError):
    """The renderer failed on a job (bad model output, a library exception)."""

    kind = "render"


class ModelError(SbrenderError):
    """The model cannot be found or loaded: the daemon does not start, or (a job's
    own model) that job fails. ``lasting``: the file itself is at fault (its format,
    its architecture), so loading it again before it changes is pointless; False
    for what may pass (memory, I/O)."""

    kind = "model"

    def __init__(self, message: str, *, hint: str | None = None, lasting: bool = True) -> None:
        super().__init__(message, hint=hint)
        self.lasting = lasting


class SpoolError(SbrenderError):
    """The spool folders are missing, unwritable or inconsistent."""

    kind = "spool"


class QueueUnavailable(SbrenderError):
    """The queue's server (Redis) cannot be reached or refuses to serve now."""

    kind = "queue"


class CompileCacheError(SbrenderError):
    """A compile-cache bundle cannot be read, written, or used on this host."""

    kind = "compile_cache"


class ShutdownRequested(BaseException):
    """Raised inside a render to stop it; deliberately not an ``Exception``."""


def first_line(err: BaseException) -> str:
    """A library exception's first line, for a message that names it (its
    traceback goes to the log, not to the person who has to act)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
