"""The writer thread: folders a result depends on (the id ledger) are synced
before the result is published, once per group; one that cannot be synced keeps
its results unpublished."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sbrender import writer as writer_module
from sbrender.results import Draft, ImageToWrite
from sbrender.writer import Report, Writer


def draft(job_id: str) -> Draft:
    image = ImageToWrite(f"{job_id}.png", Image.new("RGB", (8, 8), (10, 20, 30)), 7, {"parameters": job_id})
    return Draft(job_id, {"id": job_id, "status": "succeeded", "images": [], "timings": {}}, time.time(),
                 time.time(), {"inference_s": 0.0}, (image,))


def publish(outbox: Path, items: list[tuple[str, tuple[Path, ...]]]) -> dict[str, dict[str, Any] | None]:
    """Hand every draft over before the writer thread may start on them, so they
    are published as one group; the reports by id."""
    w: Writer[str] = Writer(outbox, threading.Event(), depth=len(items) + 1)
    w.put(draft(items[0][0]), items[0][0], items[0][1])  # starts the thread: it takes this one alone, or more
    for job_id, sync in items[1:]:
        w.put(draft(job_id), job_id, sync)
    w.drain()
    w.stop()
    reports: list[Report[str]] = list(w.completed())
    assert [r.tag for r in reports] == [job_id for job_id, _ in items], "reports come back in order"
    return {r.tag: r.result for r in reports}


def test_the_ledger_folder_is_synced_before_the_results_that_need_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    outbox, ids = tmp_path / "outbox", tmp_path / "ids"
    outbox.mkdir()
    ids.mkdir()
    synced: list[tuple[Path, list[str]]] = []  # (folder, results already published then)
    real = writer_module.fsync_dir

    def spy(folder: Path) -> None:
        synced.append((folder, sorted(p.name for p in outbox.glob("*.json"))))
        real(folder)

    monkeypatch.setattr(writer_module, "fsync_dir", spy)
    out = publish(outbox, [("cat", (ids,)), ("dog", (ids,)), ("owl", ())])
    assert all(out[j] is not None and out[j]["status"] == "succeeded" for j in ("cat", "dog", "owl"))
    ledger_syncs = [published for folder, published in synced if folder == ids]
    for job_id in ("cat", "dog"):
        assert any(f"{job_id}.json" not in published for published in ledger_syncs), (job_id, synced)
    assert len(ledger_syncs) <= 2, "once per group (the first may go alone), not once per job"
    assert sorted(p.name for p in outbox.iterdir()) == ["cat.json", "cat.png", "dog.json", "dog.png",
                                                         "owl.json", "owl.png"]


def test_a_result_whose_folder_cannot_be_synced_is_not_published(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    out = publish(outbox, [("cat", (tmp_path / "gone",)), ("dog", ())])
    assert out["cat"] is None, "not published: its file stays claimed and renders again at the next start"
    assert out["dog"] is not None and out["dog"]["status"] == "succeeded"
    assert not (outbox / "cat.json").exists() and not (outbox / "cat.png").exists()
    assert (outbox / "dog.json").exists()
