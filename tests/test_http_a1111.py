"""A1111's /sdapi/v1 on `sbrender serve`, driven by real clients: the `webuiapi`
package, and httpx replays of Open WebUI's and SillyTavern's exact call sequences
(background: shared/background/http-api.md section 3), against a real uvicorn
process and a real daemon on the tiny-random model. One daemon, two servers
(the second with serve.max_queue 1) for the module."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import webuiapi
from PIL import Image

from conftest import DaemonProcess, Spool, daemon_env, wait_for
from http_helpers import ServeProcess
from sbrender.models import BUILTINS, ensure_builtin

pytestmark = pytest.mark.xdist_group("http-a1111")

SMALL = {"width": 64, "height": 64, "steps": 3}


class Live:
    def __init__(self, spool: Spool, daemon: DaemonProcess, server: ServeProcess, limited: ServeProcess) -> None:
        self.spool, self.daemon, self.server, self.limited = spool, daemon, server, limited
        self.api = f"{server.url}/sdapi/v1"


@pytest.fixture(scope="module")
def live(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    spool = Spool(tmp_path_factory.mktemp("http-a1111"))
    # A second model to switch to: a diffusers folder (the tiny-random weights) in models_dir.
    models_dir = spool.root / "models"
    shutil.copytree(ensure_builtin(BUILTINS["tiny-random"], model_cache), models_dir / "painted")
    together = ",".join(f"slow-together-{k}=slow" for k in range(20))
    env = daemon_env(model_cache, SBRENDER_TEST_FAULTS=f"slow-block=slow,slow-full=slow,{together}",
                     SBRENDER_MODELS_DIR=str(models_dir))
    daemon = DaemonProcess(spool, env)
    server = ServeProcess(spool, env).wait_ready()
    limited = ServeProcess(spool, {**env, "SBRENDER_SERVE_MAX_QUEUE": "1"}).wait_ready()
    daemon.wait_ready()
    yield Live(spool, daemon, server, limited)
    assert server.stop() == 0, server.log_path.read_text()[-3000:]
    assert limited.stop() == 0, limited.log_path.read_text()[-3000:]
    assert daemon.stop() == 0, daemon.log_path.read_text()[-3000:]


def _png(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


# --- webuiapi -------------------------------------------------------------------------

def test_webuiapi_txt2img_batches_one_image_per_seed_in_order(live: Live) -> None:
    api = webuiapi.WebUIApi(baseurl=live.api, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red fox in snow", negative_prompt="blurry", seed=100, batch_size=2, n_iter=2,
                         cfg_scale=6.5, **SMALL)
    assert len(result.images) == 4 and all(image.size == (64, 64) for image in result.images)
    assert result.info["all_seeds"] == [100, 101, 102, 103] and result.info["seed"] == 100
    assert result.info["sampler_name"] == "Euler a" and result.info["cfg_scale"] == 6.5
    for seed, (text, image) in zip(range(100, 104), zip(result.info["infotexts"], result.images)):
        assert text.startswith("a red fox in snow\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
        assert f"Seed: {seed}," in text
        assert image.info["parameters"] == text  # the PNG's own infotext
    assert result.parameters["prompt"] == "a red fox in snow" and result.parameters["batch_size"] == 2


def test_webuiapi_discovery_and_options(live: Live) -> None:
    api = webuiapi.WebUIApi(baseurl=live.api)
    assert api.util_get_model_names() == ["painted", "tiny-random"]
    assert api.util_get_current_model() == "tiny-random"
    api.util_set_model("tiny-random")  # the same model: accepted, nothing changes
    assert api.get_options()["sd_model_checkpoint"] == "tiny-random"
    assert "DPM++ 2M" in api.util_get_sampler_names() and "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names() and "automatic" in api.util_get_scheduler_names()
    assert api.get_loras() == [] and api.get_upscalers() == [] and api.get_hypernetworks() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    api.util_wait_for_ready(check_interval=0.1)
    assert api.get_progress()["state"]["job_count"] == 0
    # Every route asked, renders done: the front never loaded PyTorch (it runs on web hosts).
    maps = Path(f"/proc/{live.server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps


def test_webuiapi_img2img(live: Live) -> None:
    api = webuiapi.WebUIApi(baseurl=live.api)
    source = Image.new("RGB", (64, 64), (200, 40, 40))
    result = api.img2img(images=[source], prompt="a red square, painted", denoising_strength=0.5, seed=9, **SMALL)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [9] and "Seed: 9," in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not sent back, as A1111


def test_webuiapi_switches_models_as_a1111_does(live: Live) -> None:
    api = webuiapi.WebUIApi(baseurl=live.api)
    try:
        api.util_set_model("painted")
        assert api.util_get_current_model() == "painted"
        result = api.txt2img(prompt="a lighthouse", seed=21, **SMALL)
        assert result.info["sd_model_name"] == "painted" and "Model: painted" in result.info["infotexts"][0]
    finally:
        api.util_set_model("tiny-random")
    assert api.get_options()["sd_model_checkpoint"] == "tiny-random"
    # One request's override_settings pick a model for that request only.
    r = httpx.post(f"{live.api}/txt2img", json={"prompt": "x", "seed": 1, **SMALL,
                                                "override_settings": {"sd_model_checkpoint": "painted [0123abcd]"}},
                   timeout=120)
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "painted"
    assert api.get_options()["sd_model_checkpoint"] == "tiny-random"


def test_sd_vae_override_is_passed_on(live: Live) -> None:
    r = httpx.post(f"{live.api}/txt2img", json={"prompt": "own vae", "override_settings": {"sd_vae": "None"},
                                                **SMALL}, timeout=120)
    assert r.status_code == 200, r.text


# --- A1111 semantics clients rely on ------------------------------------------------------

def test_null_means_default_unknown_fields_and_samplers_are_ignored(live: Live) -> None:
    body = {"prompt": "defaults", "negative_prompt": None, "steps": None, "cfg_scale": None, "width": None,
            "height": None, "seed": None, "sampler_name": "Some Future Sampler", "scheduler": "nonsense",
            "batch_size": None, "n_iter": None, "styles": None, "override_settings": None,
            "alwayson_scripts": {}, "url": "http://localhost:7860", "auth": "", "save_images": True}
    r = httpx.post(f"{live.api}/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["steps"] == 3 and (info["width"], info["height"]) == (64, 64)
    assert info["extra_generation_params"]["Schedule type"] == "Karras"
    assert len(r.json()["images"]) == 1 and isinstance(info["seed"], int)
    legacy = httpx.post(f"{live.api}/txt2img", json={"prompt": "x", "sampler_index": "DPM++ 2M Karras", "seed": "",
                                                     **SMALL}, timeout=120)
    assert legacy.status_code == 200 and json.loads(legacy.json()["info"])["sampler_name"] == "DPM++ 2M"


def test_bad_a1111_requests_get_a1111_shaped_errors(live: Live) -> None:
    wrong_type = httpx.post(f"{live.api}/txt2img", json={"prompt": "x", "steps": "many"})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["loc"] == ["body", "steps"]
    too_many = httpx.post(f"{live.api}/txt2img", json={"prompt": "x", "batch_size": 8, "n_iter": 8})
    assert too_many.status_code == 422 and "count" in too_many.json()["detail"]
    no_init = httpx.post(f"{live.api}/img2img", json={"prompt": "x"})
    assert no_init.status_code == 404 and "Init image not found" in no_init.json()["detail"]
    script = httpx.post(f"{live.api}/txt2img", json={"prompt": "x", "script_name": "x/y/z plot"})
    assert script.status_code == 422
    unknown_model = httpx.post(f"{live.api}/options", json={"sd_model_checkpoint": "sdxl_base [abc]"})
    assert unknown_model.status_code == 400 and "not found" in unknown_model.json()["detail"]
    assert httpx.get(f"{live.api}/nothing-here").json() == {"detail": "Not Found"}


# --- Open WebUI's sequence (backend/open_webui/routers/images.py) ---------------------------

def test_open_webui_sequence(live: Live) -> None:
    headers = {"authorization": ""}  # get_automatic1111_api_auth() with no auth configured
    with httpx.Client(base_url=live.api, headers=headers, timeout=None) as web:
        assert web.get("/options").is_success  # verify_url
        models = web.get("/sd-models").json()  # get_models
        assert [(m["title"], m["model_name"]) for m in models] == [("tiny-random", "tiny-random"),
                                                                   ("painted", "painted")]
        options = web.get("/options").json()  # set_image_model: the same model, nothing posted
        assert options["sd_model_checkpoint"] == models[0]["title"]
        echoed = web.post("/options", json={**options, "sd_model_checkpoint": models[0]["title"]})
        assert echoed.status_code == 200 and echoed.json() is None  # the whole dict echoed: accepted
        assert web.get("/options").json()["sd_model_checkpoint"] == "tiny-random"  # get_image_model
        r = web.post("/txt2img", json={"prompt": "a watercolor of a harbour", "batch_size": 2, "width": 64,
                                       "height": 64, "steps": 3, "negative_prompt": "text",
                                       "cfg_scale": 7, "sampler_name": "Euler", "scheduler": "Karras"})
        assert r.status_code == 200, r.text
        images = r.json()["images"]
        assert len(images) == 2 and all(_png(b).size == (64, 64) for b in images)
        assert isinstance(r.json()["info"], str)
        info = json.loads(r.json()["info"])
        assert info["infotexts"][1].endswith(f"Seed: {info['all_seeds'][1]}, Size: 64x64, Model: tiny-random")


# --- SillyTavern's sequence (src/endpoints/stable-diffusion.js) ------------------------------

def test_sillytavern_sequence(live: Live) -> None:
    headers = {"Authorization": "Basic"}  # 'Basic ' + btoa(''), as fetch sends it (trimmed)
    with httpx.Client(base_url=live.api, headers=headers, timeout=None) as st:
        assert st.get("/options").is_success  # ping
        titles = [m["title"] for m in st.get("/sd-models").json()]
        assert [s["name"] for s in st.get("/samplers").json()][:1] and st.get("/schedulers").json()
        assert st.get("/sd-vae").json() == [] and st.get("/upscalers").json() == []
        assert st.get("/latent-upscale-modes").json() == []
        assert st.post("/options", json={"sd_model_checkpoint": titles[0]}).status_code == 200  # set-model
        for _ in range(10):  # then poll progress until idle
            progress = st.get("/progress").json()
            if progress["progress"] == 0 and progress["state"]["job_count"] == 0:
                break
        else:
            raise AssertionError(f"never idle: {progress}")
        assert "forge_preset" not in st.get("/options").json()
        body = {"url": "http://127.0.0.1:7860", "auth": "", "prompt": "a knight, (masterpiece:1.2)",
                "negative_prompt": "lowres", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 3,
                "cfg_scale": 7, "width": 64, "height": 64, "enable_hr": False, "hr_scale": 2.0,
                "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "denoising_strength": 0.7,
                "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"},
                "override_settings_restore_afterwards": True, "clip_skip": 2, "save_images": True,
                "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False}
        r = st.post("/txt2img", json=body)  # seed omitted: random
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        assert _png(r.json()["images"][0]).size == (64, 64)


def test_interrupt_stops_only_the_callers_own_job(live: Live) -> None:
    # A slow job ahead keeps ours queued while the interrupts arrive.
    blocker = httpx.post(f"{live.server.url}/v1/jobs", json={"id": "slow-block", "prompt": "ahead", "steps": 5})
    assert blocker.status_code == 202
    mine = httpx.Client(base_url=live.api, timeout=None,
                        transport=httpx.HTTPTransport(local_address="127.0.0.2"))  # another caller's address
    theirs = httpx.Client(base_url=live.api, timeout=None)
    with ThreadPoolExecutor(1) as pool, mine, theirs:
        waiting = pool.submit(mine.post, "/txt2img", json={"prompt": "mine", "seed": 1, **SMALL})
        wait_for(lambda: _queue(live) >= 2)
        assert theirs.post("/interrupt", json={}).json() == {}  # someone else's interrupt: no effect on mine
        # The interrupt has answered, so any cancel it asked for is already recorded.
        assert not list((live.spool.state / "cancel").glob("*")) and not waiting.done()
        assert mine.post("/interrupt").json() == {}
        answer = waiting.result(timeout=120)
    assert answer.status_code == 500 and answer.json()["error"] == "cancelled"
    httpx.delete(f"{live.server.url}/v1/jobs/slow-block")
    wait_for(lambda: (live.spool.outbox / "slow-block.json").exists(), 120)


def _queue(live: Live) -> int:
    return int(httpx.get(f"{live.api}/progress").json()["queue"])


def test_queue_limit_holds_for_requests_arriving_together(live: Live) -> None:
    """20 requests at once to a front with serve.max_queue 1: one is queued, 19 get
    429 (a place is taken before the submit is awaited, not after)."""
    import asyncio

    url = live.limited.url

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(*(client.post(f"{url}/v1/jobs", json={
                "id": f"slow-together-{k}", "prompt": "all at once", "steps": 5}) for k in range(20)))
        return [a.status_code for a in answers]

    codes = asyncio.run(burst())
    try:
        assert sorted(codes) == [202] + [429] * 19, codes
    finally:
        accepted = [f"slow-together-{k}" for k, code in enumerate(codes) if code == 202]
        for job_id in accepted:
            httpx.delete(f"{url}/v1/jobs/{job_id}")
        for job_id in accepted:
            wait_for(lambda job_id=job_id: httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "cancelled", 120)


def test_queue_limit_answers_429_with_retry_after(live: Live) -> None:
    url = live.limited.url
    first = httpx.post(f"{url}/v1/jobs", json={"id": "slow-full", "prompt": "fills the queue", "steps": 5})
    assert first.status_code == 202
    try:
        refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "one too many"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["content-type"] == "application/problem+json"
        a1111 = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "one too many"})
        assert a1111.status_code == 429 and a1111.json()["error"] == "queue_full"
        old = httpx.post(f"{url}/generate", json={"prompt": "one too many"})
        assert old.status_code == 429 and old.json()["error"] == "QueueFull" and old.json()["code"] == 429
    finally:
        httpx.delete(f"{url}/v1/jobs/slow-full")
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/slow-full").json()["status"] == "cancelled", 120)
    # The queue has room again once the job is finished.
    assert wait_for(lambda: httpx.post(f"{url}/v1/jobs", json={"prompt": "room again", **{"steps": 1}})
                    .status_code == 202)


