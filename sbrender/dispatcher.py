"""The dispatcher: take entries from the broker, render them, hand the results
to the writer thread, and tell the broker what was published.

It knows no files and no signals. The render runs in the calling thread
(compiled graphs are per thread); while it runs, a housekeeper thread does
what cannot wait for the render's end: it publishes cancelled results for
queued jobs, looks at new work, and raises ``interrupt`` when a job of the
render in progress is cancelled. The denoising-step callback only reads the
stop and interrupt events and records progress. One lock keeps the two
threads apart: the render thread releases it only for the renderer's call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from . import results
from .broker import Broker, Take
from .errors import DuplicateJobError, JobCancelled, RenderError, SbrenderError, ShutdownRequested
from .jobs import SEED_MAX, BadJob, Entry, Job
from .models import infotext_name
from .outputs import image_names, infotext
from .renderer import Renderer, RenderOutput, call_key
from .writer import Writer

log = structlog.get_logger("sbrender")

CANCEL_CHECK_S = 0.25  # how often, during a render, cancel requests and new files are looked at

# (job ids of the render, step, steps): called at the start of a render (step 0) and after each step.
Progress = Callable[[list[str], int, int], None]


@dataclasses.dataclass
class Slot:
    """One taken entry on its way from the broker to a published result."""

    take: Take
    entry: Entry  # the taken entry, or a BadJob standing in for it (a duplicate id)
    result_id: str
    input_rec: dict[str, Any]
    picked: float  # time.time() when taken
    started: float
    seed: int = 0
    sync: tuple[Path, ...] = ()  # folders to fsync before its result is published (the reservation's)

    @property
    def job(self) -> Job:
        assert isinstance(self.entry, Job)
        return self.entry

    @property
    def queued(self) -> float:
        return self.take.delivery.queued_at


class Dispatcher:
    def __init__(self, broker: Broker, renderer: Renderer, *, outbox: Path, wake: threading.Event,
                 stop: threading.Event, batch_size: int, max_crashes: int, description: dict[str, Any],
                 model_load_s: float, progress: Progress,
                 finished: Callable[[Slot, dict[str, Any]], None]) -> None:
        self.broker = broker
        self.renderer = renderer
        self.batch_key = getattr(renderer, "batch_key", call_key)  # a renderer that says nothing: the usual key
        self.writer: Writer[Slot] = Writer(outbox, wake)
        self.stop = stop
        self.batch_size = batch_size
        self.max_crashes = max_crashes
        self.description = description
        self.model_load_s = model_load_s
        self.progress = progress
        self.finished = finished
        self.lock = threading.Lock()
        self.interrupt = threading.Event()  # a job of the render in progress was cancelled
        self._running: frozenset[str] = frozenset()  # ids in the renderer's call; empty between calls
        self._step = (0, 0)  # the call's last step, and its steps: recorded by the step callback
        self._rendering = threading.Event()
        self._closed = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeep, name="sbrender-housekeeper", daemon=True)
        self._housekeeper.start()

    # --- the loop's work -------------------------------------------------------------------

    def turn(self) -> bool:
        """Collect what the writer published, then settle queued jobs someone
        cancelled, or take and render the next entries. False when there was
        nothing to take."""
        with self.lock:
            self._collect()
            self.broker.refresh()
            cancelled = self.broker.cancelled()
            if cancelled and (takes := self.broker.take_cancelled(cancelled)):
                self._settle_cancelled(takes)
                return True
            takes = self.broker.take(self.batch_size, self.batch_key)
            if not takes:
                self.broker.rendering([])  # nothing renders now (a job's mark stays until here)
                return False
            slots = self._prepare(takes, cancelled)
            if slots:
                self._render(slots)
            return True

    def writing(self) -> bool:
        return self.writer.busy()

    def finish(self) -> None:
        """Publish everything handed to the writer and report it to the broker."""
        with self.lock:
            self._drain()

    def close(self) -> None:
        self._closed.set()
        self._rendering.set()  # wakes the housekeeper, which then sees the close
        self._housekeeper.join()
        self.finish()
        self.writer.stop()

    # --- taking ----------------------------------------------------------------------------

    def _prepare(self, takes: list[Take], cancelled: set[str]) -> list[Slot]:
        """Reserve each entry's result id; publish at once what needs no render
        (bad, doomed, cancelled, a duplicate id). The rest, to render."""
        picked = time.time()
        slots = []
        for take in takes:
            with structlog.contextvars.bound_contextvars(job_id=take.entry.id):
                slot = self._slot(take, picked)
                if slot is None:
                    continue
                refusal = self._refusal(slot, cancelled)
                if refusal is None:
                    slots.append(slot)
                else:
                    self._fail(slot, refusal)
        return slots

    def _slot(self, take: Take, picked: float) -> Slot | None:
        """Where the entry's result goes; None when this very delivery published it
        before a restart (then it only counts towards finishing the delivery)."""
        delivery, entry = take.delivery, take.entry
        reservation = self.broker.reserve(take)
        if reservation.result_id is None:
            self.broker.done(take, reservation.prior_status == results.SUCCEEDED)
            return None
        if reservation.held_by is not None:
            error = DuplicateJobError(f"job id {entry.id} is already used by {reservation.held_by}; "
                                      "ids are never reused", hint="submit it again under a new id (rename the file)")
            entry = BadJob(entry.id, error, entry.priority, delivery.source)
        input_rec = results.input_record(delivery.source, delivery.data, delivery.token, take.index,
                                         len(delivery.entries))
        return Slot(take, entry, reservation.result_id, input_rec, picked, time.time(),
                    sync=reservation.sync_before_publish)

    def _refusal(self, slot: Slot, cancelled: set[str]) -> SbrenderError | None:
        entry = slot.entry
        if isinstance(entry, BadJob):
            return entry.error
        crashes = slot.take.delivery.crashes.get(entry.id, 0)
        if crashes >= self.max_crashes:
            return RenderError(f"a daemon died {crashes} times while rendering this job; not trying again",
                               hint="check the daemon's log for the crash; `sbrender retry ID` re-queues it")
        if entry.id in cancelled:
            return JobCancelled("cancelled before it started")
        return None

    def _settle_cancelled(self, takes: list[Take]) -> None:
        """Queued jobs someone cancelled, taken out of turn: their cancelled result now."""
        picked = time.time()
        for take in takes:
            slot = self._slot(take, picked)
            if slot is not None:
                self._fail(slot, JobCancelled("cancelled before it started"))

    # --- rendering ---------------------------------------------------------------------------

    def _render(self, slots: list[Slot]) -> None:
        for slot in slots:
            job = slot.job
            slot.seed = job.seed if job.seed is not None else _random_seed(slot.take.delivery.token, job)
        items = [(slot.job, [slot.seed + k for k in range(slot.job.count)]) for slot in slots]
        ids = [slot.entry.id for slot in slots]
        self.progress(ids, 0, items[0][0].steps)
        try:
            with structlog.contextvars.bound_contextvars(job_id=ids[0] if len(ids) == 1 else ids):
                outs = self._call(items, ids)
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
        batch = {"jobs": ids, "images": sum(len(seeds) for _, seeds in items)} if len(ids) > 1 else None
        for slot, out in zip(slots, outs):
            if isinstance(out, SbrenderError):
                self._fail(slot, out)
                continue
            try:
                self._succeed(slot, out, batch)
            except Exception as err:  # noqa: BLE001 - a malformed output fails its job, not the daemon
                log.exception("unexpected render output", job_id=slot.entry.id)
                self._fail(slot, RenderError(f"unexpected render output: {type(err).__name__}: {err}",
                                             hint="this is a bug in sbrender or a library; please report it"))

    def _call(self, items: list[tuple[Job, list[int]]], ids: list[str]) -> list[Any]:
        """The renderer's call, with the lock released for the housekeeper."""

        def on_step(step: int, steps: int) -> bool:
            self._step = (step, steps)
            self.progress(ids, step, steps)
            return self.stop.is_set() or self.interrupt.is_set()

        self.interrupt.clear()
        self._step = (0, items[0][0].steps)
        self._running = frozenset(ids)
        self.broker.rendering(ids)
        self._rendering.set()
        self.lock.release()
        try:
            if len(items) == 1:
                return [self.renderer.render(*items[0], on_step=on_step)]
            return self.renderer.render_batch(items, on_step=on_step)
        finally:
            self.lock.acquire()
            self._rendering.clear()
            self._running = frozenset()

    def _one_by_one(self, slots: list[Slot], err: SbrenderError) -> bool:
        """After a batch failed: render each job alone, so that one job's trouble
        (or a batch too big for the GPU) does not fail its neighbours. False for a
        single job: its failure is its own."""
        if len(slots) == 1:
            return False
        log.warning("batch failed; rendering its jobs one by one", jobs=[s.entry.id for s in slots], error=str(err))
        for k, slot in enumerate(slots):
            if self.stop.is_set():
                self._interrupted(slots[k:])
                break
            self._render([slot])
        return True

    def _interrupted(self, slots: list[Slot]) -> None:
        """A render stopped between steps: cancelled jobs get their result; the rest
        go back to the broker when the daemon stops, or render again without the
        cancelled ones."""
        cancelled = self.broker.cancelled()
        rest = []
        for slot in slots:
            if slot.entry.id in cancelled:
                self._fail(slot, JobCancelled("cancelled while rendering"))
            else:
                rest.append(slot)
        if not rest:
            return
        if not self.stop.is_set():
            self._render(rest)
            return
        self._drain()  # what the file held that was published is accounted for first
        self.broker.give_back([slot.take for slot in rest])

    # --- while a render runs -------------------------------------------------------------------

    def _housekeep(self) -> None:
        while True:
            self._rendering.wait()
            if self._closed.wait(CANCEL_CHECK_S):
                return
            with self.lock:
                if self._closed.is_set():
                    return
                if not self._rendering.is_set():
                    continue  # the render ended meanwhile
                try:
                    self._between_steps()
                except Exception:  # noqa: BLE001 - housekeeping must never fail the render
                    log.exception("error while looking at the queue during a render; the render goes on")

    def _between_steps(self) -> None:
        """Jobs cancelled while waiting get their result now, not after this render;
        a cancelled job of this render stops it at its next step."""
        self._collect()
        self.broker.refresh()
        self.broker.progress(sorted(self._running), *self._step)
        cancelled = self.broker.cancelled()
        if cancelled & self._running:
            self.interrupt.set()
        waiting = cancelled - self._running
        if waiting and (takes := self.broker.take_cancelled(waiting)):
            self._settle_cancelled(takes)

    # --- publishing ----------------------------------------------------------------------------

    def _succeed(self, slot: Slot, out: RenderOutput, batch: dict[str, Any] | None) -> None:
        job = dataclasses.replace(slot.job, seed=slot.seed)
        params = job.params()
        # The job's own model (several may be warm); a renderer that does not say: the one it described.
        model = out.model or self.description.get("model", {})
        model_name, model_hash = infotext_name(model), model.get("hash", "")
        record = json.dumps({"id": job.id, **params, "model": model_name,
                             **({"model_hash": model_hash} if model_hash else {}), "metadata": job.metadata})
        resources = {**out.prompt, **({"vae": model["vae"]} if model.get("vae") else {})}
        images = tuple(
            results.ImageToWrite(name, image, seed, {"parameters": infotext(params, seed, model_name, model_hash,
                                                                            resources), "sbrender": record})
            for name, image, seed in zip(image_names(job.id, len(out.images)), out.images, out.seeds))
        renderer = {**self.description, "model": model} if out.model else self.description
        result = results.succeeded(job, input=slot.input_rec, images=[], sampler=out.scheduler,
                                   renderer=renderer, times={}, warnings=out.warnings)
        if out.prompt:
            result["prompt"] = out.prompt
        if batch is not None:
            result["batch"] = batch
        parts = {"load_s": slot.started - slot.picked + out.timings.get("prepare_s", 0.0),
                 "inference_s": out.timings.get("inference_s", 0.0), "write_s": 0.0,
                 "model_load_s": self.model_load_s}
        self._publish(results.Draft(slot.result_id, result, slot.queued, slot.started, parts, images,
                                    failure_params=slot.job.params()), slot)

    def _fail(self, slot: Slot, error: SbrenderError) -> None:
        renderer = self.description
        if isinstance(slot.entry, Job) and slot.entry.model:  # not the configured model: say which it asked for
            renderer = {**renderer, "model": {"name": slot.entry.model}}
        result = results.failed(slot.entry, error, input=slot.input_rec, renderer=renderer, times={},
                                job_id=slot.result_id)
        self._publish(results.Draft(slot.result_id, result, slot.queued, slot.started), slot)

    def _publish(self, draft: results.Draft, slot: Slot) -> None:
        """To the writer, unless the broker no longer holds the entry for this
        daemon (another took it over): then nothing of it is written here."""
        if self.broker.may_publish(slot.take):
            self.writer.put(draft, slot, slot.sync)
        else:
            log.warning("job taken over by another daemon; its result is not published here",
                        job_id=slot.entry.id)

    def _collect(self) -> None:
        """Report what the writer published to the broker (and the service)."""
        for report in self.writer.completed():
            slot = report.tag
            if report.result is None:
                # No result could be published: the delivery stays held, accounted for
                # by no one, and is tried again at the next start.
                self.broker.unpublishable(slot.take)
                continue
            self.finished(slot, report.result)
            self.broker.done(slot.take, report.result["status"] == results.SUCCEEDED, report.result)

    def _drain(self) -> None:
        self.writer.drain()
        self._collect()


def _random_seed(token: str, job: Job) -> int:
    """A seed for a job that gave none: random across documents, but the same when
    this very one is rendered again after a crash, so the re-run publishes the
    same images."""
    digest = hashlib.sha256(f"{token}:{job.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX - job.count + 2)
