"""The shape of ``outbox/<id>.json``: the contract consumers read.

Its presence means the job is finished, whatever the outcome. Fields:
``id``, ``status`` ("succeeded" | "failed" | "cancelled"), ``input`` (the job file, its
sha256, the batch position), ``params`` (resolved), ``images`` (file, seed,
size, sha256), ``model``, ``sampler``, ``device``, ``dtype``, ``versions``,
``metadata`` (the job's own, untouched), ``timings`` and, when failed, ``error``
(``type``, ``message``, maybe ``field``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import SbrenderError
from .jobs import Entry, Job

SCHEMA_VERSION = 1
# A result's status; before it has one, a job is pending (queued) or running.
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PENDING = "pending"
RUNNING = "running"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)


def iso(ts: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-25T10:54:59.123Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: Any) -> float | None:
    """The epoch seconds of an ``iso()`` time (any ISO-8601 with a zone); None when
    ``text`` is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def input_record(name: str, data: bytes, claim: str, entry_index: int | None, batch_size: int) -> dict[str, Any]:
    record: dict[str, Any] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "claim": claim}
    if batch_size > 1 or entry_index is not None and entry_index > 0:
        record["batch_index"] = (entry_index or 0) + 1
        record["batch_size"] = batch_size
    return record


def timings(queued: float, started: float, finished: float, parts: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"queued_at": iso(queued), "started_at": iso(started), "finished_at": iso(finished),
                           "wait_s": round(max(0.0, started - queued), 4)}
    out.update({k: round(v, 4) for k, v in parts.items()})
    out["total_s"] = round(finished - started, 4)
    return out


def succeeded(job: Job, *, input: dict[str, Any], images: list[dict[str, Any]], sampler: dict[str, Any],
              renderer: dict[str, Any], times: dict[str, Any], warnings: list[str] | None = None) -> dict[str, Any]:
    out = {
        "schema": SCHEMA_VERSION, "id": job.id, "status": SUCCEEDED, "input": input,
        "params": job.params(), "images": images, "sampler": sampler, **renderer,
        "metadata": job.metadata, "timings": times,
    }
    if warnings:
        out["warnings"] = warnings
    return out


def failed(entry: Entry, error: SbrenderError, *, input: dict[str, Any], renderer: dict[str, Any],
           times: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    status = CANCELLED if error.kind == "cancelled" else FAILED
    out: dict[str, Any] = {"schema": SCHEMA_VERSION, "id": job_id or entry.id, "status": status, "input": input}
    if isinstance(entry, Job):
        out["params"] = entry.params()
        out["metadata"] = entry.metadata
    out.update(renderer)
    out["images"] = []
    out["timings"] = times
    out["error"] = error.to_dict()
    return out


@dataclass(frozen=True)
class ImageToWrite:
    """A rendered image and the PNG text chunks it will carry."""

    name: str
    image: Any  # PIL.Image.Image
    seed: int
    text: dict[str, str]


@dataclass(frozen=True)
class Draft:
    """A result on its way to the writer thread, as data: the result JSON but
    for what only the writes decide (the images' hashes, the write time, when
    it finished). ``result`` holds ``images`` and ``timings`` as placeholders."""

    result_id: str
    result: dict[str, Any]
    queued: float  # epoch seconds, for the timings
    started: float
    parts: dict[str, float] = field(default_factory=dict)  # load_s, inference_s, ...; write_s is added
    images: tuple[ImageToWrite, ...] = ()
    # The job's parameters as it gave them (a random seed not yet drawn), for a
    # failure: a retry then draws a new seed, as for any failed job.
    failure_params: dict[str, Any] | None = None

    @property
    def json_name(self) -> str:
        return f"{self.result_id}.json"

    def finish(self, images: list[dict[str, Any]], write_s: float) -> dict[str, Any]:
        """The result, once its images are written."""
        parts = {**self.parts, "write_s": write_s} if self.parts else {}
        return {**self.result, "images": images, "timings": timings(self.queued, self.started, time.time(), parts)}

    def fail(self, error: SbrenderError) -> dict[str, Any]:
        """The result when the images could not be encoded or written: failed, with
        the job's parameters and metadata, without what only a success has."""
        out = {k: v for k, v in self.result.items() if k not in _SUCCESS_ONLY}
        if self.failure_params is not None:
            out["params"] = self.failure_params
        status = CANCELLED if error.kind == "cancelled" else FAILED
        return {**out, "status": status, "images": [], "timings": timings(self.queued, self.started, time.time(), {}),
                "error": error.to_dict()}


_SUCCESS_ONLY = ("sampler", "warnings", "batch", "prompt")
