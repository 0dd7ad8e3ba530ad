"""A real `sbrender serve` process for the HTTP tests (tests/test_http_*.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Spool, log_lines, wait_for

SERVE_READY_S = 60.0


class ServeProcess:
    """`sbrender serve --port 0` on a spool; ``url`` read from its "serving" log line."""

    def __init__(self, spool: Spool, env: dict[str, str], *args: str) -> None:
        self.log_path = spool.root / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sbrender", "serve", "--port", "0",
                                      "--log-format", "json", *spool.cli_args(), *args],
                                     env=env, cwd=spool.root, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""

    def lines(self) -> list[dict[str, Any]]:
        return log_lines(self.log_path)

    def wait_ready(self) -> ServeProcess:
        def serving() -> str:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            started = [line for line in self.lines() if line.get("event") == "serving"]
            done = any("startup complete" in str(line.get("event")) for line in self.lines())
            return started[0]["url"] if started and done else ""

        self.url = wait_for(serving, SERVE_READY_S, lambda: self.log_path.read_text())
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def run_serve(spool: Spool, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`sbrender serve` expected to refuse to start: its exit status and message."""
    return subprocess.run([sys.executable, "-m", "sbrender", "serve", "--port", "0", *spool.cli_args(), *args],
                          env=env, cwd=spool.root, text=True, capture_output=True, timeout=60)


def outbox_names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "outbox").glob("*"))
