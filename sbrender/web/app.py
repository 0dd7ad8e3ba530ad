"""The application: the three routers, the guard, error answers per API, and
the watcher started and stopped with the server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..config import Settings
from ..errors import SbrenderError
from . import a1111, jobsapi, legacy
from .front import RETRY_AFTER_S, Front
from .guard import Guard, Policy
from .replies import error_body, family

# An error kind -> its HTTP status and the name the old server's envelope gives it.
STATUS: dict[str, tuple[int, str]] = {
    "queue_full": (429, "QueueFull"),
    "lost": (410, "JobLost"),
    "timeout": (504, "GatewayTimeout"),
    "queue": (503, "ServiceUnavailable"),
    "invalid_job": (422, "InvalidParameter"),
    "config": (500, "InternalServerError"),
}


def create_app(settings: Settings, front: Front | None = None) -> FastAPI:
    front = front or Front(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await front.start()
        yield
        await front.stop()

    app = FastAPI(title="sbrender", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="Stable Diffusion 1.5 through sbrender's queue: the old server's API, "
                              "AUTOMATIC1111's /sdapi/v1, and the /v1/jobs job API.")
    app.state.front = front
    app.state.a1111 = a1111.Options(settings)
    app.include_router(legacy.router)
    app.include_router(a1111.router)
    app.include_router(jobsapi.router)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(SbrenderError, _sbrender_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Guard, policy=Policy.from_settings(settings.section("serve")))
    return app


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    """422 in each API's own shape: the old envelope, FastAPI's (= A1111's), or problem details."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"],
               **({"input": str(e["input"])} if "input" in e else {})} for e in exc.errors()]
    shape = family(request.url.path)
    if shape == "legacy":
        return JSONResponse({"error": "ValidationError", "code": 422, "detail": "Request validation failed",
                             "meta": {"errors": errors}}, 422)
    if shape == "a1111":
        return JSONResponse({"detail": errors}, 422)
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    body, media = error_body(request.url.path, 422, "invalid_request",
                             f"{'.'.join(map(str, first['loc']))}: {first['msg']}", {"errors": errors})
    return Response(body, 422, media_type=media)


async def _sbrender_error(request: Request, exc: SbrenderError) -> Response:
    status, name = STATUS.get(exc.kind, (500, "InternalServerError"))
    path = request.url.path
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
    body, media = error_body(path, status, name if family(path) == "legacy" else exc.kind, str(exc))
    return Response(body, status, headers=headers, media_type=media)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Logged with its traceback by uvicorn (Starlette raises it on after answering).
    body, media = error_body(request.url.path, 500, "InternalServerError", "An unexpected error occurred",
                             {"type": type(exc).__name__})
    return Response(body, 500, media_type=media)


