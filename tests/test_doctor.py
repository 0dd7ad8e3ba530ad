"""`sbrender doctor` on a healthy setup and on broken ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Spool, daemon_env, sbrender


def test_healthy_setup(spool: Spool, model_cache: Path) -> None:
    proc = sbrender("doctor", *spool.cli_args(), env=daemon_env(model_cache), cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ready to run"
    assert any(line.startswith("ok    torch: ") for line in lines)
    assert any(line.startswith("ok    model: tiny-random: built-in, random weights") for line in lines)
    assert any(line.startswith("warn  device: cpu") for line in lines)  # this machine has no GPU
    assert any(line.startswith("warn  outbox: ") and "does not exist yet" in line for line in lines)


def test_offline_model_missing_from_the_cache(spool: Spool, model_cache: Path, tmp_path: Path) -> None:
    env = daemon_env(model_cache, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = sbrender("doctor", "--model", "someone/missing-model", "--offline", *spool.cli_args(), env=env,
                    cwd=spool.root)
    assert proc.returncode == 1
    assert "fail  model: someone/missing-model is not in the Hugging Face cache and offline is on" in proc.stdout
    assert "fix: download it once (`hf download someone/missing-model`)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 problem(s) to fix"


def test_state_on_another_filesystem(spool: Spool, model_cache: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(spool.inbox).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    proc = sbrender("doctor", "--state", str(shm / "sbrender-doctor"), "--inbox", str(spool.inbox),
                    env=daemon_env(model_cache), cwd=spool.root)
    assert proc.returncode == 1 and "is not on the inbox's filesystem" in proc.stdout
