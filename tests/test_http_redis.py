"""`sbrender serve` on a Redis queue: the same APIs when the jobs go through Redis
(the front holds no folder of the queue; images come from the daemon's outbox,
shared here as a volume would be)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Spool, daemon_env
from http_helpers import ServeProcess
from sbrender.redisqueue import job_key

pytestmark = pytest.mark.xdist_group("http-redis")


def test_the_apis_over_a_redis_queue(spool: Spool, start_daemon: Any, redis_server: Any, model_cache: Path) -> None:
    env = daemon_env(model_cache, SBRENDER_QUEUE=redis_server.url)
    server = ServeProcess(spool, env).wait_ready()
    try:
        start_daemon(spool, SBRENDER_QUEUE=redis_server.url)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            r = http.post("/v1/jobs", json={"id": "on-redis", "prompt": "a cat", "seed": 4},
                          headers={"Prefer": "wait=60"})
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "succeeded" and r.json()["images"][0]["seed"] == 4
            png = http.get("/v1/jobs/on-redis/images/1")
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            assert redis_server.client().hget(job_key("on-redis"), "state") == "succeeded"
            again = http.post("/v1/jobs", json={"id": "on-redis", "prompt": "a cat", "seed": 4})
            assert again.status_code == 200  # idempotent on Redis too
            a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a dog", "seed": 8, "batch_size": 2})
            assert a1111.status_code == 200, a1111.text
            assert json.loads(a1111.json()["info"])["all_seeds"] == [8, 9]
            assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in a1111.json()["images"])
            listed = http.get("/v1/jobs", params={"state": "succeeded"}).json()
            assert "on-redis" in [j["id"] for j in listed["jobs"]]
            with http.stream("GET", "/v1/jobs/on-redis/events") as events:
                text = "".join(events.iter_text())
            assert "event: succeeded" in text
    finally:
        assert server.stop() == 0, server.log_path.read_text()[-3000:]
