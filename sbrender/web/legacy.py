"""The FastAPI server sbrender replaces, exactly: ``GET /``, ``GET /health`` and
``POST /generate`` with its field names, bounds, headers and error envelope
(``replies``), now through the queue. Same seed, same bytes: the PNG comes
without sbrender's own text chunk, which names the job."""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator

from ..errors import JobError
from .front import ClientGone, Front, caller_of
from .pngtext import without_text

router = APIRouter(tags=["the old server"])

# Its scheduler names -> A1111 sampler and schedule type.
SCHEDULERS: dict[str, tuple[str, str]] = {
    "dpmsolver++": ("DPM++ 2M", "Karras"),
    "euler_ancestral": ("Euler a", "Automatic"),
}
ROOT = {
    "service": "Semantic Bit GPU Server",
    "version": "0.1.0",
    "phase": "Phase 2 - FastAPI Implementation",
    "endpoints": {
        "/generate": "POST - Generate image from prompt",
        "/health": "GET - Health check and system info",
        "/docs": "GET - Interactive API documentation",
    },
}


class GenerateRequest(BaseModel):
    """The old server's request, field for field."""

    prompt: str = Field(..., description="Text description of desired image", min_length=1, max_length=1000)
    negative_prompt: Optional[str] = Field(None, description="Things to avoid in the image")  # noqa: UP045
    num_inference_steps: int = Field(28, description="Number of denoising steps (5-60)", ge=5, le=60)
    guidance_scale: float = Field(7.0, description="How closely to follow prompt (1.0-12.0)", ge=1.0, le=12.0)
    height: int = Field(512, description="Image height in pixels (256-768, multiple of 8)", ge=256, le=768)
    width: int = Field(512, description="Image width in pixels (256-768, multiple of 8)", ge=256, le=768)
    seed: Optional[int] = Field(None, description="Random seed for reproducibility (0 to 2^32-1)",  # noqa: UP045
                                ge=0, le=2**32 - 1)
    scheduler: Literal["dpmsolver++", "euler_ancestral"] = Field("dpmsolver++", description="Scheduler type")

    @field_validator("height", "width")
    @classmethod
    def check_multiple_of_8(cls, v: int) -> int:
        if v % 8 != 0:
            raise ValueError(f"must be multiple of 8, got {v}")
        return v


def envelope(status: int, error: str, detail: str, meta: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "code": status, "detail": detail, "meta": meta}, status, headers=headers)


@router.get("/")
async def root() -> dict[str, Any]:
    return ROOT


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    front: Front = request.app.state.front
    daemons = await front.daemons()
    live = [d for d in daemons if d["health"] == "ok"]
    settings = front.settings
    sampler = settings["defaults.sampler"]
    old_name = next((k for k, (s, _) in SCHEDULERS.items() if s == sampler), sampler)
    loaded = any(d.get("state") not in ("loading", None) for d in live)
    info = {
        "model_id": settings.model,
        "device": next((d.get("device") for d in live if d.get("device")), None),
        "dtype": settings["dtype"],
        "scheduler": old_name,
        "model_loaded": loaded,
        "defaults": {"steps": settings["defaults.steps"], "guidance_scale": settings["defaults.guidance_scale"],
                     "height": settings["defaults.height"], "width": settings["defaults.width"]},
        # sbrender's own: the queue behind this front.
        "daemons": len(live),
        "unfinished": front.watcher.outstanding(),
    }
    return {"status": "healthy", "model_loaded": loaded, "generator_info": info}


@router.post("/generate", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the PNG, with X-Seed and the like"}})
async def generate(body: GenerateRequest, request: Request) -> Response:
    front: Front = request.app.state.front
    if front.client.queue is None and not any(d["health"] == "ok" for d in await front.daemons()):
        # As the old server before its model was loaded. (On Redis the daemons are
        # on other hosts, out of sight: the job is queued for whichever serves it.)
        return envelope(503, "ServiceUnavailable", "Model not loaded. Server may still be initializing.",
                        headers={"Retry-After": "5"})
    sampler, schedule = SCHEDULERS[body.scheduler]
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.num_inference_steps,
              "guidance_scale": body.guidance_scale, "width": body.width, "height": body.height,
              "seed": body.seed, "sampler": sampler, "scheduler": schedule}
    try:
        job_id = await front.submit(fields, caller=caller_of(request), api="legacy")
    except JobError as err:
        return envelope(400, "InvalidParameter", str(err), {"field": err.field} if err.field else None)
    try:
        result = await front.result_for(request, job_id)
    except ClientGone:
        return Response(status_code=499)
    if result.get("status") != "succeeded":
        error = result.get("error") or {}
        return envelope(500, "GenerationFailed", str(error.get("message", "the job failed")),
                        {"job_id": job_id, "type": error.get("type")})
    data = (await front.read_images(result))[0]
    image = result["images"][0]
    return Response(
        content=without_text(data, "sbrender"),
        media_type="image/png",
        headers={
            "Content-Disposition": "inline; filename=generated.png",
            "X-Seed": str(image["seed"]),
            "X-Steps": str(body.num_inference_steps),
            "X-Guidance": str(body.guidance_scale),
            "X-Scheduler": body.scheduler,
            "X-Device": str(result.get("device", "")),
            "X-Generation-Time": f"{result.get('timings', {}).get('total_s', 0.0):.2f}s",
            "Cache-Control": "no-store",
            "X-Job-Id": job_id,
        },
    )
