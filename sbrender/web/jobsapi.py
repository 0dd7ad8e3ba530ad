"""sbrender's own job API: ``/v1/jobs``.

``POST`` queues a job and answers 202 with ``Location`` at once (``Prefer:
wait=N`` waits up to N seconds for the result first); it is idempotent by the
job's ``id`` or an ``Idempotency-Key`` (the id is derived from the key's hash:
a client's text never becomes a file name as it is). ``GET`` one job (long-poll
with ``?wait=N``), its ``/events`` (Server-Sent Events, resumable with
``Last-Event-ID``), its ``/images/{n}``, ``DELETE`` to cancel, and ``GET
/v1/jobs`` with filters. Errors are RFC 9457 problem details.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..client import CANCELLED, FAILED, PENDING, RUNNING, STATES, SUCCEEDED
from ..errors import JobError
from ..jobs import build_job
from .front import Front, TimedOut, caller_of
from .replies import error_body

router = APIRouter(prefix="/v1", tags=["jobs"])

FINISHED = (SUCCEEDED, FAILED, CANCELLED)
MAX_WAIT_S = 60.0  # longest long-poll or Prefer: wait
PING_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
FINAL_EVENT_ID = 1_000_000  # above any step id (1 + step)
KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
HIDDEN = ("input", "file")  # where a job's document would show paths on this host


def problem(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
            **extra: Any) -> Response:
    body, media = error_body("/v1", status, kind, message, extra or None)
    return Response(body, status, headers=headers, media_type=media)


def public(job_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A job's document as a client sees it: no paths, image URLs added."""
    out = {k: v for k, v in doc.items() if k not in HIDDEN}
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k != "location"}
    out["images"] = [{**image, "url": f"/v1/jobs/{job_id}/images/{n}"}
                     for n, image in enumerate(doc.get("images", []), 1)]
    out["links"] = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}
    return out


def _prefer_wait(request: Request) -> float:
    """RFC 7240 ``Prefer: wait=N`` (``respond-async``, or none: 0)."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(float(value), MAX_WAIT_S)
    return 0.0


def _same_job(old: dict[str, Any], new: dict[str, Any], random_seed: bool) -> bool:
    """Whether a retried request asks for the job that is already there (a random
    seed is the one the first request got)."""
    skip = {"seed"} if random_seed else set()
    return {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}


@router.post("/jobs", status_code=202, responses={200: {"description": "finished within Prefer: wait"},
                                                  202: {"description": "queued; Location says where"}})
async def create_job(request: Request, payload: dict[str, Any] = Body(  # noqa: B008 - FastAPI's way
        ..., examples=[{"prompt": "a cat on a mat", "steps": 20, "seed": 42, "metadata": {"order": 7}}])) -> Response:
    """Queue a job: sbrender's job fields (see `sbrender schema`), plus an optional ``id``."""
    front: Front = request.app.state.front
    fields = dict(payload)
    job_id = fields.pop("id", None)
    key = request.headers.get("idempotency-key")
    if key is not None:
        if not KEY_PATTERN.fullmatch(key):
            return problem(400, "bad_idempotency_key", "Idempotency-Key must be 1 to 255 visible ASCII characters")
        derived = "key-" + hashlib.sha256(key.encode()).hexdigest()[:40]
        if job_id is not None and job_id != derived:
            return problem(422, "invalid_job", "give an id or an Idempotency-Key, not both")
        job_id = derived
    if job_id is not None and not isinstance(job_id, str):
        return problem(422, "invalid_job", "id must be a string", field="id")
    rules = front.client.rules
    try:
        built = await asyncio.to_thread(build_job, job_id or "check", fields, rules)  # an init image is decoded
    except JobError as err:
        return problem(422, err.kind, str(err), field=err.field)
    wanted = {"params": built.params(), "metadata": built.metadata}
    if job_id is not None:
        existing = await asyncio.to_thread(front.client.show, job_id)
        if existing is not None:
            same = _same_job({"params": existing.get("params"), "metadata": existing.get("metadata")}, wanted,
                             built.seed is None)
            if not same:
                return problem(422 if key is not None else 409, "conflict",
                               f"job {job_id} exists with other parameters"
                               + (" (same Idempotency-Key, other request)" if key is not None else ""))
            return _accepted(job_id, existing, 200 if existing.get("status") in FINISHED else 202)
    try:
        job_id = await front.submit(fields, caller=caller_of(request), api="jobs", job_id=job_id)
    except JobError as err:
        return problem(409 if "already in use" in err.message else 422, err.kind, str(err), field=err.field)
    wait = _prefer_wait(request)
    if wait > 0:
        try:
            result = await front.result_for(request, job_id, timeout=wait)
            return _accepted(job_id, result, 200)
        except TimedOut:
            pass
    return _accepted(job_id, {"id": job_id, "status": PENDING}, 202)


def _accepted(job_id: str, doc: dict[str, Any], status: int) -> Response:
    headers = {"Location": f"/v1/jobs/{job_id}"}
    if status == 202:
        headers["Retry-After"] = "1"
    return JSONResponse(public(job_id, doc), status, headers=headers)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request,
                  wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S, description="long-poll: wait up to this many "
                                      "seconds for the job to finish")) -> Response:
    front: Front = request.app.state.front
    doc = await asyncio.to_thread(front.client.show, job_id)
    if doc is None:
        return problem(404, "not_found", f"no job {job_id}")
    if wait > 0 and doc.get("status") not in FINISHED:
        try:
            doc = await front.result_for(request, job_id, timeout=wait)
        except TimedOut:
            doc = await asyncio.to_thread(front.client.show, job_id) or doc
    if doc.get("status") not in FINISHED:
        doc = {**doc, "progress": front.watcher.progress.get(job_id)}
    return JSONResponse(public(job_id, doc))


@router.delete("/jobs/{job_id}", status_code=202)
async def cancel_job(job_id: str, request: Request) -> Response:
    front: Front = request.app.state.front
    try:
        state = await asyncio.to_thread(front.client.cancel, job_id)
    except JobError as err:
        status = 409 if "already finished" in err.message else 404
        return problem(status, "conflict" if status == 409 else "not_found", str(err))
    return JSONResponse({"id": job_id, "status": state, "cancel": "requested"}, 202)


@router.get("/jobs/{job_id}/images/{n}", responses={200: {"content": {"image/png": {}}}})
async def get_image(job_id: str, n: int, request: Request) -> Response:
    front: Front = request.app.state.front
    result = await asyncio.to_thread(front.client.result, job_id)
    if result is None:
        return problem(404, "not_found", f"job {job_id} has no result (yet)")
    files = front.image_files(result)
    if not 1 <= n <= len(files):
        return problem(404, "not_found", f"job {job_id} has {len(files)} image(s), numbered from 1")
    data = await asyncio.to_thread(files[n - 1].read_bytes)
    return Response(data, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{files[n - 1].name}"',
                             "Cache-Control": "private, max-age=86400, immutable"})


@router.get("/jobs")
async def list_jobs(request: Request,
                    state: str | None = Query(None, description="only jobs in this state: " + ", ".join(STATES)),
                    since: float | None = Query(None, description="only jobs queued or finished after this "
                                                "Unix time"),
                    limit: int = Query(100, ge=1, le=1000)) -> Response:
    front: Front = request.app.state.front
    if state is not None and state not in STATES:
        return problem(422, "invalid_query", f"state must be one of: {', '.join(STATES)}")
    jobs = await asyncio.to_thread(front.client.jobs)
    chosen = [j for j in jobs if (state is None or j.state == state) and (since is None or j.since > since)]
    items = [{k: v for k, v in j.to_dict().items() if k != "file"} | {"url": f"/v1/jobs/{j.id}"}
             for j in chosen[:limit]]
    return JSONResponse({"jobs": items, "count": len(items), "total": len(chosen)})


def _event(event_id: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.get("/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request) -> Response:
    """Server-Sent Events: ``queued`` (with the place in the queue), ``started``,
    ``progress`` (step i of n), then one of ``succeeded``, ``failed``,
    ``cancelled`` (with the job's document), or ``lost`` (its file was removed),
    and the end of the stream. Ids grow
    with the job; a client that reconnects with ``Last-Event-ID`` gets only what
    came after."""
    front: Front = request.app.state.front
    doc = await asyncio.to_thread(front.client.show, job_id)
    if doc is None:
        return problem(404, "not_found", f"no job {job_id}")
    raw = request.headers.get("last-event-id", "")
    last = int(raw) if raw.strip().isdigit() else -1
    return StreamingResponse(_stream(front, job_id, doc, last), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _stream(front: Front, job_id: str, doc: dict[str, Any], last: int) -> AsyncIterator[str]:
    watcher = front.watcher
    yield "retry: 2000\n\n"
    with watcher.streaming(job_id):
        position: Any = None
        ping_at = time.monotonic() + PING_S
        while True:
            if doc.get("status") in FINISHED:
                yield _event(FINAL_EVENT_ID, str(doc["status"]), public(job_id, doc))
                return
            now = watcher.progress.get(job_id) or {"state": doc.get("status", PENDING)}
            if now["state"] == "lost":
                yield _event(FINAL_EVENT_ID, "lost", {"id": job_id, "state": "lost"})
                return
            if now.get("result"):
                doc = await asyncio.to_thread(front.client.show, job_id) or doc
                continue
            if now["state"] == PENDING and last < 1 and now.get("position") != position:
                position = now.get("position")
                last = 0
                yield _event(0, "queued", {"id": job_id, "state": PENDING, "position": position,
                                           "of": now.get("of")})
            elif now["state"] == RUNNING:
                step, steps = int(now.get("step", 0)), int(now.get("steps", 0))
                if last < 1:
                    last = 1
                    yield _event(1, "started", {"id": job_id, "state": RUNNING, "steps": steps})
                if step >= 1 and 1 + step > last:
                    last = 1 + step
                    yield _event(last, "progress", {"id": job_id, "state": RUNNING, "step": step, "steps": steps})
            await watcher.next_tick(PING_S)
            if time.monotonic() >= ping_at:
                ping_at = time.monotonic() + PING_S
                yield ": ping\n\n"
