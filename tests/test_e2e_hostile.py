"""A drop folder is an attack surface: hostile and broken files through a real
daemon. Each yields exactly one failed result with a reason, its input is kept
in state/failed, nothing is followed or written outside the outbox, and the
next good job still renders."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DaemonProcess, Spool
from sbrender.ids import safe_id_for


def _symlink(spool: Spool, name: str) -> None:
    target = spool.root / "secret.txt"
    target.write_text("prompt: not yours\n")
    os.symlink(target, spool.inbox / name)


def _hardlink(spool: Spool, name: str) -> None:
    other = spool.root / "elsewhere.yaml"
    other.write_text("prompt: linked\n")
    os.link(other, spool.inbox / name)


def _text(content: str | bytes) -> Callable[[Spool, str], None]:
    def make(spool: Spool, name: str) -> None:
        spool.drop(name, content)
    return make


CORPUS: list[tuple[str, Callable[[Spool, str], None], str, str]] = [
    ("link.yaml", _symlink, "unsafe_file", "symbolic link"),
    ("hard.yaml", _hardlink, "unsafe_file", "2 hard links"),
    ("fifo.yaml", lambda s, n: os.mkfifo(s.inbox / n), "unsafe_file", "a FIFO"),
    ("dir.yaml", lambda s, n: (s.inbox / n).mkdir(), "unsafe_file", "a directory"),
    ("huge.yaml", _text("prompt: " + "x" * 1_100_000 + "\n"), "unsafe_file", "more than the limit of 1048576"),
    ("empty.yaml", _text(""), "invalid_job", "job file is empty"),
    ("binary.json", _text(b"\x89PNG\r\n\x1a\n\xff\xfe garbage"), "invalid_job", "not UTF-8 text"),
    ("pyobj.yaml", _text('prompt: !!python/object/apply:os.system ["touch /tmp/sbrender-pwned"]\n'),
     "invalid_job", "YAML tag not allowed"),
    ("laughs.yaml", _text('a: &a ["lol","lol"]\nb: &b [*a,*a,*a]\nprompt: *b\n'), "invalid_job",
     "anchors and aliases are not allowed"),
    ("nan.json", _text('{"prompt": "x", "guidance_scale": NaN}'), "invalid_job", "NaN is not allowed"),
    ("scalar.yaml", _text("just a sentence\n"), "invalid_job", "must be a mapping of fields, not a string"),
    ("my cat.yaml", _text("prompt: spaces in the name\n"), "invalid_job", "is not a usable job id"),
    ("-dash.yaml", _text("prompt: starts with a dash\n"), "invalid_job", "must start with a letter or a digit"),
    ("naïve.yaml", _text("prompt: not ascii\n"), "invalid_job", "may hold only letters"),
]


def _expected_id(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    ok = stem.isascii() and stem[:1].isalnum() and all(c.isalnum() or c in "._-" for c in stem)
    return stem if ok else safe_id_for(name)


def test_hostile_corpus(live_hostile: tuple[Spool, DaemonProcess]) -> None:
    spool, daemon = live_hostile
    for name, make, _, _ in CORPUS:
        make(spool, name)
    # A symlink planted in the outbox where a job's PNG will go.
    victim = spool.root / "victim.png"
    victim.write_bytes(b"precious")
    spool.outbox.mkdir(exist_ok=True)
    os.symlink(victim, spool.outbox / "planted.png")
    spool.drop("planted.yaml", "prompt: overwrite nothing outside\n")
    spool.drop("good-after-hostile.yaml", "prompt: still working\n")

    for name, _, kind, message in CORPUS:
        result = spool.result(_expected_id(name))
        assert result["status"] == "failed", name
        assert result["error"]["type"] == kind, (name, result["error"])
        assert message in result["error"]["message"], (name, result["error"])
    assert spool.result("good-after-hostile")["status"] == "succeeded"
    assert spool.result("planted")["status"] == "succeeded"
    assert victim.read_bytes() == b"precious", "the daemon wrote through a planted symlink"
    assert not (spool.outbox / "planted.png").is_symlink()
    assert not Path("/tmp/sbrender-pwned").exists()
    # Exactly one result per rejected file, and every input kept aside.
    results = sorted(p.name for p in spool.outbox.glob("*.json"))
    assert len(results) == len(CORPUS) + 2
    deadline = time.monotonic() + 30
    while len(list((spool.state / "failed").iterdir())) < len(CORPUS):
        assert time.monotonic() < deadline, sorted(os.listdir(spool.state / "failed"))
        time.sleep(0.05)
    assert sorted(os.listdir(spool.state / "failed")) == sorted(name for name, *_ in CORPUS)
    assert (spool.root / "secret.txt").read_text() == "prompt: not yours\n"
    assert not os.listdir(spool.inbox)
    assert not [line for line in daemon.lines() if line.get("level") == "error"]


@pytest.fixture(params=["inotify", "polling"])
def live_hostile(request: pytest.FixtureRequest, spool: Spool, start_daemon: Callable[..., DaemonProcess]
                 ) -> tuple[Spool, DaemonProcess]:
    return spool, start_daemon(spool, "--watch", request.param)


def test_result_json_is_never_partial(live_hostile: tuple[Spool, DaemonProcess]) -> None:
    """A consumer polling for <id>.json while jobs finish reads whole JSON every time."""
    spool, _ = live_hostile
    for k in range(6):
        spool.drop(f"poll-{k}.yaml", f"prompt: poll {k}\ncount: 2\n")
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen) < 6:
        assert time.monotonic() < deadline
        for path in spool.outbox.glob("poll-*.json"):
            data = json.loads(path.read_text())  # raises if a partial file was visible
            for image in data["images"]:
                assert (spool.outbox / image["file"]).stat().st_size > 0
            seen.add(path.name)
