"""End to end on a Redis queue: the real service and dispatcher over RedisBroker
with a scripted renderer (in-process, fast), then real `sbrender run` daemons on
the tiny-random model, fed by `sbrender submit --wait` and the Client, killed
(SIGKILL) and paused past their lease (SIGSTOP, SIGCONT).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import DaemonProcess, Spool, daemon_env, sbrender, wait_for
from redis_server import RedisServer
from sbrender import redisqueue as rq
from sbrender.cli import main
from sbrender.client import Client
from sbrender.errors import JobError
from sbrender.config import load_settings
from sbrender.service import Service
from test_dispatcher import ScriptedRenderer


class Daemon:
    """A service over the Redis queue, running in a thread, with its own outbox."""

    def __init__(self, root: Path, url: str, renderer: ScriptedRenderer, **overrides: Any) -> None:
        self.outbox = root / "outbox"
        self.settings = load_settings(env={}, overrides={
            "queue": url, "inbox": str(root / "inbox"), "outbox": str(self.outbox), "state": str(root / "state"),
            "metrics_dir": "off", "defaults.width": 64, "defaults.height": 64, "defaults.steps": 2, **overrides})
        self.renderer = renderer
        self.service = Service(self.settings, renderer)
        self.thread = threading.Thread(target=self.service.run, name="redis-daemon-under-test")
        self.thread.start()
        assert self.service.ready.wait(20), "the service did not get ready"

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the service did not stop"


@pytest.fixture
def daemons(tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Daemon]]:
    monkeypatch.chdir(tmp_path)
    made: list[Daemon] = []

    def make(renderer: ScriptedRenderer | None = None, **overrides: Any) -> Daemon:
        made.append(Daemon(tmp_path / f"host{len(made)}", redis_server.url, renderer or ScriptedRenderer(),
                           **overrides))
        return made[-1]

    yield make
    for daemon in made:
        if daemon.thread.is_alive():
            daemon.stop()


def client_of(redis_server: RedisServer, outbox: Path) -> Client:
    return Client(outbox.parent / "inbox", outbox, queue=redis_server.url)


def job_field(server: RedisServer, job_id: str, name: str) -> str | None:
    return server.client().hget(rq.job_key(job_id), name)


def test_two_daemons_share_the_queue_and_publish_each_job_once(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    first, second = daemons(), daemons()
    client = client_of(redis_server, first.outbox)
    ids = [client.submit(f"job {k}", job_id=f"j{k:02d}", seed=k) for k in range(24)]
    results = {job_id: client.wait(job_id, timeout=60) for job_id in ids}
    assert all(r["status"] == "succeeded" for r in results.values())
    for job_id, result in results.items():
        homes = [d.outbox for d in (first, second) if (d.outbox / f"{job_id}.json").exists()]
        assert len(homes) == 1, f"{job_id} published by {len(homes)} daemons"
        on_disk = json.loads((homes[0] / f"{job_id}.json").read_text())
        assert on_disk == result, "the outbox JSON and the document kept in Redis are one result"
        png = (homes[0] / result["images"][0]["file"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == result["images"][0]["sha256"]
    assert first.renderer.calls and second.renderer.calls, "both daemons took jobs"


def test_status_lists_the_daemons_of_every_host_as_the_server_keeps_them(
        daemons: Callable[..., Daemon], redis_server: RedisServer, tmp_path: Path) -> None:
    """Each daemon's status is a key that expires DAEMON_TTL_S after its last
    heartbeat (the server's clock says who is alive, whatever the hosts' clocks and
    names); `sbrender status` on a third host, with no daemon of its own, lists both;
    a clean stop removes its key at once."""
    first, second = daemons(), daemons()
    server = redis_server.client()
    keys = wait_for(lambda: sorted(server.scan_iter(match=rq.daemon_key("*"))) if len(
        list(server.scan_iter(match=rq.daemon_key("*")))) == 2 else None, message="the daemons never published")
    assert all(0 < server.ttl(key) <= rq.DAEMON_TTL_S for key in keys)
    elsewhere = tmp_path / "web-host"
    env = {"SBRENDER_QUEUE": redis_server.url, "SBRENDER_INBOX": str(elsewhere / "inbox"),
           "SBRENDER_OUTBOX": str(elsewhere / "outbox"), "SBRENDER_STATE": str(elsewhere / "state")}
    shown = CliRunner().invoke(main, ["status", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    listed = json.loads(shown.output)
    assert listed["healthy"] is True
    assert sorted(d["consumer"] for d in listed["daemons"]) == sorted(
        d.service.broker.consumer for d in (first, second))
    assert {d["health"] for d in listed["daemons"]} == {"ok"} and {d["state"] for d in listed["daemons"]} == {"idle"}
    second.stop()
    assert [d["consumer"] for d in client_of(redis_server, first.outbox).daemons()] == [first.service.broker.consumer]


def test_a_running_job_cancelled_through_the_client_stops_and_the_next_renders(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    renderer = ScriptedRenderer(endless={"long"})
    daemon = daemons(renderer)
    client = client_of(redis_server, daemon.outbox)
    client.submit("never ends", job_id="long")
    client.submit("behind it", job_id="next")
    assert renderer.stepping.wait(20)
    client.submit("cancelled while queued", job_id="queued")
    assert client.cancel("queued") == "pending"
    assert client.wait("queued", timeout=30)["error"]["message"] == "cancelled before it started"
    assert renderer.calls == [["long"]], "cancelled out of turn, while the long render went on"
    assert client.cancel("long") == "running"
    cancelled = client.wait("long", timeout=30)
    assert cancelled["status"] == "cancelled" and cancelled["error"]["message"] == "cancelled while rendering"
    assert client.wait("next", timeout=30)["status"] == "succeeded"
    assert not redis_server.client().smembers(rq.CANCELS)


def test_a_daemon_that_loses_its_lease_stops_the_render_and_publishes_nothing(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    renderer = ScriptedRenderer(endless={"stolen"})
    daemon = daemons(renderer, **{"redis.lease_seconds": 0.6})
    client = client_of(redis_server, daemon.outbox)
    client.submit("taken away mid-render", job_id="stolen")
    assert renderer.stepping.wait(20)
    # Another daemon takes the entry over, as XAUTOCLAIM does after a lapsed lease.
    server = redis_server.client()
    key, eid = server.hmget(rq.job_key("stolen"), "stream", "entry")
    server.xclaim(key, rq.GROUP, "another-daemon", 0, [eid], justid=True)
    client.submit("after", job_id="after")
    assert client.wait("after", timeout=30)["status"] == "succeeded"
    assert not (daemon.outbox / "stolen.json").exists(), "nothing of a lost job is published"
    assert job_field(redis_server, "stolen", "state") == "running", "it belongs to the other daemon now"


def test_an_outage_of_redis_pauses_the_daemon_and_it_resumes_when_the_server_is_back(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    daemon = daemons()
    client = client_of(redis_server, daemon.outbox)
    client.submit("before", job_id="before")
    assert client.wait("before", timeout=30)["status"] == "succeeded"
    redis_server.kill()
    wait_for(lambda: daemon.service._problems, 30, "the outage was not noticed")
    assert "redis unreachable" in daemon.service._problems[0]
    redis_server.start()
    client = client_of(redis_server, daemon.outbox)
    client.submit("after", job_id="after")
    assert client.wait("after", timeout=30)["status"] == "succeeded"
    assert not daemon.service._problems


def test_a_daemon_started_before_its_server_waits_paused_and_serves_once_it_answers(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    redis_server.kill()
    daemon = daemons()
    wait_for(lambda: daemon.service._problems, 30, "the missing server was not noticed")
    assert daemon.service.status.data["state"] == "paused"
    redis_server.start()
    client = client_of(redis_server, daemon.outbox)
    client.submit("first job", job_id="first")
    assert client.wait("first", timeout=30)["status"] == "succeeded"


def test_run_once_renders_what_is_queued_and_dropped_then_stops(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={}, overrides={
        "queue": redis_server.url, "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "state": str(tmp_path / "state"), "metrics_dir": "off", "defaults.width": 64, "defaults.height": 64,
        "watch.settle_seconds": 0.1, "watch.rescan_seconds": 0.1})
    client = client_of(redis_server, settings.outbox)
    for k in range(3):
        client.submit(f"queued {k}", job_id=f"q{k}")
    settings.inbox.mkdir(parents=True)
    drop(settings.inbox, "dropped.yaml", "prompt: dropped\n")
    renderer = ScriptedRenderer()
    assert Service(settings, renderer).run(once=True) == 0
    assert sorted(ids for call in renderer.calls for ids in call) == ["dropped", "q0", "q1", "q2"]
    assert all(client.result(job_id)["status"] == "succeeded" for job_id in ("q0", "q1", "q2", "dropped"))


def drop(inbox: Path, name: str, text: str) -> None:
    """As a producer should: a hidden temp name, then a rename."""
    (inbox / f".{name}.tmp").write_text(text)
    os.rename(inbox / f".{name}.tmp", inbox / name)


def test_files_dropped_into_the_inbox_are_forwarded_with_the_file_spools_answers(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    daemon = daemons(**{"watch.settle_seconds": 0.2, "watch.rescan_seconds": 0.2})
    inbox, state = daemon.settings.inbox, daemon.settings.state
    client = client_of(redis_server, daemon.outbox)
    drop(inbox, "cat.yaml", "prompt: a cat\nseed: 3\npriority: 2\n")
    drop(inbox, "trio.yaml", "jobs:\n  - prompt: one\n  - prompt: two\n  - prompt: three\n    width: 65\n")
    (inbox / "target.txt").write_text("prompt: secret\n")
    os.symlink(inbox / "target.txt", inbox / "link.yaml")
    cat = client.wait("cat", timeout=30)
    assert cat["status"] == "succeeded" and cat["params"]["seed"] == 3 and cat["params"]["priority"] == 2
    assert [client.wait(f"trio-00{k}", timeout=30)["status"] for k in (1, 2, 3)] == ["succeeded", "succeeded",
                                                                                     "failed"]
    bad = client.wait("trio-003", timeout=30)["error"]
    assert bad["field"] == "width" and "multiple of 8" in bad["message"] and "job 3 of the batch" in bad["message"]
    link = client.wait("link", timeout=30)
    assert link["status"] == "failed" and link["error"]["type"] == "unsafe_file"
    assert json.loads((daemon.outbox / "link.json").read_text()) == link, "the outbox has the same answer"
    wait_for(lambda: (state / "done" / "cat.yaml").exists() and (state / "failed" / "trio.yaml").exists(), 30,
             "the forwarded files were not archived")
    drop(inbox, "cat.yaml", "prompt: another cat\n")
    dup = client.wait("cat.dup1", timeout=30)
    assert dup["status"] == "failed" and dup["error"]["type"] == "duplicate_id"
    assert client.result("cat") == cat, "the first job under the id stands"


class SlowRenderer(ScriptedRenderer):
    """Each step takes ``step_s``; ``started`` is set at a render's first step."""

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s
        self.started = threading.Event()

    def render_batch(self, items: Any, on_step: Any = None) -> Any:
        def slow_step(step: int, steps: int) -> bool:
            self.started.set()
            time.sleep(self.step_s)
            return bool(on_step and on_step(step, steps))

        return super().render_batch(items, slow_step)


def test_redis_killed_and_restarted_mid_render_the_job_is_published_once(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    renderer = SlowRenderer(0.05)
    daemon = daemons(renderer)
    client = client_of(redis_server, daemon.outbox)
    client.submit("rendering while the server dies", job_id="through", steps=40)
    assert renderer.started.wait(20)
    redis_server.kill()  # kill -9: what is acknowledged is in the AOF (fsync always here)
    wait_for(lambda: daemon.service._problems, 30, "the outage was not noticed")
    assert not (daemon.outbox / "through.json").exists(), "a result that cannot be fenced is not published"
    redis_server.start()
    result = client_of(redis_server, daemon.outbox).wait("through", timeout=60)
    assert result["status"] == "succeeded"
    assert json.loads((daemon.outbox / "through.json").read_text()) == result
    assert len(renderer.calls) == 2, "rendered again once the server was back, at once (its own entry)"
    assert job_field(redis_server, "through", "crashes") == "0"


def test_a_render_longer_than_the_lease_is_never_handed_to_a_second_daemon(
        daemons: Callable[..., Daemon], redis_server: RedisServer) -> None:
    slow, idle = SlowRenderer(0.05), ScriptedRenderer()
    first = daemons(slow, **{"redis.lease_seconds": 0.5})
    client = client_of(redis_server, first.outbox)
    client.submit("four leases long", job_id="long", steps=40)  # 2 s of steps
    assert slow.started.wait(20)
    second = daemons(idle, **{"redis.lease_seconds": 0.5})  # looks for lapsed leases every 0.125 s
    result = client.wait("long", timeout=60)
    assert result["status"] == "succeeded" and (first.outbox / "long.json").exists()
    assert slow.calls == [["long"]] and idle.calls == [], "rendered once, by its first daemon"
    assert job_field(redis_server, "long", "attempts") == "1"
    second.stop()


def test_jobs_show_progress_and_retry_read_the_redis_queue(
        daemons: Callable[..., Daemon], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = ScriptedRenderer(endless={"long"}, poison={"bad"})
    daemon = daemons(renderer)
    client = client_of(redis_server, daemon.outbox)
    client.submit("never ends", job_id="long", steps=7)
    assert renderer.stepping.wait(20)
    client.submit("waits", job_id="waiting", metadata={"row": 1})
    wait_for(lambda: client.progress("long").get("step", 0) >= 1, 20, "no step recorded in Redis")
    assert client.progress("long")["steps"] == 7 and client.progress("waiting") == {"state": "pending"}
    assert [(j.id, j.state) for j in client.jobs()] == [("long", "running"), ("waiting", "pending")]
    shown = client.show("waiting")
    assert shown is not None and shown["status"] == "pending" and shown["params"]["prompt"] == "waits"
    assert shown["metadata"] == {"row": 1} and client.show("nope") is None
    client.submit("fails", job_id="bad")
    client.cancel("long")
    assert client.wait("bad", timeout=30)["status"] == "failed"
    with pytest.raises(JobError, match="only a failed or cancelled job"):
        client.retry("waiting")
    assert client.retry("bad") == "bad" and client.progress("bad")["state"] in ("pending", "running", "failed")
    assert client.wait("bad", timeout=30)["status"] == "failed"
    assert renderer.calls.count(["bad"]) == 2, "retried: rendered again"
    assert redis_server.client().llen(rq.job_key("bad") + ":retried") == 1
    monkeypatch.setenv("SBRENDER_QUEUE", redis_server.url)
    listed = CliRunner().invoke(main, ["jobs", "--json", "--outbox", str(daemon.outbox)])
    assert listed.exit_code == 0, listed.output
    assert {j["id"]: j["state"] for j in json.loads(listed.output)} == {
        "long": "cancelled", "waiting": "succeeded", "bad": "failed"}


# --- real daemon processes ------------------------------------------------------------------------

@pytest.fixture
def redis_spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def start_daemon(model_cache: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """`sbrender run` processes; at the end, each one not killed by the test must stop with 0."""
    started: list[DaemonProcess] = []

    def start(spool: Spool, **env: str) -> DaemonProcess:
        daemon = DaemonProcess(spool, daemon_env(model_cache, **env))
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        killed = daemon.proc.poll() == -signal.SIGKILL
        code = daemon.stop()
        assert killed or code == 0, f"daemon exited {code}:\n{daemon.log_path.read_text()[-4000:]}"


def _consumer(server: RedisServer, job_id: str) -> str:
    return job_field(server, job_id, "owner") or ""


@pytest.mark.e2e
def test_a_daemon_renders_a_job_from_submit_wait(start_daemon: Any, redis_spool: Spool, model_cache: Path,
                                                 redis_server: RedisServer) -> None:
    start_daemon(redis_spool, SBRENDER_QUEUE=redis_server.url)
    env = daemon_env(model_cache, SBRENDER_QUEUE=redis_server.url)
    done = sbrender("submit", "a cat on a mat", "--id", "cat", "--seed", "5", "--wait", "--json",
                    *redis_spool.cli_args(), env=env, cwd=redis_spool.root, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and result["params"]["seed"] == 5
    png = (redis_spool.outbox / "cat.png").read_bytes()
    assert hashlib.sha256(png).hexdigest() == result["images"][0]["sha256"]
    assert json.loads((redis_spool.outbox / "cat.json").read_text()) == result
    again = sbrender("submit", "a cat on a mat", "--id", "cat", "--seed", "5", *redis_spool.cli_args(),
                     env=env, cwd=redis_spool.root)
    assert again.returncode == 0, "a re-submit of one job by id is safe"
    other = sbrender("submit", "a dog", "--id", "cat", *redis_spool.cli_args(), env=env, cwd=redis_spool.root)
    assert other.returncode == 1 and "already in use" in other.stderr
    redis_spool.drop("dropped.yaml", "prompt: a file dropped into the inbox\nseed: 9\n")
    waited = sbrender("wait", "dropped", "--json", "--timeout", "120", *redis_spool.cli_args(), env=env,
                      cwd=redis_spool.root, timeout=150)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["params"]["seed"] == 9
    assert (redis_spool.outbox / "dropped.png").exists()


def _started(server: RedisServer, job_id: str, daemon: DaemonProcess) -> bool:
    """The job is running, held by this daemon (its consumer name starts with its owner name)."""
    return job_field(server, job_id, "state") == "running" and _consumer(server, job_id).startswith(
        daemon.owner + "-")


def _one_result(spool: Spool, client: Client, job_id: str) -> dict[str, Any]:
    result = client.wait(job_id, timeout=120)
    assert result["status"] == "succeeded", result
    assert json.loads((spool.outbox / f"{job_id}.json").read_text()) == result
    for image in result["images"]:
        data = (spool.outbox / image["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert sorted(p.name for p in spool.outbox.iterdir() if p.name.startswith(job_id)) == \
        sorted([f"{job_id}.json", *(i["file"] for i in result["images"])]), "no partial or extra file"
    return result


def _rendering(start_daemon: Any, spool: Spool, server: RedisServer, job_id: str) -> tuple[dict[str, str], Any,
                                                                                         Client]:
    """A daemon on a 2 s lease rendering ``job_id`` slowly: its env, the daemon and a client."""
    env = {"SBRENDER_QUEUE": server.url, "SBRENDER_REDIS_LEASE_SECONDS": "2", "SBRENDER_TEST_FAULTS": f"{job_id}=slow"}
    first = start_daemon(spool, **env)
    client = Client(spool.inbox, spool.outbox, queue=server.url)
    client.submit(f"{job_id} mid-render", job_id=job_id, steps=2)
    wait_for(lambda: _started(server, job_id, first), message="the first daemon never started it")
    return env, first, client


@pytest.mark.e2e
def test_a_daemon_killed_mid_render_leaves_the_job_to_another_which_publishes_it_once(
        start_daemon: Any, redis_spool: Spool, redis_server: RedisServer) -> None:
    env, first, client = _rendering(start_daemon, redis_spool, redis_server, "victim")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = start_daemon(redis_spool, **env)
    result = _one_result(redis_spool, client, "victim")
    assert _consumer_of_result(redis_server, "victim").startswith(second.owner + "-")
    assert job_field(redis_server, "victim", "crashes") == "1"
    assert job_field(redis_server, "victim", "attempts") == "2", "rendered at least once: here, twice"
    assert result["params"]["steps"] == 2


def _consumer_of_result(server: RedisServer, job_id: str) -> str:
    return (job_field(server, job_id, "done_by") or "").split(" ")[0]


@pytest.mark.e2e
def test_a_daemon_paused_past_its_lease_cannot_publish_and_the_job_has_one_result(
        start_daemon: Any, redis_spool: Spool, redis_server: RedisServer) -> None:
    env, first, client = _rendering(start_daemon, redis_spool, redis_server, "paused")
    os.kill(first.proc.pid, signal.SIGSTOP)
    try:
        second = start_daemon(redis_spool, **env)
        result = _one_result(redis_spool, client, "paused")
        assert _consumer_of_result(redis_server, "paused").startswith(second.owner + "-")
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    wait_for(lambda: first.events("job taken over by another daemon; its result is not published here"),
             message=lambda: "the paused daemon never learnt it lost the job:\n" + first.log_path.read_text()[-3000:])
    assert _one_result(redis_spool, client, "paused") == result, "its late publish was refused"
    assert second.stop() == 0
    client.submit("the paused daemon goes on", job_id="later", steps=1)
    assert client.wait("later", timeout=120)["status"] == "succeeded"
    assert _consumer_of_result(redis_server, "later").startswith(first.owner + "-")
