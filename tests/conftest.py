"""Fixtures: the tiny-random model built once per session, spools in tmp_path,
and real `sbrender run` daemon processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

# One compute thread per process: the tiny model's tensors are too small for a
# second thread to help, and several daemons (and xdist workers) share the
# cores, where threads fighting over them made a 3-step render 10 times slower.
# Set before anything imports torch, which reads these at import; test daemons
# inherit them through daemon_env.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(THREAD_ENV)

import pytest  # noqa: E402

from sbrender.peers import owner_name  # noqa: E402

READY_TIMEOUT_S = 180.0
RESULT_TIMEOUT_S = 120.0
WAIT_TIMEOUT_S = 60.0

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = WAIT_TIMEOUT_S, message: str | Callable[[], str] = "") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    A test waits for the state it is about to assert (a file archived, a log
    line written), never for a fixed time: on a loaded machine any fixed time
    is too short. Fails with ``message`` (a string, or a callable that describes
    the state seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"waited {timeout} s: {text or 'condition never held'}")
        time.sleep(0.05)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, so that the workers of `make test` (pytest-xdist) finish
    together instead of one of them starting a minutes-long test last: tests
    marked slow, then those on the tiny model (daemons, renders), then the rest,
    each in collection order. xdist_group marks keep tests that must not run
    beside each other on one worker, one after the other."""
    def cost(item: pytest.Item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        return 1 if "model_cache" in getattr(item, "fixturenames", ()) else 2

    items.sort(key=cost)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the built tiny-random pipeline (built once, ~0.5 s)."""
    from sbrender.models import BUILTINS, ensure_builtin

    cache = tmp_path_factory.mktemp("model-cache")
    ensure_builtin(BUILTINS["tiny-random"], cache)
    return cache


class Spool:
    """A spool in a temp folder, and the ways a producer writes into it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.state = root / "state"
        self.inbox.mkdir(parents=True, exist_ok=True)

    def drop(self, name: str, content: str | bytes | dict[str, Any] | list[Any], mtime: float | None = None) -> Path:
        """Write a job file the recommended way: hidden temp file, then rename."""
        if isinstance(content, (dict, list)):
            content = json.dumps(content)
        data = content.encode() if isinstance(content, str) else content
        temp = self.inbox / f".{name}.tmp"
        temp.write_bytes(data)
        if mtime is not None:
            os.utime(temp, (mtime, mtime))
        final = self.inbox / name
        os.rename(temp, final)
        return final

    def result(self, job_id: str, timeout: float = RESULT_TIMEOUT_S) -> dict[str, Any]:
        """Wait for outbox/<id>.json and return it."""
        path = self.outbox / f"{job_id}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no result for {job_id} after {timeout} s; outbox: "
                                     f"{sorted(p.name for p in self.outbox.glob('*'))}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def cli_args(self) -> list[str]:
        return ["--inbox", str(self.inbox), "--outbox", str(self.outbox), "--state", str(self.state)]


def daemon_env(model_cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a test daemon: tiny model, small fast jobs, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBRENDER_")}
    env.update({
        "SBRENDER_MODEL": "tiny-random",
        "SBRENDER_CACHE": str(model_cache),
        "SBRENDER_OFFLINE": "true",
        "SBRENDER_DEFAULTS_WIDTH": "64",
        "SBRENDER_DEFAULTS_HEIGHT": "64",
        "SBRENDER_DEFAULTS_STEPS": "3",
        "SBRENDER_WATCH_SETTLE_SECONDS": "0.5",
        "SBRENDER_WATCH_RESCAN_SECONDS": "0.5",
        "SBRENDER_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **THREAD_ENV,
    })
    env.update(extra)
    return env


def sbrender(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300,
             check: bool = False, preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "sbrender", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"sbrender {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def log_lines(path: Path) -> list[dict[str, Any]]:
    """A process's JSON log, a dict per line; a line that is not JSON as {"event": line, "raw": True}."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line, "raw": True})
    return out


class DaemonProcess:
    """A real `sbrender run` subprocess, its log parsed as JSON lines."""

    def __init__(self, spool: Spool, env: dict[str, str], *args: str) -> None:
        self.spool = spool
        self.log_path = spool.root / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sbrender", "run", *spool.cli_args(), *args],
                                     env=env, cwd=spool.root, stdout=self._log, stderr=subprocess.STDOUT)
        # The daemon's owner name holds its process start time: read it while it lives.
        self.owner = owner_name(pid=self.proc.pid)

    def lines(self) -> list[dict[str, Any]]:
        return log_lines(self.log_path)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.events("ready"):
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} before ready:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        return code


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def start_daemon(model_cache: Path) -> Iterator[Any]:
    """Start daemons on demand; each is stopped with SIGTERM at the end and must exit 0."""
    started: list[DaemonProcess] = []

    def start(spool: Spool, *args: str, wait: bool = True, **env: str) -> DaemonProcess:
        daemon = DaemonProcess(spool, daemon_env(model_cache, **env), *args)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start
    codes = [(d.stop(), d) for d in started]
    for code, daemon in codes:
        assert code == 0, f"daemon exited {code}:\n{daemon.log_path.read_text()[-4000:]}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server of its own (tests/redis_server.py), killed at the end."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()
