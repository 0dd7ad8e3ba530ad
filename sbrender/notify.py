"""systemd's notify protocol (sd_notify(3)), without a service library.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a datagram socket, a
path or, when it starts with ``@``, an abstract socket name. Each message is
newline-separated ``KEY=value`` lines: ``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=...``. Without the
variable every call does nothing, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + address[1:]) if address.startswith("@") else (address or None)
        # systemd asks for a ping at least every WATCHDOG_USEC; ping at half of it,
        # as sd_watchdog_enabled(3) advises. WATCHDOG_PID, when set, must be ours.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else None
        self._last_ping = 0.0
        self._last_status = ""
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message; False when there is no socket or the send failed
        (systemd gone: nothing the daemon should stop for)."""
        if self.address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time for the current start or stop (a long model load)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        """Ping the watchdog; call it only from a loop that is making progress."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")
