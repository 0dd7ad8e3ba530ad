"""Prometheus metrics in a text file, for node_exporter's textfile collector.

Each daemon writes ``<metrics_dir>/sbrender-<owner>.prom`` (atomically, with
prometheus_client's ``write_to_textfile``) after each job and at each rescan,
and removes it when it stops cleanly. Point ``metrics_dir`` at the collector's
folder (``--collector.textfile.directory``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class Metrics:
    def __init__(self, folder: Path, owner: str) -> None:
        self.path = folder / f"sbrender-{owner}.prom"
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("sbrender_jobs", "Jobs finished, by outcome.", ["status"], registry=r)
        self.images = Counter("sbrender_images", "Images published.", registry=r)
        self.render = Histogram("sbrender_render_seconds", "Seconds in the diffusers call, per job.",
                                buckets=SECONDS, registry=r)
        self.total = Histogram("sbrender_job_seconds", "Seconds from a job's start to its result.",
                               buckets=SECONDS, registry=r)
        self.wait = Histogram("sbrender_wait_seconds", "Seconds from the job file's arrival to its start.",
                              buckets=SECONDS, registry=r)
        self.queue = Gauge("sbrender_queue_depth", "Jobs waiting in the queue.", registry=r)
        self.model_load = Gauge("sbrender_model_load_seconds", "Seconds the model took to load.", registry=r)
        self.updated = Gauge("sbrender_last_update_timestamp_seconds", "When this file was written.", registry=r)
        self.info = Gauge("sbrender_info", "The daemon: model, device, dtype.", ["owner", "model", "device", "dtype"],
                          registry=r)
        for status in ("succeeded", "failed", "cancelled"):
            self.jobs.labels(status)  # present at 0, so rates work from the start

    def loaded(self, seconds: float, owner: str, description: dict[str, Any]) -> None:
        self.model_load.set(seconds)
        self.info.labels(owner, description.get("model", {}).get("name", ""), description.get("device", ""),
                         description.get("dtype", "")).set(1)

    def finished(self, result: dict[str, Any]) -> None:
        self.jobs.labels(result["status"]).inc()
        self.images.inc(len(result.get("images", [])))
        timings = result.get("timings", {})
        if result["status"] == "succeeded":
            self.render.observe(timings.get("inference_s", 0.0))
            self.wait.observe(timings.get("wait_s", 0.0))
        self.total.observe(timings.get("total_s", 0.0))

    def write(self, queue_depth: int) -> None:
        self.queue.set(queue_depth)
        self.updated.set_to_current_time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.path), self.registry)
        except OSError:
            pass  # metrics must never stop rendering; the status file says the same

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
