"""Crash safety under SIGKILL, short form (the long form: python tests/torture.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torture import torture

# Daemons started and killed over and over: not beside the other crowds (pytest-xdist).
pytestmark = pytest.mark.xdist_group("crowd")


def test_random_sigkills_lose_nothing(tmp_path: Path, model_cache: Path) -> None:
    problems = torture(tmp_path / "spool", model_cache, jobs=24, kills=4, seed=1234)
    assert problems == []


def test_random_sigkills_with_two_daemons(tmp_path: Path, model_cache: Path) -> None:
    problems = torture(tmp_path / "spool", model_cache, jobs=16, kills=2, daemons=2, seed=99)
    assert problems == []
