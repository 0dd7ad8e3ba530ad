"""A torch-free client of the spool contract, for the CLI, Django and scripts.

    from sbrender.client import Client
    client = Client("/srv/spool/inbox", "/srv/spool/outbox", "/srv/spool/state")
    job_id = client.submit("a cat on a mat", steps=20, metadata={"row": 42})
    result = client.wait(job_id, timeout=300)   # the outbox JSON, as a dict

``submit`` validates the job with the daemon's rules, then writes it
atomically (a hidden temp file in the inbox, fsync, rename), so it works from
any process that can write the inbox. With a Redis queue (``queue`` set to
``redis://host:6379/0``, see ``redisqueue``), ``submit``, ``result``, ``wait``
and ``cancel`` go to the server instead; a submit may be sent again under the
same id, and ``wait`` blocks on the job's event stream, never on a folder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ids, initimage
from .errors import ConfigError, JobError, SbrenderError
from .jobfile import read_bytes
from .jobs import BadJob, Entry, Job, Rules, build_job, check_size, parse_job_bytes
from .outputs import fsync_dir, read_json, rename_noreplace, write_synced
from .redisqueue import RedisQueue
from .results import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, STATES, parse_iso
from .spool import Spool

__all__ = ["CANCELLED", "FAILED", "PENDING", "RUNNING", "STATES", "SUCCEEDED", "Client", "JobState", "WaitTimeout",
           "validate_file"]


class WaitTimeout(SbrenderError):
    """``wait`` gave up before the result appeared."""

    kind = "timeout"


@dataclass(frozen=True)
class JobState:
    """A job as ``sbrender jobs`` shows it."""

    id: str
    state: str
    prompt: str
    since: float  # when it was queued (pending, running) or finished
    file: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "prompt": self.prompt, "since": self.since,
                "file": self.file, "error": self.error}


class Client:
    """The spool's three folders, and what a producer or consumer does with them."""

    def __init__(self, inbox: str | os.PathLike[str], outbox: str | os.PathLike[str],
                 state: str | os.PathLike[str] | None = None, rules: Rules | None = None,
                 queue: str = "files") -> None:
        self.inbox = Path(inbox)
        self.outbox = Path(outbox)
        self.state = Path(state) if state is not None else self.inbox.parent / "state"
        self.rules = rules or Rules()
        self.spool = Spool(self.inbox, self.outbox, self.state)  # where things live, and the id ledger
        self.queue = None if queue == "files" else RedisQueue(queue)

    def close(self) -> None:
        """Close the queue's connections (a Redis queue's; the file spool holds none).
        A ``with Client(...) as client:`` block closes them at its end."""
        if self.queue is not None:
            self.queue.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_settings(cls, settings: Any) -> Client:
        return cls(settings.inbox, settings.outbox, settings.state, Rules.from_settings(settings), settings["queue"])

    @classmethod
    def from_config(cls, config_file: str | os.PathLike[str] | None = None) -> Client:
        """A client with the daemon's folders, defaults and limits, read the way the
        daemon reads them (the config file, then ``SBRENDER_*`` variables), so it
        refuses exactly what the daemon would."""
        from .config import load_settings

        return cls.from_settings(load_settings(config_file))

    # --- producing ---------------------------------------------------------------------

    def submit(self, prompt: str | None = None, *, job_id: str | None = None,
               init_image: bytes | os.PathLike[str] | str | None = None, **fields: Any) -> str:
        """Validate and enqueue one job; returns its id. Raises ``JobError``.

        ``init_image`` makes it an img2img job: the image file's bytes, a path to
        it (a regular file, not followed through a symbolic link), or its base64
        as a job file holds it; checked here under the daemon's caps."""
        job = {k: v for k, v in fields.items() if v is not None}
        if prompt is not None:
            job["prompt"] = prompt
        if job_id is None:
            job_id = ids.new_id()
        problem = ids.id_problem(job_id)
        if problem:
            raise JobError(f"bad job id {job_id!r}: {problem}")
        image = self._init_image(init_image)
        if image is not None:
            job["init_image"] = image.as_base64()  # what the job document holds; checked once, below
        # The daemon's own checks, before anything is written.
        built = build_job(job_id, {**job, "init_image": image} if image is not None else job, self.rules)
        data = (json.dumps(job, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        check_size(job, len(data), self.rules)  # as the daemon reads the file (or the queued document)
        if self.queue is not None:
            try:
                self.queue.submit(job_id, job, built.priority)
            except ValueError as err:
                raise JobError(str(err), hint="choose another id") from None
            return job_id
        self._check_inbox()
        if self.is_known(job_id):
            raise JobError(f"job id {job_id} is already in use", hint="choose another id")
        _publish_new(self.inbox, f"{job_id}.json", data)
        return job_id

    def _init_image(self, value: bytes | os.PathLike[str] | str | None) -> initimage.InitImage | None:
        caps = {"max_bytes": self.rules.max_image_bytes, "max_pixels": self.rules.max_image_pixels}
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            return initimage.from_bytes(bytes(value), **caps)
        if isinstance(value, os.PathLike):
            return initimage.read_file(value, **caps)
        return initimage.decode(value, **caps)  # base64, as in a job file; anything else is named there

    def is_known(self, job_id: str) -> bool:
        """Whether an id is in use: queued, claimed, reserved by a running job, or
        finished. An id whose result was removed is free again (sbrender/ledger.py)."""
        if self.queue is not None and self.queue.state(job_id) is not None:
            return True
        # On Redis too: a file in this host's inbox is forwarded under its id soon.
        if any((folder / f"{job_id}{suffix}").exists()
               for folder in (self.inbox, *self.spool.work_folders()) for suffix in ids.JOB_SUFFIXES):
            return True
        return self.queue is None and self.spool.ledger.in_use(job_id)

    def _check_inbox(self) -> None:
        """An inbox that is not there is a setting to fix (or a volume to mount), not an empty queue."""
        if not self.inbox.is_dir():
            raise ConfigError(f"inbox {self.inbox} does not exist",
                              hint="start the daemon once or create the folder")

    # --- operating on jobs -----------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Ask the daemons to cancel a job: a queued one is taken out with a
        cancelled result, a running one stops at its next step. Returns the job's
        state when asked; raises ``JobError`` for a finished or unknown job."""
        if self.queue is not None:
            asked = self.queue.cancel(job_id)
            if asked == "unknown":
                raise JobError(f"no job {job_id} is pending or running")
            if asked not in (PENDING, RUNNING):
                raise JobError(f"job {job_id} already finished ({asked}); nothing to cancel")
            return asked
        result = self.result(job_id)
        if result is not None:
            raise JobError(f"job {job_id} already finished ({result.get('status')}); nothing to cancel")
        state = self.status(job_id)
        if state is None:
            raise JobError(f"no job {job_id} is pending or running")
        self.spool.cancel.mkdir(parents=True, exist_ok=True)
        (self.spool.cancel / job_id).touch()
        return state.state

    def retry(self, job_id: str) -> str:
        """Put a failed or cancelled job back into the queue under its id. Its old
        result moves to ``state/retried/`` (with a Redis queue: to the job's list of
        retried results). Returns the new job file's name (the id, on Redis)."""
        if self.queue is not None:
            return self._retry_on_redis(job_id)
        result = self.result(job_id)
        if result is None:
            if self.status(job_id) is None:
                raise JobError(no_such_job(job_id))
            raise JobError(f"job {job_id} is not finished yet; only a failed or cancelled job can be retried")
        if result.get("status") not in (FAILED, CANCELLED):
            raise JobError(f"job {job_id} is {result.get('status')}; only a failed or cancelled job can be retried")
        params = result.get("params")
        if not params:
            error = result.get("error") or {}
            # A refused duplicate's recorded message already ends with the same
            # advice (an error's hint is part of its message in the result).
            hint = None if error.get("type") == "duplicate_id" else "fix the job and submit it again under a new id"
            raise JobError(f"job {job_id} cannot be retried as it is: "
                           f"{error.get('message', 'no parameters recorded')}", hint=hint)
        # Exactly what the daemon used (its defaults included), so the retry is the same job.
        body = {k: v for k, v in params.items() if v is not None}
        if isinstance(body.get("init_image"), dict):  # the result records the image; its bytes are archived
            body["init_image"] = self._archived_init_image(job_id, result)
        body["metadata"] = result.get("metadata") or {}
        data = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        retried = self.spool.retried
        retried.mkdir(parents=True, exist_ok=True)
        n = 1
        while (retried / f"{job_id}.{n}.json").exists():
            n += 1
        # The old result leaves and the id is released before the job comes back,
        # or the daemon would take it for a second job under a used id. (Without
        # its result the id is free anyway, unless the old file is still claimed
        # for other jobs of its batch: the release covers that.)
        os.rename(self.spool.result_path(job_id), retried / f"{job_id}.{n}.json")
        claim = result.get("input", {}).get("claim")
        if isinstance(claim, str):
            self.spool.ledger.release(job_id, claim)
        self.spool.clear_cancel(job_id)
        _publish_new(self.inbox, f"{job_id}.json", data)
        return f"{job_id}.json"

    def _archived_init_image(self, job_id: str, result: Mapping[str, Any]) -> str:
        """The base64 of a finished job's init image, from its archived job file
        (``state/failed/`` or ``state/done/``), checked against the recorded sha256."""
        want = result["params"]["init_image"].get("sha256")
        name = str(result.get("input", {}).get("file", ""))
        for folder in (self.spool.failed, self.spool.done):
            candidates = [folder / name, *sorted(folder.glob(f"{glob.escape(name)}.[0-9]*"))] if name else []
            for path in candidates:  # the file, then same-named ones archived after it (name.1, ...)
                for entry in validate_file(path, self.rules, name=name):
                    if isinstance(entry, Job) and entry.id == job_id and entry.init_image is not None \
                            and entry.init_image.sha256 == want:
                        return entry.init_image.as_base64()
        raise JobError(f"job {job_id} cannot be retried: its init image (sha256 {str(want)[:12]}...) is not in "
                       f"the archived job files of {self.spool.failed.parent}",
                       hint="submit it again with its image")

    def _retry_on_redis(self, job_id: str) -> str:
        assert self.queue is not None
        found = self.queue.document(job_id)
        if found is None:
            raise JobError(no_such_job(job_id))
        priority = found["job"].get("priority", 0)
        outcome = self.queue.retry(job_id, priority if isinstance(priority, int) else 0)
        if outcome in (PENDING, RUNNING):
            raise JobError(f"job {job_id} is not finished yet; only a failed or cancelled job can be retried")
        if outcome != "retried":
            raise JobError(f"job {job_id} is {outcome}; only a failed or cancelled job can be retried")
        return job_id

    # --- consuming ---------------------------------------------------------------------

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The finished job's outbox JSON (with a Redis queue: the result document
        kept there), or None while it is not finished."""
        if self.queue is not None:
            return self.queue.result(job_id)
        return read_json(self.spool.result_path(job_id))

    def image_paths(self, result: Mapping[str, Any]) -> list[Path]:
        return [self.outbox / image["file"] for image in result.get("images", [])]

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.1) -> dict[str, Any]:
        """Block until the job's result exists; raises ``WaitTimeout``."""
        if self.queue is not None:
            result = self.queue.wait(job_id, timeout)
            if result is None:
                raise WaitTimeout(f"job {job_id} has no result after {timeout:g} s",
                                  hint="is a daemon running? see `sbrender status` on its host")
            return result
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.result(job_id)
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} has no result after {timeout:g} s",
                                  hint="is the daemon running? see `sbrender jobs`")
            time.sleep(poll_s)

    def daemons(self) -> list[dict[str, Any]]:
        """The daemons serving this queue, each with ``alive`` added: on Redis, every
        host's, as their keys in Redis say (alive while the server keeps the key: a
        heartbeat renews it), then this host's status files that Redis does not
        list; on the file spool, the status files of ``state/daemons/``."""
        from .peers import is_alive

        out = []
        if self.queue is not None:
            out = [{**status, "alive": True} for status in self.queue.daemons()]
        listed = {status.get("owner") for status in out}
        for owner, path in self.spool.status_files():
            status = read_json(path)
            if status is not None and owner not in listed:
                status["alive"] = is_alive(owner, self.spool.status_path(owner))
                out.append(status)
        return out

    def health(self, stale_after: float = 60.0) -> tuple[bool, list[dict[str, Any]]]:
        """Whether a daemon serves this spool and makes progress, and every daemon's
        status with ``health`` added: "ok", "stalled" (alive but no progress for
        ``stale_after`` seconds) or "gone"."""
        from .peers import heartbeat_age

        statuses = self.daemons()
        for status in statuses:
            progress = heartbeat_age({"heartbeat": status.get("progress_at")})
            beat = heartbeat_age(status)
            stalled = any(age is None or age > stale_after for age in (progress, beat))
            status["health"] = "gone" if not status["alive"] else "stalled" if stalled else "ok"
        return any(s["health"] == "ok" for s in statuses), statuses

    def progress(self, job_id: str) -> dict[str, Any]:
        """Where a job stands: finished (its status), running (step i of n), or
        pending (its place among the pending jobs, oldest first)."""
        if self.queue is not None:
            return self.queue.progress(job_id)
        result = self.result(job_id)
        if result is not None:
            return {"state": result.get("status")}
        for daemon in self.daemons():
            current = daemon.get("current") or {}
            if daemon["alive"] and daemon.get("state") == "rendering" and job_id in _rendering(current):
                return {"state": RUNNING, "step": current.get("step", 0), "steps": current.get("steps", 0)}
        pending = [j.id for j in self.jobs() if j.state == PENDING]
        if job_id in pending:
            return {"state": PENDING, "position": pending.index(job_id) + 1, "of": len(pending)}
        return {"state": "unknown"}

    def status(self, job_id: str) -> JobState | None:
        for job in self.jobs():
            if job.id == job_id:
                return job
        return None

    def jobs(self) -> list[JobState]:
        """Every job the spool knows: pending, running, then finished, oldest first.
        Raises ``ConfigError`` when the inbox does not exist."""
        if self.queue is not None:
            return self._jobs_on_redis()
        self._check_inbox()
        running = {job for d in self.daemons() if d["alive"] and d.get("state") == "rendering"
                   for job in _rendering(d.get("current") or {})}
        pending: dict[str, JobState] = {}
        claimed: set[str] = set()
        for path, mtime, entry, in_work in self._unfinished():
            if entry.id in claimed or (entry.id in pending and not in_work):
                continue  # a claimed file wins over a same-named one queued behind it
            if in_work:
                claimed.add(entry.id)
            prompt = entry.prompt if isinstance(entry, Job) else ""
            error = str(entry.error) if isinstance(entry, BadJob) else None
            pending[entry.id] = JobState(entry.id, RUNNING if entry.id in running else PENDING, prompt, mtime,
                                         os.path.basename(path), error)
        # The outbox last, in the order files move: a job finished while we looked
        # was seen unfinished too, and is shown once, by its result.
        out: list[JobState] = []
        for path in _scandir(self.outbox, ".json"):
            pending.pop(path.stem, None)  # finished: its result, not the file seen before it moved
            result = read_json(path)
            if result is None or "status" not in result:
                continue
            out.append(JobState(str(result.get("id", path.stem)), str(result["status"]),
                                str(result.get("params", {}).get("prompt", "")),
                                parse_iso(result.get("timings", {}).get("finished_at")) or path.stat().st_mtime,
                                str(result.get("input", {}).get("file", "")),
                                (result.get("error") or {}).get("message")))
        out.extend(pending.values())
        order = {RUNNING: 0, PENDING: 1}
        out.sort(key=lambda j: (order.get(j.state, 2), j.since, j.id))
        return out

    def _jobs_on_redis(self) -> list[JobState]:
        assert self.queue is not None
        out = []
        for item in self.queue.jobs():
            result = item["result"] or {}
            since = parse_iso(result.get("timings", {}).get("finished_at")) or item["queued_at"]
            out.append(JobState(item["id"], item["state"], str(item["job"].get("prompt", "")), since, "",
                                (result.get("error") or {}).get("message")))
        order = {RUNNING: 0, PENDING: 1}
        out.sort(key=lambda j: (order.get(j.state, 2), j.since, j.id))
        return out

    def _unfinished(self) -> Iterator[tuple[str, float, Entry, bool]]:
        """``(path, mtime, entry, claimed)`` for each entry of each job file not
        finished yet. The inbox is read first, then the daemons' work folders,
        listed only then: the order files move in, so a file claimed while we
        look is seen twice, not missed (one that a daemon adopts from a dead
        peer's folder meanwhile can still be)."""
        # Init images are not decoded to list jobs (a 4096x4096 PNG takes 0.2 s): a
        # truncated one shows as pending here, and fails when the daemon reads it.
        rules = dataclasses.replace(self.rules, image_pixels=False)
        for path, mtime, entries in _job_files(self.inbox, rules):
            for entry in entries:
                yield path, mtime, entry, False
        for folder in self.spool.work_folders():
            for path, mtime, entries in _job_files(folder, rules):
                for entry in entries:
                    yield path, mtime, entry, True

    def show(self, job_id: str) -> dict[str, Any] | None:
        """The result JSON, or for a job not finished yet its state and parameters."""
        result = self.result(job_id)
        if result is not None:
            return result
        if self.queue is not None:
            return self._show_on_redis(job_id)
        self._check_inbox()
        found: tuple[str, Entry] | None = None
        for path, _, entry, in_work in self._unfinished():
            if entry.id == job_id and (found is None or in_work):
                found = (path, entry)
                if in_work:
                    break  # the claimed file, not a same-named one queued behind it
        if found is None:
            return None
        path, entry = found
        state = self.status(job_id)
        out: dict[str, Any] = {"id": job_id, "status": state.state if state else PENDING, "file": str(path)}
        if isinstance(entry, Job):
            out["params"] = entry.params()
            out["metadata"] = entry.metadata
        else:
            out["error"] = entry.error.to_dict()
        return out


    def _show_on_redis(self, job_id: str) -> dict[str, Any] | None:
        assert self.queue is not None
        found = self.queue.document(job_id)
        if found is None:
            return None
        out: dict[str, Any] = {"id": job_id, "status": found["state"]}
        try:
            job = build_job(job_id, found["job"], self.rules)
        except JobError as err:
            out["error"] = err.to_dict()
            return out
        out["params"] = job.params()
        out["metadata"] = job.metadata
        return out


def no_such_job(job_id: str) -> str:
    """What every command says of an id that is neither queued, running nor finished."""
    return f"no job {job_id} in the inbox, the work folders or the outbox"


def validate_file(path: str | os.PathLike[str], rules: Rules, name: str | None = None) -> list[Entry]:
    """The entries a job file would yield, checked exactly as the daemon checks them.
    ``name`` is the name ids come from, when the file has been archived under another."""
    own = os.path.basename(path)
    try:
        data = read_bytes(path, rules.read_cap)
    except FileNotFoundError:
        return []  # claimed or removed while we looked
    except SbrenderError as err:
        return [BadJob(ids.stem(own), err if isinstance(err, JobError) else JobError(str(err)), 0, own)]
    return parse_job_bytes(name or own, data, rules)


def _rendering(current: Mapping[str, Any]) -> list[str]:
    """The ids a daemon's status says it renders: its job, or all of its batch."""
    return [str(i) for i in current.get("batch") or [current.get("job")]]


def _publish_new(folder: Path, name: str, data: bytes) -> None:
    """Put a complete, synced file under ``name``, never over an existing one: two
    submits of one id (a double click) cannot replace each other's job."""
    temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    write_synced(temp, data)
    try:
        rename_noreplace(temp, folder / name)
    except FileExistsError:
        os.unlink(temp)
        raise JobError(f"job id {ids.stem(name)} is already in use", hint="choose another id") from None
    fsync_dir(folder)


def _scandir(folder: Path, suffix: str) -> Iterator[Path]:
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(suffix) and not entry.name.startswith("."):
                    yield Path(entry.path)
    except FileNotFoundError:
        return


def _job_files(folder: Path, rules: Rules) -> Iterator[tuple[str, float, list[Entry]]]:
    """``(path, mtime, entries)`` of each job file in ``folder``, by name. Plain
    strings, not Paths: at 10,000 queued files, objects per file add up."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if not ids.is_job_file_name(name):
            continue
        path = os.path.join(folder, name)
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        yield path, mtime, validate_file(path, rules)

