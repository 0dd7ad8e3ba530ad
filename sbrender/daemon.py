"""The daemon loop: watch, pick, claim, render, publish, archive.

Start-up order matters: load the model (a bad model stops the start), recover
files left claimed by a previous run, start the observer, *then* scan the
inbox (watch-then-list, so no file is missed; the queue removes duplicates).
Signals only set a flag; a render in progress stops at its next denoising step
and its file goes back to the inbox to be rendered again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from . import results
from .config import Settings
from .errors import (DuplicateJobError, JobCancelled, RenderError, SbrenderError, ShutdownRequested,
                     SpoolError)
from .jobs import SEED_MAX, BadJob, Entry, Job, Rules
from .models import infotext_name
from .outputs import encode_png, infotext, publish_images, read_json, write_json
from .queue import Candidate, JobQueue, Pick
from .renderer import Renderer
from . import peers
from .spool import FileInfo, Spool
from .notify import Notifier
from .status import StatusFile
from .watcher import InboxWatcher

log = structlog.get_logger("sbrender")

CANCEL_CHECK_S = 0.25  # how often a render looks for cancel requests
LOAD_EXTEND_S = 30.0  # each heartbeat during the model load extends systemd's start timeout by this


class Daemon:
    """One renderer, one spool, one loop."""

    def __init__(self, settings: Settings, renderer: Renderer) -> None:
        self.settings = settings
        self.renderer = renderer
        self.spool = Spool(settings.inbox, settings.outbox, settings.state)
        self.rules = Rules.from_settings(settings)
        self.wake = threading.Event()
        self.should_exit = threading.Event()
        self.ready = threading.Event()  # set once the model is loaded and the first scan is done
        self.notifier = Notifier()
        self.metrics = _metrics(settings, self.spool.owner)
        self.watcher = InboxWatcher(settings.inbox, settings["watch.mode"], self.wake)
        self.queue = JobQueue(self.spool, self.rules, settings["watch.settle_seconds"], self.watcher.hint)
        self.counts = {results.SUCCEEDED: 0, results.FAILED: 0, results.CANCELLED: 0}
        self.description: dict[str, Any] = {}
        self.model_load_s = 0.0
        self.status = StatusFile(self.spool.daemons, self.spool.owner, model=settings.model,
                                 started_at=results.iso(time.time()))
        self._signals = 0
        self._stop_signal: int | None = None
        self._stop_noted = False
        self._cancels_checked = 0.0
        self._temps_cleaned = False
        self._next_scan = 0.0
        self._identity: dict[Any, tuple[int, int]] = {}
        self._problems: list[str] = []

    # --- life cycle ------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Serve until stopped (or, with ``once``, until the inbox is empty). Returns
        the exit status; raises ``SbrenderError`` when it cannot start."""
        with self._signal_handlers():
            self.spool.prepare()
            self._set_status("loading", force=True)
            self.status.start_heartbeat(self.should_exit, on_beat=self._on_beat)
            log.info("loading model", model=self.settings.model, device=self.settings["device"])
            self.model_load_s = self.renderer.load()
            self.description = self.renderer.describe()
            log.info("model loaded", seconds=round(self.model_load_s, 3), **_flat(self.description))
            if self.metrics:
                self.metrics.loaded(self.model_load_s, self.spool.owner, self.description)
            self._identity = self.spool.identity()
            self._recover()
            self.watcher.start()
            self.queue.full_scan()
            log.info("ready", inbox=str(self.spool.inbox), outbox=str(self.spool.outbox),
                     watch=self.watcher.strategy, queued=len(self.queue))
            self.ready.set()
            self.status.update("idle", force=True, current=None, device=self.description.get("device"),
                               queued=len(self.queue), **self.counts)
            self.notifier.ready(self.status.text())
            try:
                self._loop(once)
            finally:
                self.should_exit.set()
                self._note_stop()
                self.watcher.stop()
                self._set_status("stopped", force=True)
                self.spool.forget_owner(self.spool.owner)  # only if nothing is left claimed
                if self.metrics:
                    self.metrics.remove()
                log.info("stopped", **self.counts)
        return 0

    def _recover(self) -> None:
        """Take over files claimed by daemons that are gone (a crash, a kill, a
        power cut). The job a dead daemon was rendering gets a crash counted;
        one that was being rendered at ``limits.max_crashes`` deaths fails
        instead of taking the next daemon down too."""
        owners: dict[str, str | None] = {}
        for owner, info in list(self.spool.orphans()):
            if owner not in owners:
                status = peers.read_status(self.spool.daemons / f"{owner}.json") or {}
                rendering = status.get("state") == "rendering"
                owners[owner] = (status.get("current") or {}).get("job") if rendering else None
            path = self.spool.adopt(info)
            adopted = FileInfo.of(path) if path is not None else None
            if adopted is None:
                continue  # a peer was quicker
            cand = self.queue.add_claimed(adopted)
            culprit = next((e for e in cand.entries if e.id == owners[owner]), None)
            crashes = self.spool.count_attempt(adopted.claim_token, culprit.id) if culprit else 0
            log.warning("recovered a file claimed by a daemon that is gone", file=info.name,
                        previous_owner=owner or "unknown", rendering=owners[owner], crashes=crashes)
            if culprit is not None and crashes >= self.settings["limits.max_crashes"]:
                error = RenderError(f"a daemon died {crashes} times while rendering this job; not trying again",
                                    hint="check the daemon's log for the crash; `sbrender retry ID` re-queues it")
                cand.doomed[culprit.id] = error  # fails with its params and metadata, retryable
        # Temp files are listed (outbox and all) only at start and when a peer
        # was found gone, not at every rescan.
        if owners or not self._temps_cleaned:
            self._temps_cleaned = True
            for path in self.spool.remove_stale_temps():
                log.info("removed stale temp file", file=str(path))
        for owner in owners.keys() - {""}:
            self.spool.forget_owner(owner)

    def _loop(self, once: bool) -> None:
        rescan_s = self.settings["watch.rescan_seconds"]
        self._next_scan = time.monotonic() + rescan_s
        while not self.should_exit.is_set():
            self.wake.clear()
            if not self._folders_ok():
                if once:
                    raise SpoolError("the spool folders changed under the daemon: " + "; ".join(self._problems))
                self.wake.wait(rescan_s)
                continue
            if not self.watcher.alive():
                log.error("watcher thread died; restarting it and rescanning")
                self.watcher.restart()
                self._next_scan = 0.0
            self.notifier.watchdog()  # the loop turns and the watcher lives
            self._look_at_inbox()
            pick = self._cancelled_pick() or self.queue.pop()
            if pick is not None:
                self._process(pick)
                continue
            if once and not self.queue.waiting:
                return
            self._set_status("idle")
            timeout = self._next_scan - time.monotonic()
            if self.queue.waiting:
                timeout = min(timeout, 0.1)
            self.wake.wait(max(timeout, 0.0))

    def _look_at_inbox(self) -> None:
        """Learn what changed: the names events reported, or everything when the
        periodic rescan is due (events are hints and can be lost)."""
        now = time.monotonic()
        if now >= self._next_scan:
            self._recover()
            self.queue.full_scan()
            self._next_scan = now + self.settings["watch.rescan_seconds"]
            if self.metrics:
                self.metrics.write(len(self.queue))
        else:
            self.queue.refresh(self.watcher.drain())

    def _cancelled_pick(self, running: str | None = None) -> Pick | None:
        """A queued job someone cancelled: it is taken out of turn, to publish its
        cancelled result at once. Requests for ids this daemon does not hold stay
        for a peer, or for a file not seen yet."""
        for job_id in self.spool.cancel_requests():
            if job_id == running:
                continue
            if self.spool.result_path(job_id).exists():
                self.spool.clear_cancel(job_id)
            elif (pick := self.queue.find(job_id)) is not None:
                return pick
        return None

    def _folders_ok(self) -> bool:
        """False while a spool folder is missing or replaced: then nothing is read,
        claimed or written, rather than taking an empty mount point for an empty
        queue. Rendering resumes when the same folders are back."""
        problems = self.spool.identity_problems(self._identity)
        if problems != self._problems:
            if problems:
                log.error("spool folder missing or replaced; paused until it is back", problems=problems)
                self._set_status("paused", force=True, problems=problems)
            else:
                log.info("spool folders are back; resuming")
                self.watcher.restart()
                self.queue.full_scan()
        self._problems = problems
        return not problems

    def stop(self) -> None:
        self.should_exit.set()
        self.wake.set()

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Flags only: the handler runs in the main thread between any two bytecodes,
        # maybe inside a status write that holds a lock it would wait on forever.
        self._signals += 1
        if self._signals > 1:
            # A second signal means now: a claimed file is recovered at the next start.
            os._exit(128 + signum)
        self._stop_signal = signum
        self.stop()

    def _note_stop(self) -> None:
        """Say, once, that a stop was asked for (from the loop or a step, not the handler)."""
        if self._stop_noted or not self.should_exit.is_set():
            return
        self._stop_noted = True
        if self._stop_signal is not None:
            log.info("stopping", signal=signal.Signals(self._stop_signal).name)
        self.notifier.stopping()
        self._set_status("stopping", force=True)

    # --- one job ---------------------------------------------------------------------

    def _process(self, pick: Pick) -> None:
        cand, entry = pick.candidate, pick.entry
        picked = time.time()
        if not cand.claimed:
            try:
                path = self.spool.claim(cand.name)
            except SpoolError as err:
                log.warning("cannot claim file yet", file=cand.name, reason=str(err))
                return
            info = FileInfo.of(path) if path is not None else None
            if info is None:
                self.queue.drop(cand)  # taken away before we got to it
                return
            if not self.queue.reload_claimed(cand, info):
                log.info("file changed before it was claimed; read again", file=cand.name)
                return
        with structlog.contextvars.bound_contextvars(job_id=entry.id):
            try:
                ok = self._run_entry(cand, entry, picked)
            except ShutdownRequested:
                self.spool.unclaim(cand.path)
                self.queue.drop(cand)
                log.info("render interrupted; file returned to the inbox", file=cand.name)
                return
        if ok is None:
            # No result could be published: the file stays claimed in the work
            # folder, unaccounted for by no one, and is retried at the next start.
            self.queue.drop(cand)
            return
        if self.queue.finish(cand, entry, ok):
            self.spool.clear_attempts(cand.info.claim_token)
            archived = self.spool.archive(cand.path, ok=not cand.any_failed)
            self.queue.drop(cand)
            log.debug("input archived", file=str(archived))
        if self.metrics:
            self.metrics.write(len(self.queue))

    def _run_entry(self, cand: Candidate, entry: Entry, picked: float) -> bool | None:
        """Render or fail one entry and publish its result. True or False: the
        result is published; None: it could not be."""
        index = next(i for i, e in enumerate(cand.entries) if e is entry)
        input_rec = results.input_record(cand.name, cand.data, cand.info.claim_token, index, len(cand.entries))
        result_id, entry, prior = self._result_id(cand, entry)
        if result_id is None:
            # Published by an earlier run of this very file (a restart after a crash).
            return prior == results.SUCCEEDED
        started = time.time()
        queued = cand.info.mtime_ns / 1e9
        try:
            if isinstance(entry, BadJob):
                raise entry.error
            if entry.id in cand.doomed:
                raise cand.doomed[entry.id]
            if self.spool.is_cancelled(entry.id):
                raise JobCancelled("cancelled before it started")
            result = self._render(entry, input_rec, queued, picked, started)
        except ShutdownRequested:
            if not self.spool.is_cancelled(entry.id):
                raise
            result = self._failure(entry, JobCancelled("cancelled while rendering"), input_rec, queued, started,
                                   result_id)
        except SbrenderError as err:
            result = self._failure(entry, err, input_rec, queued, started, result_id)
        except Exception as err:  # noqa: BLE001 - a bug must fail one job, not the daemon
            log.exception("unexpected error while rendering")
            error = RenderError(f"unexpected {type(err).__name__}: {err}",
                                hint="this is a bug in sbrender or a library; please report it")
            result = self._failure(entry, error, input_rec, queued, started, result_id)
        try:
            write_json(self.spool.outbox, f"{result_id}.json", result)
        except SpoolError as err:
            log.error("cannot publish result; the job file stays in the work folder", error=str(err))
            return None
        ok = result["status"] == results.SUCCEEDED
        self.spool.clear_cancel(entry.id)
        self.counts[result["status"]] += 1
        if self.metrics:
            self.metrics.finished(result)
        t = result["timings"]
        error = {"error": result["error"]["message"]} if "error" in result else {}
        log.info("job finished", status=result["status"], file=cand.name, images=len(result["images"]),
                 **error, **{k: v for k, v in t.items() if k.endswith("_s")})
        return ok

    def _result_id(self, cand: Candidate, entry: Entry) -> tuple[str | None, Entry, str | None]:
        """Where this entry's result goes: its own id, or, when that id already has
        a result from another file, a failure under ``<id>.dupN``. None when this
        file's own result is already there; then the last item is its status."""
        token = cand.info.claim_token
        existing = read_json(self.spool.result_path(entry.id))
        if existing is not None and existing.get("input", {}).get("claim") == token:
            return None, entry, existing.get("status")
        if existing is None and self.spool.reserve(entry.id, token):
            return entry.id, entry, None
        n = 1
        while True:
            dup_id = f"{entry.id}.dup{n}"
            other = read_json(self.spool.result_path(dup_id))
            if other is not None and other.get("input", {}).get("claim") == token:
                return None, entry, other.get("status")
            if other is None and self.spool.reserve(dup_id, token):
                break
            n += 1
        holder = (existing or {}).get("input", {}).get("file", "another job file")
        error = DuplicateJobError(f"job id {entry.id} is already used by {holder}; ids are never reused",
                                  hint="submit it again under a new id (rename the file)")
        return dup_id, BadJob(entry.id, error, entry.priority, cand.name), None

    def _render(self, job: Job, input_rec: dict[str, Any], queued: float, picked: float,
                started: float) -> dict[str, Any]:
        base = job.seed if job.seed is not None else _random_seed(input_rec["claim"], job)
        seeds = [base + k for k in range(job.count)]
        self._set_status("rendering", job=job.id, step=0, steps=job.steps, force=True)
        out = self.renderer.render(job, seeds, on_step=lambda i, n: self._on_step(job.id, i, n))
        write_start = time.perf_counter()
        params = {**job.params(), "seed": base}
        model = self.description.get("model", {})
        model_name = model.get("name", "")
        record = json.dumps({"id": job.id, **params, "model": model_name, "metadata": job.metadata})
        pngs = []
        for image, seed in zip(out.images, out.seeds):
            text = {"parameters": infotext(params, seed, infotext_name(model), model.get("hash", "")),
                    "sbrender": record}
            pngs.append((encode_png(image, text), seed, image.width, image.height))
        images = [p.to_dict() for p in publish_images(self.spool.outbox, job.id, pngs)]
        finished = time.time()
        parts = {"load_s": started - picked + out.timings.get("prepare_s", 0.0),
                 "inference_s": out.timings.get("inference_s", 0.0),
                 "write_s": time.perf_counter() - write_start,
                 "model_load_s": self.model_load_s}
        for warning in out.warnings:
            log.warning("image warning", warning=warning)
        return results.succeeded(dataclasses.replace(job, seed=base), warnings=out.warnings, input=input_rec, images=images, sampler=out.scheduler,
                                 renderer=self.description, times=results.timings(queued, started, finished, parts))

    def _failure(self, entry: Entry, err: SbrenderError, input_rec: dict[str, Any], queued: float,
                 started: float, result_id: str) -> dict[str, Any]:
        times = results.timings(queued, started, time.time(), {})
        return results.failed(entry, err, input=input_rec, renderer=self.description, times=times,
                              job_id=result_id)

    # --- status ------------------------------------------------------------------------

    def _on_step(self, job_id: str, step: int, steps: int) -> bool:
        """After each denoising step: report progress; True stops the render (a stop
        request, or the job was cancelled)."""
        self._set_status("rendering", job=job_id, step=step, steps=steps)
        self.notifier.watchdog()  # the render progresses
        self._note_stop()
        now = time.monotonic()
        if now - self._cancels_checked >= CANCEL_CHECK_S:
            # Jobs cancelled while waiting get their result now, not after this render.
            self._cancels_checked = now
            self._look_at_inbox()
            while (pick := self._cancelled_pick(running=job_id)) is not None:
                self._process(pick)
        return self.should_exit.is_set() or self.spool.is_cancelled(job_id)

    def _set_status(self, state: str, *, force: bool = False, **current: Any) -> None:
        if self.status.update(state, force=force, current=current or None, device=self.description.get("device"),
                              queued=len(self.queue), **self.counts):
            self.notifier.status(self.status.text())

    def _on_beat(self, state: str | None) -> None:
        """Heartbeat thread: while the model loads, ask systemd for more start time."""
        if state == "loading":
            self.notifier.extend_timeout(LOAD_EXTEND_S)


def _metrics(settings: Settings, owner: str) -> Any:
    """The metrics writer, or None when ``metrics_dir`` is off."""
    where = settings["metrics_dir"]
    if where.strip().lower() == "off":
        return None
    from .metrics import Metrics

    return Metrics(Path(where) if where else settings.state / "metrics", owner)


def _random_seed(claim: str, job: Job) -> int:
    """A seed for a job that gave none: random across files, but the same when this
    very file is rendered again after a crash, so the re-run publishes the same images."""
    digest = hashlib.sha256(f"{claim}:{job.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX - job.count + 2)


def _flat(description: dict[str, Any]) -> dict[str, Any]:
    model = description.get("model", {})
    return {"model": model.get("name"), "source": model.get("source"), "random_weights": model.get("random_weights"),
            "device": description.get("device"), "dtype": description.get("dtype")}
