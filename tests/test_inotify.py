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
