"""What the three APIs share: the queue client, the watcher, the queue limit,
and who submitted what (so that A1111's interrupt stops only the caller's job)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ..client import Client
from ..config import Settings
from ..errors import SbrenderError
from .watcher import Watcher


HEALTH_S = 0.5
RETRY_AFTER_S = 2  # what a client refused at serve.max_queue is told to wait: about one job's time


class QueueFull(SbrenderError):
    """This front has serve.max_queue unfinished jobs; the caller should retry later."""

    kind = "queue_full"


class TimedOut(SbrenderError):
    """A synchronous request's job did not finish within serve.sync_timeout_seconds."""

    kind = "timeout"


class ClientGone(Exception):
    """The client of a synchronous request disconnected; the job goes on."""


def caller_of(request: Request) -> str:
    """Who is asking, for A1111's interrupt: the client's address, and the Basic
    user name where one is sent (one SillyTavern or Open WebUI server is one caller)."""
    address = request.client.host if request.client else "?"
    auth = request.headers.get("authorization", "")
    user = ""
    if auth[:6].lower() == "basic ":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            user = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8").partition(":")[0]
    return f"{address}|{user}"


class Front:
    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self.settings = settings
        self.client = client or Client.from_settings(settings)
        self.watcher = Watcher(self.client)
        self.max_queue: int = settings["serve.max_queue"]
        self.sync_timeout: float = settings["serve.sync_timeout_seconds"]
        self._health: tuple[float, list[dict[str, Any]]] | None = None
        self._submitting = 0  # submits under way: they hold a place in serve.max_queue

    async def start(self) -> None:
        self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        self.client.close()

    async def daemons(self) -> list[dict[str, Any]]:
        """The daemons' statuses with their health (``Client.health``), read at
        most once per HEALTH_S however often monitors ask."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] >= HEALTH_S:
            self._health = (now, (await asyncio.to_thread(self.client.health))[1])
        return self._health[1]

    async def submit(self, fields: dict[str, Any], *, caller: str, api: str, job_id: str | None = None) -> str:
        """Check and enqueue a job (``JobError`` for bad input, ``QueueFull``)."""
        # A place is taken before the submit is awaited: requests arriving together
        # cannot all pass the check while the first ones are still being written.
        if self.watcher.outstanding() + self._submitting >= self.max_queue:
            raise QueueFull(f"{self.watcher.outstanding() + self._submitting} jobs from this server are "
                            "unfinished, the most serve.max_queue allows", hint=f"retry in {RETRY_AFTER_S} s")
        self._submitting += 1
        try:
            submitted = await asyncio.to_thread(self.client.submit, job_id=job_id, **fields)
            self.watcher.track(submitted, caller, api)
        finally:
            self._submitting -= 1
        return submitted

    async def result_for(self, request: Request, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a job's result on behalf of a synchronous request. Raises
        ``TimedOut``, or ``ClientGone`` when the client disconnects (the job is
        left alone: it still renders and publishes)."""
        waiting = asyncio.ensure_future(self.watcher.wait(job_id, self.sync_timeout if timeout is None else timeout))
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, gone):
                if not task.done():
                    task.cancel()
        if not waiting.done() or waiting.cancelled():
            raise ClientGone()
        result = waiting.result()
        if result is None:
            raise TimedOut(f"job {job_id} did not finish within {self.sync_timeout:g} s",
                           hint=f"it is still queued or rendering; GET /v1/jobs/{job_id} shows it")
        return result

    def image_files(self, result: dict[str, Any]) -> list[Path]:
        """The result's PNGs; only names the result lists, and only inside the outbox."""
        out = []
        for image in result.get("images", []):
            name = str(image.get("file", ""))
            if not name or name != Path(name).name or name.startswith("."):
                raise SbrenderError(f"result of {result.get('id')} names an image outside the outbox: {name!r}")
            out.append(self.client.outbox / name)
        return out

    async def read_images(self, result: dict[str, Any]) -> list[bytes]:
        return await asyncio.to_thread(lambda: [p.read_bytes() for p in self.image_files(result)])


async def _disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read: the next
    message the server sends up is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
