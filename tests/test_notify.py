"""systemd's notify protocol against real datagram sockets, and across a whole
daemon run (what `systemctl status` would show)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProcess, Spool, daemon_env
from sbrender.notify import Notifier


class Listener:
    """A bound datagram socket collecting what is sent to it, like systemd's."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.arrivals: list[float] = []  # time.monotonic() of each message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            self.arrivals.append(time.monotonic())
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if key in message and (value is None or message[key].startswith(value)):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} in {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["abstract", "path"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    address = f"@sbrender-test-{os.getpid()}-{time.monotonic_ns()}" if request.param == "abstract" \
        else str(tmp_path / "notify.sock")
    listener = Listener(address)
    yield address, listener
    listener.close()


def test_notifier_sends_to_abstract_and_path_sockets(listener: tuple[str, Listener]) -> None:
    address, received = listener
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    notifier.ready("idle, 0 queued")
    notifier.status("rendering x step 1/2, 0 queued")
    notifier.status("rendering x step 1/2, 0 queued")  # unchanged: not sent again
    notifier.watchdog()
    notifier.stopping()
    received.wait_for("STOPPING", "1")
    assert received.messages == [
        {"READY": "1", "STATUS": "idle, 0 queued", "MAINPID": str(os.getpid())},
        {"STATUS": "rendering x step 1/2, 0 queued"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]
    assert notifier.watchdog_interval == 0.5


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.send("READY=1") is False
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_whole_daemon_run_as_systemd_sees_it(spool: Spool, model_cache: Path, tmp_path: Path) -> None:
    address = f"@sbrender-run-{os.getpid()}-{time.monotonic_ns()}"
    received = Listener(address)
    daemon = DaemonProcess(spool, daemon_env(model_cache, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000"))
    try:
        loading = received.wait_for("STATUS", "loading model tiny-random")
        ready = received.wait_for("READY", "1")
        assert received.messages.index(loading) < received.messages.index(ready)
        assert daemon.events("ready"), "READY=1 only after the model is loaded and the inbox scanned"
        assert ready["STATUS"] == "idle, 0 queued"
        spool.drop("notified.yaml", "prompt: watched\nsteps: 12\n")
        received.wait_for("STATUS", "rendering notified step ")
        spool.result("notified")
        received.wait_for("STATUS", "idle, 0 queued")
        pings = sum("WATCHDOG" in m for m in received.messages)
        assert pings >= 1
        assert daemon.stop(signal.SIGTERM) == 0
        received.wait_for("STOPPING", "1")
    finally:
        daemon.stop()
        received.close()


def test_an_idle_daemon_pings_the_watchdog_well_within_its_deadline(spool: Spool, model_cache: Path) -> None:
    """WatchdogSec=2: pings at least every second (half of it), even while the
    loop would sleep until a rescan 30 s away."""
    address = f"@sbrender-watchdog-{os.getpid()}-{time.monotonic_ns()}"
    received = Listener(address)
    daemon = DaemonProcess(spool, daemon_env(model_cache, NOTIFY_SOCKET=address, WATCHDOG_USEC="2000000",
                                             SBRENDER_WATCH_RESCAN_SECONDS="30"))
    try:
        received.wait_for("READY", "1")
        deadline = time.monotonic() + 60
        while sum("WATCHDOG" in m for m in received.messages) < 5:
            assert time.monotonic() < deadline, received.messages
            time.sleep(0.05)
        pings = [t for t, m in zip(received.arrivals, list(received.messages)) if "WATCHDOG" in m]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 2.0, f"pings {gaps} s apart: systemd kills a daemon silent for 2 s"
    finally:
        assert daemon.stop() == 0
        received.close()
