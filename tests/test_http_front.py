"""`sbrender serve`, end to end: a real uvicorn process over a real spool, a real
daemon on the tiny-random model behind it, driven over real sockets with httpx.

The old server's contract (its own smoke checks), the job API (202 + Location,
idempotency, long-poll, SSE from a live connection, cancel, images by URL), and
hostile requests. One daemon and one server serve the whole module."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import DaemonProcess, Spool, daemon_env, wait_for
from http_helpers import ServeProcess, run_serve
from sbrender.client import Client
from sbrender.web.pngtext import text_chunks

pytestmark = pytest.mark.xdist_group("http-front")


class Live:
    def __init__(self, spool: Spool, daemon: DaemonProcess, server: ServeProcess) -> None:
        self.spool, self.daemon, self.server = spool, daemon, server
        self.http = httpx.Client(base_url=server.url, timeout=120)


@pytest.fixture(scope="module")
def live(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    spool = Spool(tmp_path_factory.mktemp("http-front"))
    # "slow-*" jobs (by id) step slowly, 2 s a step (SSE progress, cancel); the old server's minimum size
    # (256) and steps (5) are dearer on the tiny model than the suite's 64 px, 3 steps.
    env = daemon_env(model_cache, SBRENDER_TEST_FAULTS="slow-sse=slow,slow-cancel=slow,slow-block=slow")
    daemon = DaemonProcess(spool, env)
    server = ServeProcess(spool, env).wait_ready()
    daemon.wait_ready()
    live = Live(spool, daemon, server)
    yield live
    live.http.close()
    assert server.stop() == 0, server.log_path.read_text()[-3000:]
    assert daemon.stop() == 0, daemon.log_path.read_text()[-3000:]


# --- the old server's contract (its smoke script's checks, and more) -------------------

def test_root_and_health(live: Live) -> None:
    root = live.http.get("/")
    assert root.status_code == 200
    assert root.json()["service"] == "Semantic Bit GPU Server"
    assert set(root.json()["endpoints"]) == {"/generate", "/health", "/docs"}
    health = wait_for(lambda: (r := live.http.get("/health").json())["model_loaded"] and r)
    assert health["status"] == "healthy"
    info = health["generator_info"]
    assert info["model_id"] == "tiny-random" and info["device"] == "cpu" and info["model_loaded"] is True
    assert info["defaults"] == {"steps": 3, "guidance_scale": 7.0, "height": 64, "width": 64}


def test_generate_returns_the_png_with_the_old_headers(live: Live) -> None:
    body = {"prompt": "a red apple on a white table", "num_inference_steps": 5, "guidance_scale": 7.0,
            "height": 256, "width": 256, "seed": 42, "scheduler": "dpmsolver++"}
    r = live.http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "42" and r.headers["x-steps"] == "5" and r.headers["x-guidance"] == "7.0"
    assert r.headers["x-scheduler"] == "dpmsolver++" and r.headers["x-device"] == "cpu"
    assert r.headers["x-generation-time"].endswith("s") and float(r.headers["x-generation-time"][:-1]) > 0
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-disposition"] == "inline; filename=generated.png"
    assert r.content.startswith(b"\x89PNG") and len(r.content) > 1000
    text = text_chunks(r.content)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text["parameters"] and "Seed: 42" in text["parameters"]
    # The job went through the queue like any other: its result is in the outbox.
    result = json.loads((live.spool.outbox / f"{r.headers['x-job-id']}.json").read_text())
    assert result["params"]["steps"] == 5 and result["params"]["sampler"] == "DPM++ 2M"


def test_same_seed_same_bytes_and_euler_ancestral(live: Live) -> None:
    body = {"prompt": "a small cactus in a terracotta pot", "seed": 999, "num_inference_steps": 5,
            "width": 256, "height": 256, "scheduler": "euler_ancestral"}
    first = live.http.post("/generate", json=body)
    second = live.http.post("/generate", json=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.headers["x-job-id"] != second.headers["x-job-id"]  # two jobs, one image
    assert "Sampler: Euler a" in text_chunks(first.content)["parameters"]
    random_seed = live.http.post("/generate", json={**body, "seed": None})
    assert random_seed.status_code == 200 and random_seed.headers["x-seed"].isdigit()


@pytest.mark.parametrize("body, loc", [
    ({"prompt": "test", "num_inference_steps": 2}, ["body", "num_inference_steps"]),
    ({"prompt": "test", "height": 513}, ["body", "height"]),
    ({"prompt": ""}, ["body", "prompt"]),
    ({"prompt": "x", "scheduler": "ddim"}, ["body", "scheduler"]),
    ({"prompt": "x", "guidance_scale": 12.5}, ["body", "guidance_scale"]),
    ({"negative_prompt": "no prompt"}, ["body", "prompt"]),
])
def test_generate_validation_errors_use_the_old_envelope(live: Live, body: dict[str, Any], loc: list[str]) -> None:
    r = live.http.post("/generate", json=body)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["error"] == "ValidationError" and data["code"] == 422
    assert data["detail"] == "Request validation failed"
    assert data["meta"]["errors"][0]["loc"] == loc


# --- the job API ------------------------------------------------------------------------

def test_post_job_202_location_then_result_and_images(live: Live) -> None:
    r = live.http.post("/v1/jobs", json={"prompt": "a lighthouse", "seed": 7, "count": 2,
                                         "metadata": {"order": 42}})
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    job_id = r.json()["id"]
    assert location == f"/v1/jobs/{job_id}"
    done = live.http.get(location, params={"wait": 60}).json()
    assert done["status"] == "succeeded" and done["metadata"] == {"order": 42}
    assert "input" not in done and "location" not in done["model"]  # no paths of this host
    assert [i["seed"] for i in done["images"]] == [7, 8]
    for image in done["images"]:
        png = live.http.get(image["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert hashlib.sha256(png.content).hexdigest() == image["sha256"]
    assert live.http.get(f"{location}/images/3").status_code == 404
    assert live.http.get(f"{location}/images/0").status_code == 404
    listed = live.http.get("/v1/jobs", params={"state": "succeeded"}).json()
    assert job_id in [j["id"] for j in listed["jobs"]] and all(j["state"] == "succeeded" for j in listed["jobs"])
    assert live.http.get("/v1/jobs", params={"state": "nonsense"}).status_code == 422


def test_prefer_wait_answers_with_the_result(live: Live) -> None:
    r = live.http.post("/v1/jobs", json={"prompt": "a quick one", "seed": 1}, headers={"Prefer": "wait=60"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"


def test_idempotency_key_and_id(live: Live) -> None:
    body = {"prompt": "once only", "seed": 5}
    first = live.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77/retry"})
    again = live.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77/retry"})
    assert first.status_code == 202 and again.status_code in (200, 202)
    assert first.json()["id"] == again.json()["id"] and first.json()["id"].startswith("key-")
    other = live.http.post("/v1/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": "order-77/retry"})
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    by_id = live.http.post("/v1/jobs", json={**body, "id": "http-idem-1"})
    assert by_id.status_code == 202 and by_id.json()["id"] == "http-idem-1"
    wait_for(lambda: live.http.get("/v1/jobs/http-idem-1").json()["status"] == "succeeded")
    repeat = live.http.post("/v1/jobs", json={**body, "id": "http-idem-1"})
    assert repeat.status_code == 200 and repeat.json()["status"] == "succeeded"
    clash = live.http.post("/v1/jobs", json={"prompt": "something else", "id": "http-idem-1"})
    assert clash.status_code == 409
    # Nothing was queued twice: one result for the id, none for a .dup.
    assert not list(live.spool.outbox.glob("http-idem-1.dup*"))


def test_bad_job_is_a_problem_naming_the_field(live: Live) -> None:
    r = live.http.post("/v1/jobs", json={"prompt": "x", "steps": 100000})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == "steps" and "steps" in r.json()["detail"]
    assert live.http.post("/v1/jobs", json={"prompt": "x", "colour": "red"}).json()["field"] == "colour"
    assert live.http.post("/v1/jobs", json=["not", "a", "job"]).status_code == 422
    assert live.http.get("/v1/jobs/no-such-job").status_code == 404


def _sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in event:
                yield event
            event = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            event[name] = value.strip()


def test_sse_progress_from_a_live_connection_and_resume(live: Live) -> None:
    r = live.http.post("/v1/jobs", json={"id": "slow-sse", "prompt": "slow steps", "steps": 4, "seed": 3})
    assert r.status_code == 202
    seen = []
    with live.http.stream("GET", "/v1/jobs/slow-sse/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for event in _sse(stream):
            seen.append(event)
            if event["event"] in ("succeeded", "failed", "cancelled"):
                break
    names = [e["event"] for e in seen]
    assert names[-1] == "succeeded", seen
    assert "started" in names and "progress" in names
    steps = [json.loads(e["data"])["step"] for e in seen if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] <= 4
    ids = [int(e["id"]) for e in seen]
    assert ids == sorted(ids)
    final = json.loads(seen[-1]["data"])
    assert final["images"][0]["url"] == "/v1/jobs/slow-sse/images/1"
    # Reconnecting after the last progress event: only the end is sent.
    with live.http.stream("GET", "/v1/jobs/slow-sse/events", headers={"Last-Event-ID": str(ids[-2])}) as stream:
        again = list(_sse(stream))
    assert [e["event"] for e in again] == ["succeeded"]


def test_delete_cancels_and_a_finished_job_is_409(live: Live) -> None:
    r = live.http.post("/v1/jobs", json={"id": "slow-cancel", "prompt": "to be cancelled", "steps": 30})
    assert r.status_code == 202
    wait_for(lambda: (live.http.get("/v1/jobs/slow-cancel").json().get("progress") or {}).get("state") == "running")
    d = live.http.delete("/v1/jobs/slow-cancel")
    assert d.status_code == 202
    done = live.http.get("/v1/jobs/slow-cancel", params={"wait": 60}).json()
    assert done["status"] == "cancelled"
    assert live.http.delete("/v1/jobs/slow-cancel").status_code == 409
    assert live.http.delete("/v1/jobs/never-was").status_code == 404


def test_a_client_that_disconnects_does_not_lose_its_job(live: Live) -> None:
    # Queued behind a slow job, the request is still waiting when its client leaves.
    assert live.http.post("/v1/jobs", json={"id": "slow-block", "prompt": "ahead", "steps": 2}).status_code == 202
    body = {"prompt": "slow but wanted", "seed": 11, "num_inference_steps": 5, "width": 256, "height": 256}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.server.url}/generate", json=body, timeout=0.5)
    client = Client(live.spool.inbox, live.spool.outbox, live.spool.state)
    wait_for(lambda: [j for j in client.jobs() if j.prompt == "slow but wanted" and j.state == "succeeded"],
             timeout=120)


def test_openapi_document(live: Live) -> None:
    spec = live.http.get("/openapi.json").json()
    for path in ("/generate", "/sdapi/v1/txt2img", "/v1/jobs", "/v1/jobs/{job_id}/events"):
        assert path in spec["paths"]
    assert live.http.get("/docs").status_code == 200


# --- hostile requests ---------------------------------------------------------------------

def test_hostile_requests_get_clear_4xx_and_the_server_goes_on(live: Live) -> None:
    url = live.server.url
    huge = b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{url}/v1/jobs", content=huge, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"a" * (1024 * 1024)
    r = httpx.post(f"{url}/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    bad_json = live.http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422
    as_text = live.http.post("/generate", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415 and as_text.json()["error"] == "UnsupportedMediaType"
    form = live.http.post("/sdapi/v1/txt2img", data={"prompt": "x"})
    assert form.status_code == 415
    cross = live.http.post("/sdapi/v1/interrupt", headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    fetch = live.http.post("/v1/jobs", json={"prompt": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403
    rebinding = live.http.get("/v1/jobs", headers={"Host": "evil.example:7860"})
    assert rebinding.status_code == 421
    same_origin = live.http.get("/sdapi/v1/options", headers={"Origin": url})
    assert same_origin.status_code == 200
    traversal = live.http.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd/images/1")
    assert traversal.status_code == 404
    url_image = live.http.post("/sdapi/v1/img2img",
                               json={"prompt": "x", "init_images": ["http://169.254.169.254/x"]})
    assert url_image.status_code == 422 and "never fetched" in url_image.json()["detail"]
    path_image = live.http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["/etc/passwd"]})
    assert path_image.status_code == 422
    assert live.http.get("/health").status_code == 200  # still serving


def _unfinished(url: str, headers: dict[str, str]) -> int:
    return int(httpx.get(f"{url}/sdapi/v1/progress", headers=headers).json()["queue"])


def test_token_is_required_off_loopback(live: Live, model_cache: Path, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    refused = run_serve(spool, daemon_env(model_cache), "--host", "0.0.0.0")
    assert refused.returncode == 2 and "serve.token" in refused.stderr
    env = daemon_env(model_cache, SBRENDER_SERVE_TOKEN="s3cret-token-for-tests",
                     SBRENDER_SERVE_ALLOWED_ORIGINS="https://app.example")
    server = ServeProcess(spool, env, "--host", "127.0.0.1").wait_ready()
    try:
        url = server.url
        assert httpx.get(f"{url}/health").status_code == 200  # open, as on the old server
        missing = httpx.post(f"{url}/generate", json={"prompt": "x"})
        assert missing.status_code == 401 and missing.json() == {"detail": "Missing Authorization header"}
        wrong = httpx.post(f"{url}/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"detail": "Invalid API key"}
        # SillyTavern's empty credentials ('Basic ', trimmed as fetch sends it)
        a1111 = httpx.get(f"{url}/sdapi/v1/options", headers={"Authorization": "Basic"})
        assert a1111.status_code == 401 and a1111.headers["www-authenticate"].startswith("Basic")
        basic = base64.b64encode(b"webui:s3cret-token-for-tests").decode()
        assert httpx.get(f"{url}/sdapi/v1/options", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        # No daemon serves this spool: the old server's answer while its model loaded, nothing queued.
        unloaded = httpx.post(f"{url}/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret-token-for-tests"})
        assert unloaded.status_code == 503 and unloaded.json()["error"] == "ServiceUnavailable"
        assert not list(spool.inbox.glob("*.json"))
        # A queued job whose file is removed by hand: its waiter is told, its place is freed.
        auth = {"Authorization": "Bearer s3cret-token-for-tests"}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{url}/v1/jobs", json={"id": "removed-by-hand", "prompt": "x"},
                                  headers={**auth, "Prefer": "wait=60"}, timeout=90)
            job_file = spool.inbox / "removed-by-hand.json"
            wait_for(job_file.exists)
            job_file.unlink()
            gone = waiting.result(timeout=90)
        assert gone.status_code == 410 and "no longer queued" in gone.json()["detail"]
        assert _unfinished(url, auth) == 0
        # An allowed web origin gets CORS answers (preflight, then the real request); another gets 403.
        preflight = httpx.options(f"{url}/v1/jobs", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        listed = httpx.get(f"{url}/v1/jobs", headers={**auth, "Origin": "https://app.example"})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(f"{url}/v1/jobs", headers={**auth, "Origin": "https://other.example"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
        bearer = httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer s3cret-token-for-tests"})
        assert bearer.status_code == 200
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
    finally:
        assert server.stop() == 0
