"""Which jobs a daemon is rendering, said by marks in its work folder: renamed,
never created on the render's path, and read by the daemon that recovers a dead
one's files to count a crash against them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sbrender.config import load_settings
from sbrender.filebroker import FileBroker
from sbrender.peers import _host_part
from sbrender.spool import FileInfo, Spool


def broker(root: Path) -> FileBroker:
    settings = load_settings(env={}, overrides={"inbox": str(root / "inbox"), "outbox": str(root / "outbox"),
                                                "state": str(root / "state"), "watch.mode": "polling"})
    out = FileBroker(settings, threading.Event())
    out.prepare()
    return out


def marks(folder: Path) -> dict[str, int]:
    """Mark and spare names in ``folder``, with their inodes."""
    return {e.name: e.inode() for e in os.scandir(folder) if e.name.startswith(".")}


def test_marks_name_the_jobs_rendering_and_move_without_new_files(tmp_path: Path) -> None:
    b = broker(tmp_path)
    work = b.spool.work
    b.rendering(["cat"])
    first = marks(work)
    assert list(first) == [".rendering~cat"]
    assert b.spool.rendering(b.owner) == ["cat"]
    b.rendering(["dog", "owl"])  # a batch: the cat's mark now names the dog, one more for the owl
    second = marks(work)
    assert sorted(second) == [".rendering~dog", ".rendering~owl"]
    assert second[".rendering~dog"] == first[".rendering~cat"], "renamed, not created again"
    b.rendering(["owl"])  # a job already marked keeps its mark; the dog's becomes a spare
    third = marks(work)
    assert third[".rendering~owl"] == second[".rendering~owl"]
    assert sorted(third) == [".rendering~owl", ".spare~0"]
    b.rendering([])  # the loop found nothing to do
    assert sorted(marks(work)) == [".spare~0", ".spare~1"]
    assert b.spool.rendering(b.owner) == []
    b.rendering(["emu"])
    assert marks(work)[".rendering~emu"] in second.values(), "a spare is used again"
    assert b.close(), "a clean stop removes marks and spares with the folder"
    assert not work.exists()


def test_marks_name_the_jobs_rendering_and_recovery_counts_them(tmp_path: Path) -> None:
    """A daemon killed mid-render: its marks name the job, whatever its status file says."""
    dead = Spool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state",
                 owner=f"{_host_part()}-{os.getpid()}-1")  # this pid with another start time: gone
    dead.prepare()
    (dead.work / "cat.yaml").write_text("prompt: a cat\n")
    (dead.work / "dog.yaml").write_text("prompt: a dog\n")
    dead.move_mark(0, None, "cat")
    dead.move_mark(1, None, "spare-me")
    dead.move_mark(1, "spare-me", None)
    assert dead.rendering(dead.owner) == ["cat"]

    live = broker(tmp_path)
    live.open()
    try:
        claimed = {p.name: FileInfo.of(p) for p in live.spool.work.iterdir() if not p.name.startswith(".")}
        assert sorted(claimed) == ["cat.yaml", "dog.yaml"], "both files adopted"
        cat, dog = claimed["cat.yaml"], claimed["dog.yaml"]
        assert cat is not None and dog is not None
        assert (live.spool.attempts / f"{cat.claim_token}-cat").read_text() == "1", "a crash counted for the cat"
        assert not (live.spool.attempts / f"{dog.claim_token}-dog").exists(), "none for a job not rendering"
        assert not dead.work.exists(), "the dead daemon's folder, marks and spares are gone"
    finally:
        live.close()


def test_the_marks_of_a_daemon_that_died_with_nothing_claimed_are_removed(tmp_path: Path) -> None:
    dead = Spool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state",
                 owner=f"{_host_part()}-{os.getpid()}-1")
    dead.prepare()
    dead.move_mark(0, None, "cat")  # its job finished and was archived; then it died
    live = broker(tmp_path)
    live.open()
    try:
        assert [p for p in dead.work.iterdir()] == [], "no mark left behind to be taken for a claimed file"
    finally:
        live.close()
