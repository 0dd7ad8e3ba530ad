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


def test_a_mistyped_relative_model_folder_is_not_ready_to_run(spool: Spool, model_cache: Path,
                                                              tmp_path: Path) -> None:
    (spool.root / "models").mkdir()  # models/sd15 was meant as a folder in it
    env = daemon_env(model_cache, SBRENDER_MODEL="models/sd15", HF_HOME=str(tmp_path / "hf"))
    proc = sbrender("doctor", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 1
    assert (f"fail  model: models/sd15 is not in the Hugging Face cache and offline is on: it is neither a cached "
            f"hub model nor an existing folder; {spool.root / 'models'} exists but not "
            f"{spool.root / 'models' / 'sd15'}, so it may be a path that does not exist\n"
            "      fix: download it once (`hf download models/sd15`) or set offline: false; for a local folder, "
            f"set model to its path, relative to the working directory {spool.root} or absolute\n") in proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 problem(s) to fix"

    # Online, a repo id whose owner part is a folder here is more likely a wrong path than a download.
    env["SBRENDER_OFFLINE"] = "false"
    proc = sbrender("doctor", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 1 and "ready to run" not in proc.stdout
    assert "fail  model: models/sd15 is not in the Hugging Face cache: it is neither a cached hub model" in proc.stdout


def test_hf_hub_offline_makes_a_missing_repo_a_failure(spool: Spool, model_cache: Path, tmp_path: Path) -> None:
    # diffusers obeys HF_HUB_OFFLINE whatever sbrender's offline says: the start could not download it.
    env = daemon_env(model_cache, SBRENDER_OFFLINE="false", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = sbrender("doctor", "--model", "someone/missing-model", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 1
    assert "fail  model: someone/missing-model is not in the Hugging Face cache and offline is on" in proc.stdout
    assert "will download" not in proc.stdout and "ready to run" not in proc.stdout


def test_a_model_path_that_does_not_exist_says_so(spool: Spool, model_cache: Path) -> None:
    proc = sbrender("doctor", "--model", "./models/sd15", *spool.cli_args(), env=daemon_env(model_cache),
                    cwd=spool.root)
    assert proc.returncode == 1
    assert (f"fail  model: model ./models/sd15 is a path, and {spool.root / 'models' / 'sd15'} does not exist\n"
            "      fix: set model to the path of an existing diffusers pipeline folder or .safetensors checkpoint, "
            f"relative to the working directory {spool.root} or absolute\n") in proc.stdout


def test_lora_files_are_listed_and_an_unusable_one_named(spool: Spool, model_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    (folder / "style").mkdir(parents=True)
    (folder / "style" / "add_detail.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "old.pt").write_bytes(b"pickle")
    proc = sbrender("doctor", *spool.cli_args(), env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder)),
                    cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok    loras: 2 file(s) in {folder}: add_detail, old" in proc.stdout
    assert f"warn  loras: {folder / 'old.pt'} is a pickle (.pt): loading it could run" in proc.stdout
    assert "fix: convert it to .safetensors" in proc.stdout
    assert "perf.fuse_qkv" not in proc.stdout
    fused = sbrender("doctor", *spool.cli_args(), cwd=spool.root,
                     env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder), SBRENDER_PERF_FUSE_QKV="true"))
    assert "warn  loras: perf.fuse_qkv is on: every job that names a LoRA fails" in fused.stdout
