"""The inbox watcher's inotify reader, on real folders: what wakes it, and what
does not. Events come in order, so a sentinel file's event shows that every
earlier change was delivered (or filtered out) without waiting a fixed time."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import wait_for
from sbrender import inotify
from sbrender.watcher import MASK, Hint, InboxWatcher

pytestmark = pytest.mark.skipif(not inotify.available(), reason="inotify is Linux only")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[tuple[int, str]]) -> None:
        with self.lock:
            self.events += events

    def names(self) -> list[str]:
        with self.lock:
            return [name for _, name in self.events]


def test_a_claim_renaming_a_file_out_of_the_folder_wakes_nobody(tmp_path: Path) -> None:
    inbox, work = tmp_path / "inbox", tmp_path / "work"
    inbox.mkdir()
    work.mkdir()
    (inbox / "a.json").write_text("{}")
    seen = Recorder()
    reader = inotify.FolderEvents(inbox, MASK, seen)
    reader.start()
    try:
        os.rename(inbox / "a.json", work / "a.json")  # what a claim does
        (inbox / "sentinel.json").write_text("{}")
        wait_for(lambda: "sentinel.json" in seen.names(), message=lambda: f"events: {seen.events}")
        assert "a.json" not in seen.names()
        # A file renamed in is complete at once: no pairing with a move out, no delay.
        (work / "a.json").rename(inbox / "b.json")
        wait_for(lambda: any(mask & inotify.IN_MOVED_TO and name == "b.json" for mask, name in seen.events))
    finally:
        reader.stop()
    assert not reader.alive()
    reader.stop()  # twice is harmless


def test_hints_follow_a_writer_a_rename_and_a_delete(tmp_path: Path) -> None:
    wake = threading.Event()
    watcher = InboxWatcher(tmp_path, "inotify", wake)
    watcher.start()
    try:
        assert watcher.strategy == "inotify"
        with open(tmp_path / "slow.yaml", "w") as f:
            f.write("prompt: a")
            f.flush()
            wait_for(lambda: (s := watcher.hint("slow.yaml")) is not None and s.hint is Hint.WRITING)
        wait_for(lambda: watcher.hint("slow.yaml").hint is Hint.COMPLETE)
        (tmp_path / ".tmp-x").write_text("prompt: b")
        os.rename(tmp_path / ".tmp-x", tmp_path / "renamed.yaml")
        wait_for(lambda: (s := watcher.hint("renamed.yaml")) is not None and s.hint is Hint.COMPLETE)
        assert watcher.hint(".tmp-x") is None, "temp files are not job files"
        assert wake.is_set()
        watcher.drain()
        os.unlink(tmp_path / "renamed.yaml")
        wait_for(lambda: watcher.hint("renamed.yaml") is None)
        assert "renamed.yaml" in watcher.drain(), "a deleted name is looked at again"
        watcher.forget("slow.yaml")  # the daemon claimed it
        assert watcher.hint("slow.yaml") is None and "slow.yaml" not in watcher.drain()
    finally:
        watcher.stop()


def test_the_reader_ends_when_its_folder_goes_away(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    reader = inotify.FolderEvents(inbox, MASK, Recorder())
    reader.start()
    try:
        assert reader.alive()
        inbox.rename(tmp_path / "elsewhere")
        wait_for(lambda: not reader.alive(), message="the reader outlived its folder's watch")
    finally:
        reader.stop()


def test_a_folder_that_cannot_be_watched_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        inotify.FolderEvents(tmp_path / "missing", MASK, Recorder()).start()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        inotify.FolderEvents(tmp_path / "file", MASK, Recorder()).start()  # IN_ONLYDIR


def test_a_restart_or_lost_events_trust_no_old_hint_and_ask_for_a_full_scan(tmp_path: Path) -> None:
    """A name claimed by a peer (renamed out: no event) keeps no COMPLETE hint across
    a gap in watching, where a new file of that name may be half-written."""
    watcher = InboxWatcher(tmp_path, "inotify", threading.Event())
    watcher.start()
    try:
        assert watcher.events_lost(), "a start asks for a full scan"
        assert not watcher.events_lost()
        (tmp_path / ".t").write_text("prompt: a")
        os.rename(tmp_path / ".t", tmp_path / "job0.json")
        wait_for(lambda: (s := watcher.hint("job0.json")) is not None and s.hint is Hint.COMPLETE)
        watcher.restart()
        assert watcher.hint("job0.json") is None
        assert watcher.events_lost()
    finally:
        watcher.stop()


def test_an_inotify_queue_overflow_drops_every_hint_and_asks_for_a_full_scan(tmp_path: Path) -> None:
    from sbrender.watcher import Hints, _record

    hints = Hints()
    _record(hints, [(inotify.IN_CLOSE_WRITE, "a.json")])
    assert hints.get("a.json") is not None and not hints.take_lost()
    _record(hints, [(inotify.IN_Q_OVERFLOW, "")])
    assert hints.get("a.json") is None
    assert hints.take_lost() and not hints.take_lost()


def test_hints_of_names_gone_from_the_folder_are_pruned_by_a_scan(tmp_path: Path) -> None:
    import time

    from sbrender.watcher import Hints

    hints = Hints()
    for k in range(3):
        hints.set(f"gone-{k}.json", Hint.COMPLETE)
    hints.set("here.json", Hint.COMPLETE)
    listing_began = time.monotonic()
    hints.set("new.json", Hint.CREATED)  # an event after the listing began: kept
    hints.retain({"here.json"}, listing_began)
    assert [name for name in ("gone-0.json", "gone-1.json", "gone-2.json") if hints.get(name)] == []
    assert hints.get("here.json") is not None and hints.get("new.json") is not None
