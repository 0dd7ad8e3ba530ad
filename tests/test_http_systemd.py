"""The HTTP front's systemd unit passes `systemd-analyze verify` and runs `sbrender serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "sbrender-serve.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_serve_unit_verifies_cleanly(tmp_path: Path) -> None:
    sbrender = Path(sys.executable).with_name("sbrender")
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("/opt/sbrender/.venv/bin/sbrender", str(sbrender)))
    proc = subprocess.run(["systemd-analyze", "verify", f"./{UNIT.name}"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert UNIT.name not in proc.stderr, proc.stderr  # unknown keys are only warnings: none allowed


def test_serve_unit_runs_the_front_beside_the_daemons_spool() -> None:
    lines = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    assert lines["ExecStart"].endswith("sbrender serve")
    assert lines["EnvironmentFile"] == "-/etc/sbrender/sbrender.env"  # SBRENDER_SERVE_TOKEN lives there
    assert lines["Group"] == "sbrender" and lines["UMask"] == "0007"  # job files the daemons may claim
    assert lines["ReadWritePaths"] == "/srv/sbrender" and lines["PrivateDevices"] == "yes"
    assert lines["Restart"] == "on-failure"
