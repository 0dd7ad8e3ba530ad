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
from collections.abc import Callable, Iterator
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
from .outputs import PublishedImage, Publication, encode_png, image_names, infotext, read_json
from .queue import Candidate, JobQueue, Pick
from .renderer import Renderer, RenderOutput
from . import peers
from .spool import FileInfo, Spool
from .notify import Notifier
from .status import StatusFile
from .watcher import InboxWatcher
from .writer import Writer

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
        self._cancel_running = False  # a job of the render in progress was cancelled
        self._temps_cleaned = False
        self._next_scan = 0.0
        self._identity: dict[Any, tuple[int, int]] = {}
        self._problems: list[str] = []
        self.writer = Writer(settings.outbox, self.wake)
        self._solo: set[str] = set()  # ids of a batch that was rendering when a daemon died
        self._blocked: dict[str, float] = {}  # names whose claim failed: not before this time

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
                self._finish_writes()
                self.writer.stop()
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
        owners: dict[str, list[str]] = {}
        for owner, info in list(self.spool.orphans()):
            if owner not in owners:
                status = peers.read_status(self.spool.daemons / f"{owner}.json") or {}
                current = status.get("current") or {} if status.get("state") == "rendering" else {}
                owners[owner] = [str(i) for i in current.get("batch") or [current.get("job")] if i]
            path = self.spool.adopt(info)
            adopted = FileInfo.of(path) if path is not None else None
            if adopted is None:
                continue  # a peer was quicker
            cand = self.queue.add_claimed(adopted)
            rendering = owners[owner]
            for culprit in (e for e in cand.entries if e.id in rendering):
                crashes = self.spool.count_attempt(adopted.claim_token, culprit.id)
                if len(rendering) > 1:
                    # Which job of the batch crashed is unknown: each renders alone
                    # from now on, so only the guilty one keeps counting crashes.
                    self._solo.add(culprit.id)
                log.warning("recovered a file claimed by a daemon that is gone", file=info.name,
                            previous_owner=owner or "unknown", rendering=culprit.id, crashes=crashes)
                if crashes >= self.settings["limits.max_crashes"]:
                    error = RenderError(f"a daemon died {crashes} times while rendering this job; not trying again",
                                        hint="check the daemon's log for the crash; `sbrender retry ID` re-queues it")
                    cand.doomed[culprit.id] = error  # fails with its params and metadata, retryable
            if not any(e.id in rendering for e in cand.entries):
                log.warning("recovered a file claimed by a daemon that is gone", file=info.name,
                            previous_owner=owner or "unknown")
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
            self._collect()
            cancelled = self._cancelled_pick()
            if cancelled:
                self._process([cancelled], cancelled=True)
                continue
            picks = self.queue.pop_batch(self.settings["perf.batch_size"], self._batch_key)
            if picks:
                self._process(picks)
                continue
            if self.writer.busy():
                self.wake.wait(0.05)  # results being written: archive their files before idling
                continue
            if once and not self.queue.waiting:
                return
            self._set_status("idle")
            timeout = self._next_scan - time.monotonic()
            if self.queue.waiting:
                timeout = min(timeout, self.queue.look_again_in(0.1))
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

    def _cancelled_pick(self, running: list[str] = []) -> Pick | None:  # noqa: B006 - never changed
        """A queued job someone cancelled: it is taken out of turn, to publish its
        cancelled result at once. Requests for ids this daemon does not hold stay
        for a peer, or for a file not seen yet."""
        for job_id in self.spool.cancel_requests():
            if job_id in running:
                continue
            if self.spool.result_path(job_id).exists():
                self.spool.clear_cancel(job_id)
            elif (pick := self.queue.find(job_id)) is not None and not self._claim_blocked(pick.candidate.name):
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

    # --- jobs ----------------------------------------------------------------------------

    def _process(self, picks: list[Pick], cancelled: bool = False) -> None:
        """Claim the picked entries' files, settle what needs no render (bad, doomed,
        cancelled, already published), render the rest in one call, and hand the
        results to the writer thread. ``cancelled``: picks taken out of turn because
        they were cancelled, never rendered."""
        picked = time.time()
        slots: list[Slot] = []
        for pick in self._claimed(picks, popped=not cancelled):
            with structlog.contextvars.bound_contextvars(job_id=pick.entry.id):
                slot = self._prepare(pick, picked)
                if slot is None:
                    continue
                refusal = JobCancelled("cancelled before it started") if cancelled else self._refusal(slot)
                if refusal is None:
                    slots.append(slot)
                else:
                    self._publish(slot, self._failure_work(slot, refusal))
        if slots:
            self._render(slots)
        if self.metrics:
            self.metrics.write(len(self.queue))

    def _claimed(self, picks: list[Pick], popped: bool = True) -> list[Pick]:
        """The picks whose files this daemon now holds, unchanged since parsed."""
        out: list[Pick] = []
        for pick in picks:
            cand = pick.candidate
            if not cand.claimed and self._claim_blocked(cand.name):
                if popped:
                    self.queue.defer(pick)
                continue
            if not cand.claimed:
                try:
                    path = self.spool.claim(cand.name)
                except SpoolError as err:
                    # Tried again after the next rescan, not at once: a name that
                    # cannot be claimed (still held in our work folder) must not spin.
                    log.warning("cannot claim file yet", file=cand.name, reason=str(err))
                    self._blocked[cand.name] = time.monotonic() + self.settings["watch.rescan_seconds"]
                    if popped:
                        self.queue.defer(pick)
                    continue
                info = FileInfo.of(path) if path is not None else None
                if info is None:
                    self.queue.drop(cand)  # taken away before we got to it
                    continue
                if not self.queue.reload_claimed(cand, info):
                    log.info("file changed before it was claimed; read again", file=cand.name)
                    continue
            elif self.queue.stale(pick):
                continue  # its file was read again after a claim in this batch
            out.append(pick)
        return out

    def _prepare(self, pick: Pick, picked: float) -> Slot | None:
        """Where the entry's result goes; None when this very file published it
        before a restart (then it only counts towards archiving the file)."""
        cand, entry = pick.candidate, pick.entry
        index = next(i for i, e in enumerate(cand.entries) if e is entry)
        input_rec = results.input_record(cand.name, cand.data, cand.info.claim_token, index, len(cand.entries))
        result_id, entry, prior = self._result_id(cand, entry)
        self.queue.dispatch(cand, pick.entry)
        if result_id is None:
            self._settle(cand, prior == results.SUCCEEDED)
            return None
        return Slot(cand, entry, input_rec, result_id, picked, time.time())

    def _refusal(self, slot: Slot) -> SbrenderError | None:
        entry = slot.entry
        if isinstance(entry, BadJob):
            return entry.error
        if entry.id in slot.cand.doomed:
            error = slot.cand.doomed[entry.id]
            return error if isinstance(error, SbrenderError) else RenderError(str(error))
        if self.spool.is_cancelled(entry.id):
            return JobCancelled("cancelled before it started")
        return None

    def _render(self, slots: list[Slot]) -> None:
        jobs = [slot.job for slot in slots]
        for slot, job in zip(slots, jobs):
            slot.seed = job.seed if job.seed is not None else _random_seed(slot.input_rec["claim"], job)
        items = [(job, [slot.seed + k for k in range(job.count)]) for slot, job in zip(slots, jobs)]
        ids = [job.id for job in jobs]
        batch = {"batch": ids} if len(ids) > 1 else {}
        self._set_status("rendering", job=ids[0], step=0, steps=jobs[0].steps, force=True, **batch)
        on_step = lambda i, n: self._on_step(ids, i, n)  # noqa: E731
        try:
            with structlog.contextvars.bound_contextvars(job_id=ids[0] if len(ids) == 1 else ids):
                if len(items) == 1:
                    outs: list[Any] = [self.renderer.render(*items[0], on_step=on_step)]
                else:
                    outs = self.renderer.render_batch(items, on_step=on_step)
        except ShutdownRequested:
            self._interrupted(slots)
            return
        except SbrenderError as err:
            if self._one_by_one(slots, err):
                return
            outs = [err] * len(slots)
        except Exception as err:  # noqa: BLE001 - a bug must fail these jobs, not the daemon
            log.exception("unexpected error while rendering")
            error = RenderError(f"unexpected {type(err).__name__}: {err}",
                                hint="this is a bug in sbrender or a library; please report it")
            if self._one_by_one(slots, error):
                return
            outs = [error] * len(slots)
        info = {"jobs": ids, "images": sum(len(seeds) for _, seeds in items)} if len(ids) > 1 else None
        for slot, out in zip(slots, outs):
            if isinstance(out, SbrenderError):
                self._publish(slot, self._failure_work(slot, out))
            else:
                self._publish(slot, self._success_work(slot, out, info))

    def _one_by_one(self, slots: list[Slot], err: SbrenderError) -> bool:
        """After a batch failed: render each job alone, so that one job's trouble
        (or a batch too big for the GPU) does not fail its neighbours. False for a
        single job: its failure is its own."""
        if len(slots) == 1:
            return False
        log.warning("batch failed; rendering its jobs one by one", jobs=[s.entry.id for s in slots], error=str(err))
        for k, slot in enumerate(slots):
            if self.should_exit.is_set():
                self._interrupted(slots[k:])
                break
            self._render([slot])
        return True

    def _interrupted(self, slots: list[Slot]) -> None:
        """A render stopped between steps: cancelled jobs get their result; the rest
        go back to the inbox when the daemon stops, or render again without the
        cancelled ones."""
        cancelled = [s for s in slots if self.spool.is_cancelled(s.entry.id)]
        for slot in cancelled:
            self._publish(slot, self._failure_work(slot, JobCancelled("cancelled while rendering")))
        rest = [s for s in slots if s not in cancelled]
        if not rest:
            return
        if not self.should_exit.is_set():
            self._render(rest)
            return
        self._finish_writes()
        for cand in {id(s.cand): s.cand for s in rest}.values():
            if not cand.stuck:
                self.spool.unclaim(cand.path)
                self.queue.drop(cand)
                log.info("render interrupted; file returned to the inbox", file=cand.name)

    def _success_work(self, slot: Slot, out: RenderOutput, batch: dict[str, Any] | None) -> Callable[[], Publication]:
        """What the writer does for a rendered job: encode and hash the PNGs; the
        result is built once they are written."""
        job = dataclasses.replace(slot.job, seed=slot.seed)
        model = self.description.get("model", {})
        model_name, model_hash = model.get("name", ""), model.get("hash", "")

        def work() -> Publication:
            try:
                return encode()
            except Exception as err:  # noqa: BLE001 - this job fails, with a result
                log.exception("cannot encode the images", job_id=job.id)
                error = RenderError(f"cannot encode the images: {type(err).__name__}: {err}")
                return Publication(f"{slot.result_id}.json", [], lambda _: self._failed(slot, error),
                                   lambda e: self._failed(slot, e))

        def encode() -> Publication:
            encode_start = time.perf_counter()
            params = job.params()
            record = json.dumps({"id": job.id, **params, "model": model_name,
                                 **({"model_hash": model_hash} if model_hash else {}), "metadata": job.metadata})
            names = image_names(job.id, len(out.images))
            files, images = [], []
            for name, image, seed in zip(names, out.images, out.seeds):
                text = {"parameters": infotext(params, seed, infotext_name(model), model_hash),
                        "sbrender": record}
                data = encode_png(image, text)
                files.append((name, data))
                images.append(PublishedImage(name, seed, image.width, image.height,
                                             hashlib.sha256(data).hexdigest()).to_dict())
            encode_s = time.perf_counter() - encode_start

            def finish(write_s: float) -> dict[str, Any]:
                parts = {"load_s": slot.started - slot.picked + out.timings.get("prepare_s", 0.0),
                         "inference_s": out.timings.get("inference_s", 0.0),
                         "write_s": encode_s + write_s, "model_load_s": self.model_load_s}
                times = results.timings(slot.queued, slot.started, time.time(), parts)
                result = results.succeeded(job, warnings=out.warnings, input=slot.input_rec, images=images,
                                           sampler=out.scheduler, renderer=self.description, times=times)
                if batch is not None:
                    result["batch"] = batch
                return result

            return Publication(f"{slot.result_id}.json", files, finish, lambda err: self._failed(slot, err))

        return work

    def _failure_work(self, slot: Slot, err: SbrenderError) -> Callable[[], Publication]:
        def work() -> Publication:
            return Publication(f"{slot.result_id}.json", [], lambda _: self._failed(slot, err),
                               lambda e: self._failed(slot, e))

        return work

    def _failed(self, slot: Slot, err: SbrenderError) -> dict[str, Any]:
        times = results.timings(slot.queued, slot.started, time.time(), {})
        return results.failed(slot.entry, err, input=slot.input_rec, renderer=self.description, times=times,
                              job_id=slot.result_id)

    def _publish(self, slot: Slot, work: Callable[[], Publication]) -> None:
        """Hand a result to the writer thread: images first, the JSON last."""
        self.writer.put(work, slot)

    def _collect(self) -> None:
        """Bookkeeping for what the writer published: counts, logs, archiving."""
        for slot, result in self.writer.completed():
            cand = slot.cand
            if result is None:
                # No result could be published: the file stays claimed in the work
                # folder, accounted for by no one, and is tried again at the next start.
                log.error("cannot publish result; the job file stays in the work folder", job_id=slot.entry.id,
                          file=cand.name)
                cand.stuck = True
                self.queue.drop(cand)
                continue
            self.spool.clear_cancel(slot.entry.id)
            self.counts[result["status"]] += 1
            if self.metrics:
                self.metrics.finished(result)
            for warning in result.get("warnings", []):
                log.warning("image warning", job_id=slot.entry.id, warning=warning)
            t = result["timings"]
            error = {"error": result["error"]["message"]} if "error" in result else {}
            log.info("job finished", job_id=slot.entry.id, status=result["status"], file=cand.name,
                     images=len(result["images"]), **error, **{k: v for k, v in t.items() if k.endswith("_s")})
            self._settle(cand, result["status"] == results.SUCCEEDED)

    def _settle(self, cand: Candidate, ok: bool) -> None:
        """One entry of ``cand`` is accounted for; archive the file once all are."""
        if self.queue.finish(cand, ok):
            self.spool.clear_attempts(cand.info.claim_token)
            archived = self.spool.archive(cand.path, ok=not cand.any_failed)
            self.queue.drop(cand)
            log.debug("input archived", file=str(archived))
            if self.metrics:
                self.metrics.write(len(self.queue))

    def _batch_key(self, entry: Entry) -> tuple[Any, ...] | None:
        return None if entry.id in self._solo else _batch_key_of(entry)

    def _claim_blocked(self, name: str) -> bool:
        until = self._blocked.get(name)
        if until is not None and until <= time.monotonic():
            del self._blocked[name]
            return False
        return until is not None

    def _finish_writes(self) -> None:
        self.writer.drain()
        self._collect()

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

    # --- status ------------------------------------------------------------------------

    def _on_step(self, job_ids: list[str], step: int, steps: int) -> bool:
        """After each denoising step: report progress; True stops the render (a stop
        request, or one of its jobs was cancelled)."""
        batch = {"batch": job_ids} if len(job_ids) > 1 else {}
        self._set_status("rendering", job=job_ids[0], step=step, steps=steps, **batch)
        self.notifier.watchdog()  # the render progresses
        self._note_stop()
        try:
            # Bookkeeping between steps must never fail the render it runs inside.
            self._collect()
            now = time.monotonic()
            if now - self._cancels_checked >= CANCEL_CHECK_S or step == 1:
                # Jobs cancelled while waiting get their result now, not after this render.
                self._cancels_checked = now
                self._look_at_inbox()
                while (pick := self._cancelled_pick(running=job_ids)) is not None:
                    self._process([pick], cancelled=True)
                self._cancel_running = any(self.spool.is_cancelled(i) for i in job_ids)
        except Exception:  # noqa: BLE001
            log.exception("error between denoising steps; the render goes on")
        return self.should_exit.is_set() or self._cancel_running

    def _set_status(self, state: str, *, force: bool = False, **current: Any) -> None:
        updated = self.status.update(state, force=force, current=current or None,
                                     device=self.description.get("device"), queued=len(self.queue), **self.counts)
        if updated and self.notifier.enabled:  # at every step: no text made for no one
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


@dataclasses.dataclass
class Slot:
    """One picked entry on its way from claim to published result."""

    cand: Candidate
    entry: Entry
    input_rec: dict[str, Any]
    result_id: str
    picked: float
    started: float
    seed: int = 0

    @property
    def job(self) -> Job:
        assert isinstance(self.entry, Job)
        return self.entry

    @property
    def queued(self) -> float:
        return self.cand.info.mtime_ns / 1e9


def _batch_key_of(entry: Entry) -> tuple[Any, ...] | None:
    """Jobs with equal keys can share one pipeline call."""
    if not isinstance(entry, Job):
        return None
    return (entry.width, entry.height, entry.steps, entry.sampler, entry.guidance_scale)


def _random_seed(claim: str, job: Job) -> int:
    """A seed for a job that gave none: random across files, but the same when this
    very file is rendered again after a crash, so the re-run publishes the same images."""
    digest = hashlib.sha256(f"{claim}:{job.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX - job.count + 2)


def _flat(description: dict[str, Any]) -> dict[str, Any]:
    model = description.get("model", {})
    return {"model": model.get("name"), "source": model.get("source"), "random_weights": model.get("random_weights"),
            "device": description.get("device"), "dtype": description.get("dtype")}
