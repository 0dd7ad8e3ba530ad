"""AUTOMATIC1111's ``/sdapi/v1``, as far as Open WebUI, SillyTavern, ``webuiapi``
and bots use it, over the queue.

As in A1111: ``null`` means the default, unknown fields are ignored, an unknown
sampler or schedule type falls back (to the configured default sampler, and to
Automatic), ``batch_size`` x ``n_iter`` images come back one per seed in order,
``info`` is a JSON string holding each image's infotext. Unlike A1111: images are
never fetched from URLs or read from paths, ``save_images``, scripts and
``alwayson_scripts`` are ignored, an ``interrupt`` stops only the caller's own
jobs (``front.caller_of``), and defaults are sbrender's configured ones.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .. import __version__, checkpoints, embeddings, loras, samplers
from ..client import RUNNING
from ..config import Settings
from ..errors import JobError
from .front import ClientGone, Front, caller_of
from .pngtext import text_chunks

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

# Lists clients ask for where sbrender has nothing: an empty answer spares them an error path.
EMPTY_LISTS = ("upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "realesrgan-models",
               "prompt-styles", "script-info", "extensions")
NULL_POSTS = ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings", "unload-checkpoint",
              "reload-checkpoint")


class Txt2Img(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img, the fields sbrender reads (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: Optional[str] = None  # noqa: UP045 - pydantic reads these at run time
    negative_prompt: Optional[str] = None  # noqa: UP045
    styles: Optional[list[str]] = None  # noqa: UP045
    seed: Optional[Union[int, str]] = None  # noqa: UP007, UP045
    subseed: Optional[Union[int, str]] = None  # noqa: UP007, UP045
    subseed_strength: Optional[float] = None  # noqa: UP045
    sampler_name: Optional[str] = None  # noqa: UP045
    sampler_index: Optional[str] = None  # noqa: UP045
    scheduler: Optional[str] = None  # noqa: UP045
    batch_size: Optional[int] = None  # noqa: UP045
    n_iter: Optional[int] = None  # noqa: UP045
    steps: Optional[int] = None  # noqa: UP045
    cfg_scale: Optional[float] = None  # noqa: UP045
    width: Optional[int] = None  # noqa: UP045
    height: Optional[int] = None  # noqa: UP045
    denoising_strength: Optional[float] = None  # noqa: UP045
    override_settings: Optional[dict[str, Any]] = None  # noqa: UP045
    enable_hr: Optional[bool] = None  # noqa: UP045
    script_name: Optional[str] = None  # noqa: UP045
    send_images: Optional[bool] = None  # noqa: UP045
    save_images: Optional[bool] = None  # noqa: UP045


class Img2Img(Txt2Img):
    init_images: Optional[list[str]] = None  # noqa: UP045
    resize_mode: Optional[int] = None  # noqa: UP045
    mask: Optional[str] = None  # noqa: UP045
    include_init_images: Optional[bool] = None  # noqa: UP045


class Options:
    """The few A1111 options that mean something here: which model and VAE new
    jobs use, and Clip skip. Global, as in A1111 (Open WebUI and SillyTavern set
    the model this way before generating). Models and VAEs are named as in jobs
    (``checkpoints``: the configured model, then ``models_dir`` and ``vae_dir``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = checkpoints.models_of(settings)
        self.vaes = checkpoints.vaes_of(settings)
        self.default_model = checkpoints.default_names(settings.model)[-1]  # the name its images carry
        self.checkpoint = self.default_model
        self.vae: str = settings["vae"]
        self.clip_skip: int = settings["defaults.clip_skip"]

    def model(self, title: str) -> str | None:
        """The job's ``model`` for an A1111 title or model name ("name [hash]" too);
        None for the configured model. Raises ``JobError`` for an unknown or unusable one."""
        found = self.models.find(title)
        if found is None or found.problem:
            known = ", ".join(c["title"] for c in self.checkpoints())
            raise JobError(f"model '{title}' not found; known models: {known}", field="sd_model_checkpoint")
        return None if found.kind == "default" else found.name

    def vae_name(self, name: str) -> str:
        found = self.vaes.find(name)
        if found is None or found.problem:
            known = ", ".join(["Automatic", "None", *(v["model_name"] for v in self.vae_files())])
            raise JobError(f"VAE '{name}' not found; known: {known}", field="sd_vae")
        return found.name

    def checkpoints(self) -> list[dict[str, Any]]:
        """A1111's sd-models: the configured model, then the usable ones of ``models_dir``.
        ``filename`` is the name, never a path on this host; no hash (a checkpoint's
        would be read whole here: `sbrender models` shows them)."""
        names = [self.default_model, *(e.name for e in self.models.entries() if not e.problem)]
        return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
                for n in dict.fromkeys(names)]

    def vae_files(self) -> list[dict[str, Any]]:
        return [{"model_name": e.name, "filename": e.name} for e in self.vaes.entries() if not e.problem]


def _seed(value: int | str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        seed = int(value)
    except ValueError:
        raise JobError(f"seed must be an integer, not {value!r}", field="seed") from None
    return None if seed < 0 else seed


def _sampler(body: Txt2Img, settings: Settings) -> tuple[str, str]:
    """A1111's rule: sampler_name, else sampler_index; an unknown one falls back to
    the default, an unknown schedule type (or one the sampler cannot take) to Automatic."""
    wanted = body.sampler_name or body.sampler_index
    try:
        sampler = samplers.canonical(wanted) if wanted else settings["defaults.sampler"]
    except KeyError:
        sampler = settings["defaults.sampler"]
    try:
        schedule = samplers.schedule(body.scheduler) if body.scheduler else "Automatic"
        samplers.resolve(sampler, schedule)
    except KeyError:
        schedule = "Automatic"
    return sampler, schedule


def to_job(body: Txt2Img, options: Options) -> dict[str, Any]:
    """The sbrender job an A1111 request asks for; ``None`` values take the defaults."""
    settings = options.settings
    if body.script_name:
        raise JobError(f"script {body.script_name!r} not found: sbrender runs no A1111 scripts", field="script_name")
    overrides = body.override_settings or {}
    sampler, schedule = _sampler(body, settings)
    for name, value in (("batch_size", body.batch_size), ("n_iter", body.n_iter)):
        if value is not None and value < 1:
            raise JobError(f"{name} must be at least 1, not {value}", field=name)
    count = (body.batch_size or 1) * (body.n_iter or 1)
    job: dict[str, Any] = {
        "prompt": body.prompt if body.prompt is not None else "",
        "negative_prompt": body.negative_prompt,
        "steps": body.steps, "guidance_scale": body.cfg_scale, "width": body.width, "height": body.height,
        "seed": _seed(body.seed), "count": count, "sampler": sampler, "scheduler": schedule,
        "clip_skip": overrides.get("CLIP_stop_at_last_layers") or options.clip_skip,
    }
    model = options.model(str(overrides.get("sd_model_checkpoint") or options.checkpoint))
    if model is not None:
        job["model"] = model
    vae = options.vae_name(str(overrides.get("sd_vae") or options.vae))
    if vae != settings["vae"]:
        job["vae"] = vae
    if isinstance(body, Img2Img):
        job.update(_img2img_fields(body))
    return job


def _img2img_fields(body: Img2Img) -> dict[str, Any]:
    if not body.init_images:
        raise JobError("Init image not found: init_images must hold one base64 image", field="init_images")
    if body.mask:
        raise JobError("inpainting (mask) is not supported by sbrender", field="mask")
    image = body.init_images[0]
    if image.lstrip()[:8].lower().startswith(("http:", "https:", "file:", "/")):
        raise JobError("init_images must be base64 image data; URLs and paths are never fetched", field="init_images")
    return {"init_image": image, "denoising_strength": body.denoising_strength, "resize_mode": body.resize_mode}


def _echo(body: Txt2Img) -> dict[str, Any]:
    echo = body.model_dump()
    if isinstance(body, Img2Img) and not body.include_init_images:
        echo["init_images"] = None  # as A1111: the images are not sent back
        echo["mask"] = None
    return echo


def _info(result: dict[str, Any], infotexts: list[str], batch_size: int) -> str:
    """A1111's ``Processed.js()``: what clients read from ``info``."""
    params = result.get("params", {})
    seeds = [image["seed"] for image in result.get("images", [])]
    model = result.get("model", {})
    info = {
        "prompt": params.get("prompt"), "all_prompts": [params.get("prompt")] * len(seeds),
        "negative_prompt": params.get("negative_prompt", ""),
        "all_negative_prompts": [params.get("negative_prompt", "")] * len(seeds),
        "seed": seeds[0] if seeds else None, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": params.get("width"), "height": params.get("height"),
        "sampler_name": params.get("sampler"), "cfg_scale": params.get("guidance_scale"),
        "steps": params.get("steps"), "batch_size": batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.get("name"), "sd_model_hash": model.get("hash") or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": params.get("denoising_strength"),
        "extra_generation_params": {"Schedule type": params.get("scheduler")},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": params.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": f"sbrender {__version__}", "job_id": result.get("id"),
    }
    return json.dumps(info, ensure_ascii=False)


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, "body": "", "errors": ""}, status)


async def _render(body: Txt2Img, request: Request) -> Any:
    front: Front = request.app.state.front
    options: Options = request.app.state.a1111
    try:
        # In a thread: an init image is decoded and checked, the model catalog may be read.
        job = await asyncio.to_thread(to_job, body, options)
        job_id = await front.submit(job, caller=caller_of(request), api="a1111")
    except JobError as err:
        status = 404 if err.message.startswith("Init image not found") else 422
        return _error(status, "invalid_job", str(err))
    try:
        result = await front.result_for(request, job_id)
    except ClientGone:
        return JSONResponse(None, 499)
    if result.get("status") != "succeeded":
        error = result.get("error") or {}
        return _error(500, str(error.get("type", "failed")), str(error.get("message", "the job failed")))
    pngs = await front.read_images(result)

    def encode() -> tuple[list[str], list[str]]:
        infotexts = [text_chunks(png).get("parameters", "") for png in pngs]
        return [base64.b64encode(png).decode("ascii") for png in pngs] if body.send_images is not False else [], \
            infotexts

    images, infotexts = await asyncio.to_thread(encode)
    return {"images": images, "parameters": _echo(body), "info": _info(result, infotexts, body.batch_size or 1)}


@router.post("/txt2img")
async def txt2img(body: Txt2Img, request: Request) -> Any:
    return await _render(body, request)


@router.post("/img2img")
async def img2img(body: Img2Img, request: Request) -> Any:
    return await _render(body, request)


@router.get("/progress")
async def progress(request: Request) -> dict[str, Any]:
    """The job rendering now among those sent through this server (as A1111: any
    caller's), and ``queue``, how many of them are not finished."""
    front: Front = request.app.state.front
    watcher = front.watcher
    running = [(job_id, watcher.progress[job_id]) for job_id in watcher.tracked
               if watcher.progress.get(job_id, {}).get("state") == RUNNING]
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    share, eta = 0.0, 0.0
    if running:
        job_id, now = running[0]
        step, steps = int(now.get("step", 0)), int(now.get("steps", 0)) or 1
        started = watcher.tracked[job_id].submitted
        share = min(1.0, 0.01 + step / steps)
        elapsed = time.time() - started
        eta = elapsed / share - elapsed
        state.update(job=job_id, job_count=1, job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
                     sampling_step=step, sampling_steps=steps)
    return {"progress": share, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None,
            "queue": watcher.outstanding()}


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Cancel the caller's own unfinished jobs (not everyone's, as A1111 would)."""
    front: Front = request.app.state.front
    for job_id in front.watcher.callers_jobs(caller_of(request), "a1111"):
        try:
            await asyncio.to_thread(front.client.cancel, job_id)
        except JobError:
            pass  # finished meanwhile
    return {}


@router.post("/skip")
async def skip() -> None:
    """A1111 skips the current image of a batch; sbrender renders a job's images together."""
    return None


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    options: Options = request.app.state.a1111
    return {"sd_model_checkpoint": options.checkpoint, "sd_checkpoint_hash": None, "sd_vae": options.vae,
            "CLIP_stop_at_last_layers": options.clip_skip, "samples_format": "png", "sd_checkpoints_limit": 1,
            "img2img_fix_steps": False, "enable_pnginfo": True}


@router.post("/options")
async def set_options(request: Request) -> Any:
    options: Options = request.app.state.a1111
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "invalid_json", "the body must be a JSON object")
    if body is None:
        return None
    if not isinstance(body, dict):
        return _error(422, "invalid_json", "the body must be a JSON object of options")
    try:
        if body.get("sd_model_checkpoint") is not None:
            options.checkpoint = options.model(str(body["sd_model_checkpoint"])) or options.default_model
        if body.get("sd_vae") is not None:
            options.vae = options.vae_name(str(body["sd_vae"]))
        if body.get("CLIP_stop_at_last_layers") is not None:
            options.clip_skip = int(body["CLIP_stop_at_last_layers"])
    except (JobError, ValueError, TypeError) as err:
        return _error(400, "invalid_option", str(err))
    return None


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(request.app.state.a1111.checkpoints)


@router.get("/sd-vae")
async def sd_vae(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(request.app.state.a1111.vae_files)


@router.get("/samplers")
async def sampler_list() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in samplers.names()]


@router.get("/schedulers")
async def scheduler_list() -> list[dict[str, Any]]:
    labels = {label: api for api, label in samplers.API_NAMES.items()}
    return [{"name": labels.get(label, label.lower()), "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for label in samplers.schedules()]


@router.get("/loras")
async def lora_list(request: Request) -> list[dict[str, Any]]:
    settings: Settings = request.app.state.front.settings

    def listing() -> list[dict[str, Any]]:
        return [{"name": f.name, "alias": f.alias or f.name, "path": f.name, "metadata": {}}
                for f in loras.scan(settings.loras_dir).files if not f.problem]

    return await asyncio.to_thread(listing)


@router.get("/embeddings")
async def embedding_list(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.front.settings

    def listing() -> dict[str, Any]:
        files = embeddings.scan(settings.embeddings_dir, settings.cache, 768)
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        return {"loaded": {f.name: {**entry, "shape": f.width, "vectors": f.vectors} for f in files if f.usable},
                "skipped": {f.name: {**entry, "shape": f.width, "vectors": f.vectors} for f in files if not f.usable}}

    return await asyncio.to_thread(listing)


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/cmd-flags")
async def cmd_flags() -> dict[str, Any]:
    return {}


def _empty_list() -> list[Any]:
    return []


def _null() -> None:
    return None


for _name in EMPTY_LISTS:
    router.add_api_route(f"/{_name}", _empty_list, methods=["GET"], name=_name)
for _name in NULL_POSTS:
    router.add_api_route(f"/{_name}", _null, methods=["POST"], name=_name)
