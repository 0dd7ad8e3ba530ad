"""The systemd units pass `systemd-analyze verify` with no warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
@pytest.mark.parametrize("unit, as_name", [("sbrender.service", "sbrender.service"),
                                           ("sbrender@.service", "sbrender@0.service")])
def test_unit_verifies_cleanly(tmp_path: Path, unit: str, as_name: str) -> None:
    text = (UNITS / unit).read_text()
    # The unit names the installed path; verify checks that ExecStart exists.
    sbrender = Path(sys.executable).with_name("sbrender")
    (tmp_path / as_name).write_text(text.replace("/opt/sbrender/.venv/bin/sbrender", str(sbrender)))
    proc = subprocess.run(["systemd-analyze", "verify", f"./{as_name}"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert as_name not in proc.stderr, proc.stderr  # unknown keys are only warnings: none allowed


def test_stop_timeout_covers_the_daemons_stop_bound() -> None:
    for unit in ("sbrender.service", "sbrender@.service"):
        lines = dict(line.split("=", 1) for line in (UNITS / unit).read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        assert lines["Type"] == "notify" and int(lines["WatchdogSec"]) >= 30
        assert int(lines["TimeoutStopSec"]) >= 10 and lines["Restart"] == "on-failure"
        assert lines["UMask"] == "0007" and lines["ProtectSystem"] == "strict"



def test_the_compile_cache_is_in_a_folder_the_unit_keeps_writable_across_restarts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sbrender.compilecache import root
    from sbrender.config import load_settings

    for unit in ("sbrender.service", "sbrender@.service"):
        lines = [line.split("=", 1) for line in (UNITS / unit).read_text().splitlines()
                 if "=" in line and not line.startswith("#")]
        env = dict(pair.split("=", 1) for key, value in lines if key == "Environment" for pair in value.split())
        writable = [Path(value) for key, value in lines if key == "ReadWritePaths"] + [
            Path("/var/cache") / value for key, value in lines if key == "CacheDirectory"]
        monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
        settings = load_settings(None, env={})
        folder = root(settings["perf.compile_cache"], settings.cache)
        assert folder is not None and any(folder.is_relative_to(w) for w in writable), (unit, folder, writable)
        assert dict(lines)["PrivateTmp"] == "yes", "the reason the cache must not be in /tmp"
