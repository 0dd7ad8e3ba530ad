"""The inbox as a way into a Redis queue: dropped files are forwarded under their ids.

A daemon on a Redis queue still looks at its inbox, every ``watch.rescan_seconds``
(polling: a file is read once it has not changed for ``watch.settle_seconds``;
write it under a hidden name and rename it in, as always). Each file is claimed
by rename into this daemon's work folder and read with the hostile-input rules
(``jobfile``); each of its jobs is submitted under its id. A job that fails
validation is submitted as invalid, with its error, so the daemon that takes it
publishes the same failed result the file spool would; an id already used by
another job gets ``<id>.dupN`` and a ``duplicate_id`` failure. Then the file is
archived. A daemon that dies mid-file leaves it claimed; the next one adopts it
and sends it again, which is safe: a submit is idempotent by id and document.
It also removes the temp files dead daemons left in the outbox, as the file
spool's recovery does: it owns the folders on a Redis queue.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from . import ids
from .config import Settings
from .errors import DuplicateJobError, JobError, QueueUnavailable, SbrenderError, SpoolError
from .jobfile import read_bytes
from .jobs import BadJob, Entry, Job, Rules, parse_job_bytes
from .redisqueue import RedisQueue
from .spool import FileInfo, Spool

log = structlog.get_logger("sbrender")

TEMPS_EVERY_S = 60.0  # how often temp files of daemons that are gone are looked for (a scan of the outbox)
INVALID = "__invalid__"  # a queued document that stands for a job that failed validation


def invalid_document(error: JobError) -> dict[str, Any]:
    return {INVALID: error.to_dict()}


def invalid_error(document: Any) -> JobError | None:
    """The validation error an invalid document carries; None for a job's document."""
    if not isinstance(document, dict) or not isinstance(document.get(INVALID), dict):
        return None
    found = document[INVALID]
    error = JobError(str(found.get("message", "invalid job")), field=found.get("field"))
    error.kind = str(found.get("type", JobError.kind))
    return error


def job_document(job: Job) -> dict[str, Any]:
    """What a validated job is submitted as: its resolved parameters (a seed left
    to draw stays unset), its init image's bytes (the parameters hold only its
    record) and its metadata."""
    document = {k: v for k, v in job.params().items() if v is not None}
    if job.init_image is not None:
        document["init_image"] = job.init_image.as_base64()
    return {**document, "metadata": job.metadata}


class InboxForwarder:
    def __init__(self, settings: Settings, queue: RedisQueue) -> None:
        self.spool = Spool(settings.inbox, settings.outbox, settings.state)
        self.queue = queue
        self.rules = Rules.from_settings(settings)
        self.every_s: float = settings["watch.rescan_seconds"]
        self.settle_ns = int(settings["watch.settle_seconds"] * 1e9)
        self._next = 0.0
        self._next_temps = 0.0

    def prepare(self) -> None:
        self.spool.prepare()

    def close(self) -> None:
        self.spool.forget_owner(self.spool.owner)

    def waiting(self) -> bool:
        """Whether a job file waits in the inbox, to be forwarded."""
        return any(True for _ in self.spool.inbox_files())

    def refresh(self) -> None:
        """Forward what dead daemons left claimed, then what settled in the inbox;
        now and then, remove the temp files that dead daemons left."""
        now = time.monotonic()
        if now >= self._next_temps:
            self._next_temps = now + TEMPS_EVERY_S
            for path in self.spool.remove_stale_temps():
                log.info("removed stale temp file", file=str(path))
        if now < self._next:
            return
        self._next = now + self.every_s
        try:
            for _, info in list(self.spool.orphans()):
                path = self.spool.adopt(info)
                if path is not None:
                    self._forward(path)
            for info in self.spool.inbox_files():
                if time.time_ns() - info.changed_ns < self.settle_ns:
                    continue  # maybe still being written
                path = self._claim(info)
                if path is not None:
                    self._forward(path)
        except QueueUnavailable as err:
            log.warning("cannot forward the inbox while redis is away", reason=str(err))

    def _claim(self, info: FileInfo) -> Path | None:
        try:
            return self.spool.claim(info.name)
        except SpoolError as err:
            log.warning("cannot claim file yet", file=info.name, reason=str(err))
            return None

    def _forward(self, path: Path) -> None:
        """Submit every job of a claimed file, then archive it (back to the inbox
        when the queue went away meanwhile: sent again later, safely)."""
        try:
            entries = _entries(path, self.rules)
            for entry in entries:
                self._submit(entry)
        except QueueUnavailable:
            self.spool.unclaim(path)
            raise
        archived = self.spool.archive(path, ok=all(isinstance(e, Job) for e in entries))
        log.info("job file forwarded to the queue", file=path.name, jobs=[e.id for e in entries],
                 archived=str(archived))

    def _submit(self, entry: Entry) -> None:
        document = job_document(entry) if isinstance(entry, Job) else invalid_document(entry.error)
        job_id, n = entry.id, 0
        while True:
            try:
                self.queue.submit(job_id, document, entry.priority)
                return
            except ValueError:
                # The id holds another job: as on the file spool, this one fails as <id>.dupN.
                n += 1
                job_id = f"{entry.id}.dup{n}"
                document = invalid_document(DuplicateJobError(
                    f"job id {entry.id} is already used by another job; ids are never reused",
                    hint="submit it again under a new id (rename the file)"))


def _entries(path: Path, rules: Rules) -> list[Entry]:
    """The file's jobs, read as the file spool reads them (unsafe files refused unread)."""
    try:
        data = read_bytes(path, rules.read_cap)
    except SbrenderError as err:
        error = err if isinstance(err, JobError) else JobError(str(err))
        stem = ids.stem(path.name)
        return [BadJob(ids.safe_id_for(path.name) if ids.id_problem(stem) else stem, error, 0, path.name)]
    return parse_job_bytes(path.name, data, rules)
