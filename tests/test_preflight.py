"""A start that cannot work stops before torch is imported, with what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Spool, daemon_env

# The real CLI in a fresh interpreter that reports, when it exits, its status and
# which of the render stack's modules it had imported by then.
RUN_AND_REPORT = """
import json, runpy, sys
sys.argv = ["sbrender", *sys.argv[1:]]
try:
    runpy.run_module("sbrender", run_name="__main__")
except SystemExit as stop:
    heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
    print(json.dumps({"code": stop.code, "imported": heavy}))
"""


def _run_reporting(args: list[str], env: dict[str, str], cwd: Path) -> tuple[dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=300)
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


Case = tuple[str, str, str]  # the model setting; what the error says; what it says to do


def _mistyped_relative_folder(root: Path) -> Case:
    (root / "models").mkdir()  # the folder the user meant to put sd15 in
    return ("models/sd15",
            "models/sd15 is not in the Hugging Face cache and offline is on: it is neither a cached hub model nor "
            f"an existing folder; {root / 'models'} exists but not {root / 'models' / 'sd15'}, so it may be a path "
            "that does not exist",
            "(download it once (`hf download models/sd15`) or set offline: false; for a local folder, set model to "
            f"its path, relative to the working directory {root} or absolute)")


def _dotted_path(root: Path) -> Case:
    return ("./models/sd15", f"model ./models/sd15 is a path, and {root / 'models' / 'sd15'} does not exist",
            "(set model to the path of an existing diffusers pipeline folder or .safetensors checkpoint, relative "
            f"to the working directory {root} or absolute)")


def _missing_checkpoint(root: Path) -> Case:
    return (str(root / "gone.safetensors"), f"model checkpoint {root / 'gone.safetensors'} does not exist",
            "(check the model path)")


def _folder_without_pipeline(root: Path) -> Case:
    (root / "empty-model").mkdir()
    return (str(root / "empty-model"), f"model folder {root / 'empty-model'} has no model_index.json",
            "(point model at a diffusers pipeline folder (saved with save_pretrained))")


@pytest.mark.parametrize("setup", [_mistyped_relative_folder, _dotted_path, _missing_checkpoint,
                                   _folder_without_pipeline])
def test_a_missing_model_is_refused_before_torch_is_imported(
        spool: Spool, tmp_path: Path, setup: Callable[[Path], Case]) -> None:
    model, message, fix = setup(spool.root)
    spool.drop("waiting.yaml", "prompt: must not be lost\n")
    env = daemon_env(tmp_path / "cache", SBRENDER_MODEL=model, HF_HOME=str(tmp_path / "hf"))
    report, stderr = _run_reporting(["run", "--once", *spool.cli_args()], env, spool.root)
    assert report == {"code": 2, "imported": []}, stderr
    assert stderr == f"sbrender: error: {message} {fix}\n"
    assert (spool.inbox / "waiting.yaml").exists()


def test_a_spool_folder_that_cannot_be_made_is_refused_before_torch_is_imported(
        spool: Spool, tmp_path: Path) -> None:
    (spool.root / "not-a-folder").write_text("a file where the outbox's parent should be\n")
    outbox = spool.root / "not-a-folder" / "outbox"
    env = daemon_env(tmp_path / "cache")
    args = ["run", "--once", "--inbox", str(spool.inbox), "--outbox", str(outbox), "--state", str(spool.state)]
    report, stderr = _run_reporting(args, env, spool.root)
    assert report == {"code": 2, "imported": []}, stderr
    assert f"cannot create folder {outbox}: {spool.root / 'not-a-folder'} is not a folder" in stderr
    assert not spool.state.exists(), "a refused start creates nothing"
