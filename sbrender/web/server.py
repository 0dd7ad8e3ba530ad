"""Run the front under uvicorn: check that it may listen where asked, bind, serve."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import structlog

from ..config import Settings
from ..errors import ConfigError

log = structlog.get_logger("sbrender")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 16


def check(settings: Settings) -> None:
    """Refuse to listen beyond this host without a real token (not blank, not
    short, no spaces around it), and to serve a file spool whose inbox is not there."""
    host, token = settings["serve.host"], settings["serve.token"]
    if token and (token != token.strip() or len(token) < MIN_TOKEN_CHARS):
        raise ConfigError(f"serve.token must be at least {MIN_TOKEN_CHARS} characters with no spaces around it",
                          hint="set serve.token (SBRENDER_SERVE_TOKEN) to a long random secret: "
                               "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not is_loopback(host) and not token:
        raise ConfigError(f"serve.host {host} is reachable from other hosts, and serve.token is not set",
                          hint="set serve.token (SBRENDER_SERVE_TOKEN) to a long random secret, "
                               "or listen on 127.0.0.1")
    if settings["queue"] == "files" and not settings.inbox.is_dir():
        raise ConfigError(f"the inbox {settings.inbox} does not exist: there is no queue to serve",
                          hint="start `sbrender run` once (it makes the spool folders), or set inbox "
                               "(SBRENDER_INBOX) to the daemon's")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle and delayed ACKs add 40 ms to each small answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}",
                          hint="choose another --port, or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers); returns the exit status."""
    import uvicorn

    from .app import create_app

    check(settings)
    sock = bind(settings["serve.host"], settings["serve.port"])
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(create_app(settings), log_config=None, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False, proxy_headers=False)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # A stop request is the normal end: exit 0 as `sbrender run` does, not
            # by raising the signal again after the graceful shutdown.
            self._captured_signals.clear()

    server = Server(config)
    log.info("serving", url=f"http://{shown}:{port}", queue="redis" if settings["queue"] != "files" else "files",
             auth=bool(settings["serve.token"]), inbox=str(settings.inbox))
    server.run(sockets=[sock])
    log.info("stopped serving")
    return 0
