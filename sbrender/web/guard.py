"""The security middleware: what a request must be before any route sees it.

In this order: a Host we answer to (against DNS rebinding: a hostile name that
resolves to 127.0.0.1), no cross-site browser request (an ``Origin`` we do not
allow, or ``Sec-Fetch-Site: cross-site``: a web page may POST to localhost), the
token when one is set (Bearer, or Basic with the token as the password, for A1111
clients; with no token the ``Authorization`` header is ignored, as Open WebUI and
SillyTavern send an empty one), a JSON body (``text/plain`` is what a page can send
without a preflight) of at most ``max_body`` bytes, counted as it arrives.
"""

from __future__ import annotations

import base64
import json
import binascii
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .replies import error_body, family

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
OPEN_PATHS = frozenset({"/", "/health"})  # the old server left these open too: no job data in them
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The old server's own 401 texts, kept for its clients.
LEGACY_401 = {"missing": "Missing Authorization header",
              "format": "Invalid Authorization format. Expected: Bearer <token>",
              "wrong": "Invalid API key"}


@dataclass(frozen=True)
class Policy:
    token: str = ""
    hosts: frozenset[str] | None = LOOPBACK_NAMES  # None: any Host
    origins: frozenset[str] = frozenset()  # allowed cross-site origins (CORS)
    max_body: int = 32 * 1_048_576

    @classmethod
    def from_settings(cls, serve: dict[str, Any]) -> Policy:
        hosts = {h.strip().lower() for h in serve["allowed_hosts"].split(",") if h.strip()}
        bind = serve["host"].lower()
        if "*" in hosts or (serve["token"] and not hosts and bind not in LOOPBACK_NAMES):
            allowed = None  # behind a token, a server on a public address answers to its names
        else:
            allowed = frozenset(LOOPBACK_NAMES | hosts | {bind})
        origins = frozenset(o.strip().rstrip("/") for o in serve["allowed_origins"].split(",") if o.strip())
        return cls(serve["token"], allowed, origins, serve["max_body_bytes"])


class Refused(Exception):
    """A request the guard answers itself, with this status."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class BodyTooLarge(Exception):
    """The body passed serve.max_body_bytes (by its Content-Length, or as counted)."""


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[:host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class Guard:
    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin", "")
        cors = {"access-control-allow-origin": origin, "vary": "Origin"} if origin in self.policy.origins else {}
        started = False

        async def send_marked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:
                    message["headers"] = [*message.get("headers", []),
                                          *((k.encode(), v.encode()) for k, v in cors.items())]
            await send(message)

        try:
            if scope["method"] == "OPTIONS" and cors:
                await self._preflight(send, cors)
                return
            self._check(scope, headers)
            if scope["method"] in BODY_METHODS:
                # Read whole (it is capped) before the app: a body cut off half way
                # must get a 413, not whatever the app makes of a failed read.
                receive = _replay(await self._read_body(receive), receive)
            await self.app(scope, receive, send_marked)
        except Refused as err:
            if not started:
                await _reply(send, scope["path"], err.status, err.kind, err.message, {**err.headers, **cors})
        except BodyTooLarge:
            if not started:
                await _reply(send, scope["path"], 413, "RequestTooLarge",
                             f"request body over {self.policy.max_body} bytes (serve.max_body_bytes)", cors)

    def _check(self, scope: Scope, headers: dict[str, str]) -> None:
        policy = self.policy
        path, method = scope["path"], scope["method"]
        host = _host_name(headers.get("host", ""))
        if policy.hosts is not None and host not in policy.hosts:
            raise Refused(421 if host else 400, "HostNotAllowed",
                          f"this server does not answer to the host name {host!r} "
                          "(add it to serve.allowed_hosts)")
        origin = headers.get("origin")
        if origin is not None and origin not in policy.origins and not _same_origin(origin, headers.get("host", "")):
            raise Refused(403, "CrossSiteRequest", f"requests from the web origin {origin} are not allowed "
                          "(add it to serve.allowed_origins to allow it)")
        if headers.get("sec-fetch-site") == "cross-site" and origin not in policy.origins:
            raise Refused(403, "CrossSiteRequest", "cross-site requests are not allowed")
        if policy.token and not (method == "GET" and path in OPEN_PATHS):
            _check_token(policy.token, headers.get("authorization"), path)
        if method in BODY_METHODS:
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise Refused(400, "BadRequest", "Content-Length must be a number")
                if int(length) > policy.max_body:
                    raise BodyTooLarge()
            has_body = (length is not None and int(length) > 0) or "chunked" in headers.get("transfer-encoding", "")
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if has_body and not (media == "application/json" or media.endswith("+json")):
                raise Refused(415, "UnsupportedMediaType",
                              f"the body must be JSON (Content-Type: application/json), not {media or 'untyped'}")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Refused(400, "BadRequest", "the client went away before its body arrived")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.policy.max_body:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _preflight(self, send: Send, cors: dict[str, str]) -> None:
        headers = {**cors, "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
                   "access-control-allow-headers": "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, "
                                                   "Prefer",
                   "access-control-max-age": "600"}
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": b""})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the server's own messages (the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _same_origin(origin: str, host: str) -> bool:
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def _check_token(token: str, header: str | None, path: str) -> None:
    legacy = family(path) == "legacy"
    challenge = {"www-authenticate": 'Basic realm="sbrender", charset="UTF-8"'} if family(path) == "a1111" \
        else {"www-authenticate": "Bearer"}
    if not header:
        raise Refused(401, "Unauthorized", LEGACY_401["missing"] if legacy else
                      "this server needs its token: Authorization: Bearer TOKEN (or Basic, TOKEN as the password)",
                      challenge)
    scheme, _, value = header.strip().partition(" ")
    given: list[str] = []
    if scheme.lower() == "bearer":
        given = [value.strip()]
    elif scheme.lower() == "basic" and not legacy:
        try:
            text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            text = ""
        given = [text, text.partition(":")[2]]  # "user:TOKEN", or A1111's --api-auth user:password whole
    else:
        raise Refused(401, "Unauthorized", LEGACY_401["format"] if legacy else
                      "Authorization must be Bearer TOKEN or Basic (TOKEN as the password)", challenge)
    if not any(hmac.compare_digest(g.encode(), token.encode()) for g in given):
        raise Refused(401, "Unauthorized", LEGACY_401["wrong"] if legacy else "wrong token", challenge)


async def _reply(send: Send, path: str, status: int, kind: str, message: str, headers: dict[str, str]) -> None:
    body, media = error_body(path, status, kind, message)
    if family(path) == "legacy" and status == 401:
        # the old server answered 401 with FastAPI's plain {"detail"}

        body = json.dumps({"detail": message}).encode()
    raw = [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode()),
           *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
