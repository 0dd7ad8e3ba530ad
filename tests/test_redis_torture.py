"""Exactly one result per job under SIGKILLs of daemons and kill -9 of redis-server,
short form (the long form: python tests/redis_torture.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from redis_torture import torture

# Daemons killed and restarted: not beside the other crowds (pytest-xdist).
pytestmark = pytest.mark.xdist_group("crowd")


def test_daemon_kills_and_redis_restarts_leave_exactly_one_result_per_job(tmp_path: Path) -> None:
    assert torture(tmp_path / "torture", jobs=120, daemons=2, kills=3, restarts=2, seed=7) == []
