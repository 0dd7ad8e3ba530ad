"""The service: what keeps a daemon alive and says what it is doing.

It owns the life cycle (prepare, load the model, open the broker, serve, stop),
signals, systemd's notify protocol, the status file with its heartbeat, the
metrics and the job log lines. What renders next is the dispatcher's; where
jobs come from is the broker's (the file spool unless another is given).

Signals only set a flag; a render in progress stops at its next denoising step
and its job goes back to the broker to be rendered again.
"""

from __future__ import annotations

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
from .broker import Broker
from .config import Settings
from .dispatcher import Dispatcher, Slot
from .errors import SpoolError
from .notify import Notifier
from .peers import owner_name
from .renderer import Renderer
from .spool import Spool
from .status import StatusFile, describe

log = structlog.get_logger("sbrender")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOAD_EXTEND_S = 30.0  # each heartbeat during the model load extends systemd's start timeout by this
WRITING_POLL_S = 0.05  # results being written: look again this soon, to archive their inputs


class Service:
    """One renderer, one broker, one loop."""

    def __init__(self, settings: Settings, renderer: Renderer, broker: Broker | None = None) -> None:
        self.settings = settings
        self.renderer = renderer
        self.wake = threading.Event()
        self.should_exit = threading.Event()
        self.ready = threading.Event()  # set once the model is loaded and the first look is done
        self.broker = broker if broker is not None else make_broker(settings, self.wake)
        self.owner = owner_name()
        self.notifier = Notifier()
        self.metrics = _metrics(settings, self.owner)
        self.status = StatusFile(Spool(settings.inbox, settings.outbox, settings.state).status_path(self.owner),
                                 self.owner, mirrors=(getattr(self.broker, "publish_status", None),
                                                      self._tell_systemd),
                                 model=settings.model, started_at=results.iso(time.time()))
        self.counts = {results.SUCCEEDED: 0, results.FAILED: 0, results.CANCELLED: 0}
        self.description: dict[str, Any] = {}
        self.dispatcher: Dispatcher | None = None
        self._signals = 0
        self._stop_signal: int | None = None
        self._stop_noted = False
        self._problems: list[str] = []
        self._metrics_at = 0.0

    # --- life cycle ------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Serve until stopped (or, with ``once``, until nothing is queued). Returns
        the exit status; raises ``SbrenderError`` when it cannot start."""
        with self._signal_handlers():
            self.broker.prepare()
            heartbeat = None
            try:
                self._set_status("loading")
                heartbeat = self.status.start_heartbeat(self.should_exit, on_beat=self._on_beat)
                self._start()
                self._loop(once)
            finally:
                self.should_exit.set()
                self._note_stop()
                if self.dispatcher is not None:
                    self.dispatcher.close()
                if heartbeat is not None:
                    heartbeat.join()  # it writes no more: the status file's last word is ours
                self._set_status("stopped")
                if self.broker.close():
                    self.status.remove()  # nothing left held: no trace for `sbrender status`
                if self.metrics:
                    self.metrics.remove()
                if self.ready.is_set():
                    log.info("stopped", **self.counts)
        return 0

    def _start(self) -> None:
        log.info("loading model", model=self.settings.model, device=self.settings["device"])
        model_load_s = self.renderer.load()
        self.description = self.renderer.describe()
        log.info("model loaded", seconds=round(model_load_s, 3), **_flat(self.description))
        if self.metrics:
            self.metrics.loaded(model_load_s, self.owner, self.description)
        self.dispatcher = Dispatcher(
            self.broker, self.renderer, outbox=self.settings.outbox, wake=self.wake, stop=self.should_exit,
            batch_size=self.settings["perf.batch_size"], max_crashes=self.settings["limits.max_crashes"],
            description=self.description, model_load_s=model_load_s, progress=self._progress,
            finished=self._finished)
        self.broker.open()
        log.info("ready", **self.broker.describe(), queued=self.broker.pending())
        self.ready.set()
        self._set_status("idle")
        self.notifier.ready(self.status.text())

    def _loop(self, once: bool) -> None:
        assert self.dispatcher is not None
        rescan_s = self.settings["watch.rescan_seconds"]
        while not self.should_exit.is_set():
            self.wake.clear()
            self.notifier.watchdog()  # the loop turns
            if self._paused():
                if once:
                    raise SpoolError("the queue cannot be used: " + "; ".join(self._problems))
                self._sleep(rescan_s)
                continue
            worked = self.dispatcher.turn()
            self._write_metrics(force=False)
            if worked:
                continue
            if self.dispatcher.writing():
                self._sleep(WRITING_POLL_S)
                continue
            if once and self.broker.drained():
                return
            self._set_status("idle", lazy=True)
            self._sleep(self.broker.wait_s(rescan_s))

    def _sleep(self, seconds: float) -> None:
        """Wait for a wake-up, but never past the next watchdog ping: systemd must
        hear from an idle daemon well within ``WatchdogSec``."""
        interval = self.notifier.watchdog_interval
        if interval is not None:
            seconds = min(seconds, interval / 2)
        self.wake.wait(max(seconds, 0.0))

    def _paused(self) -> bool:
        """True while the broker cannot be used (a spool folder gone or replaced,
        a queue server unreachable)."""
        problems = self.broker.problems()
        if problems != self._problems:
            if problems:
                log.error("queue unavailable; paused until it is back", problems=problems)
                self._set_status("paused", problems=problems)
            elif self._problems:
                log.info("queue is back; resuming")
        self._problems = problems
        return bool(problems)

    def stop(self) -> None:
        self.should_exit.set()
        self.wake.set()

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the service. The handler takes no lock (it runs
        in the main thread between any two bytecodes, maybe inside an
        ``Event.clear`` that holds the lock ``Event.set`` would wait on forever):
        the signal's wake-up byte reaches a relay thread, which sets the events."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        relay = threading.Thread(target=self._relay_signals, args=(read_fd,), name="sbrender-signals", daemon=True)
        relay.start()
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            os.write(write_fd, b"\0")  # ends the relay
            relay.join()
            os.close(read_fd)
            os.close(write_fd)

    def _relay_signals(self, read_fd: int) -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data or 0 in data:
                return
            stops = [signum for signum in data if signum in STOP_SIGNALS]
            if stops:
                self._stop_signal = self._stop_signal or stops[0]
                self.stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A count only; the relay thread does the rest.
        self._signals += 1
        if self._signals > 1:
            # A second signal means now: a claimed file is recovered at the next start.
            os._exit(128 + signum)

    def _note_stop(self) -> None:
        """Say, once, that a stop was asked for (from the loop or a step, not the handler)."""
        if self._stop_noted:
            return
        self._stop_noted = True
        if self._stop_signal is not None:
            log.info("stopping", signal=signal.Signals(self._stop_signal).name)
        self.notifier.stopping()
        self._set_status("stopping")

    # --- what the dispatcher reports ----------------------------------------------------

    def _progress(self, job_ids: list[str], step: int, steps: int) -> None:
        """At a render's start (step 0) and after each denoising step: record it."""
        if self.should_exit.is_set():
            self._note_stop()  # at once: the render ends at this step, then the writes drain
            return
        if step == 0:
            batch = {"batch": job_ids} if len(job_ids) > 1 else {}
            # Lazy at the start too: written by the heartbeat thread, off the render's
            # path; what a crash is counted against is the broker's (``rendering``).
            self._set_status("rendering", lazy=True, job=job_ids[0], step=step, steps=steps, **batch)
        else:
            self.status.step(step, steps, self.broker.pending())
        self.notifier.watchdog()  # the render progresses

    def _finished(self, slot: Slot, result: dict[str, Any]) -> None:
        """A result is published: count it and say so, one line per job."""
        self.counts[result["status"]] += 1
        if self.metrics:
            self.metrics.finished(result)
            self._write_metrics(force=True)
        for warning in result.get("warnings", []):
            log.warning("image warning", job_id=slot.entry.id, warning=warning)
        t = result["timings"]
        error = {"error": result["error"]["message"]} if "error" in result else {}
        log.info("job finished", job_id=slot.entry.id, status=result["status"], file=slot.take.delivery.source,
                 images=len(result["images"]), **error, **{k: v for k, v in t.items() if k.endswith("_s")})

    # --- status ------------------------------------------------------------------------

    def _set_status(self, state: str, *, lazy: bool = False, **current: Any) -> None:
        """Record the state; ``lazy``: a step or an idle turn, written when it
        changed or the heartbeat is due, else at once."""
        self.status.update(state, force=not lazy, current=current or None, device=self.description.get("device"),
                           queued=self.broker.pending(), **self.counts)

    def _tell_systemd(self, status: dict[str, Any]) -> None:
        """STATUS= for ``systemctl status``, as the status file is written."""
        if self.notifier.enabled:
            self.notifier.status(describe(status))

    def _write_metrics(self, force: bool) -> None:
        now = time.monotonic()
        if self.metrics and (force or now - self._metrics_at >= self.settings["watch.rescan_seconds"]):
            self._metrics_at = now
            self.metrics.write(self.broker.pending())

    def _on_beat(self, state: str | None) -> None:
        """Heartbeat thread: while the model loads, ask systemd for more start time;
        keep the metrics file fresh through long renders."""
        if state == "loading":
            self.notifier.extend_timeout(LOAD_EXTEND_S)
        else:
            self._write_metrics(force=False)


def make_broker(settings: Settings, wake: threading.Event) -> Broker:
    """The broker ``queue`` names: the spool folders, or a Redis server."""
    if settings["queue"] == "files":
        from .filebroker import FileBroker

        return FileBroker(settings, wake)
    from .redisbroker import RedisBroker

    return RedisBroker(settings, wake)


def _metrics(settings: Settings, owner: str) -> Any:
    """The metrics writer, or None when ``metrics_dir`` is off."""
    where = settings["metrics_dir"]
    if where.strip().lower() == "off":
        return None
    from .metrics import Metrics

    return Metrics(Path(where) if where else settings.state / "metrics", owner)


def _flat(description: dict[str, Any]) -> dict[str, Any]:
    model = description.get("model", {})
    return {"model": model.get("name"), "source": model.get("source"), "random_weights": model.get("random_weights"),
            "device": description.get("device"), "dtype": description.get("dtype")}
