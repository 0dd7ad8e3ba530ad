"""The Redis broker against a real redis-server: what a daemon takes, holds,
renews, loses and publishes, with several daemons (brokers) on one queue.

Each test has its own server (``redis_server``). A "dead" daemon is a broker
that stops calling ``refresh``: its lease lapses on the server's clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from redis_server import RedisServer
from sbrender import redisqueue as rq
from sbrender.broker import Take
from sbrender.config import load_settings
from sbrender.errors import ConfigError
from sbrender.jobs import Job
from sbrender.redisbroker import RedisBroker
from sbrender.redisqueue import RedisQueue
from sbrender.renderer import call_key

Make = Callable[..., RedisBroker]


@pytest.fixture
def make(redis_server: RedisServer, tmp_path: Path) -> Iterator[Make]:
    made: list[RedisBroker] = []

    def make(lease: float = 60.0, **overrides: Any) -> RedisBroker:
        settings = load_settings(env={}, overrides={
            "queue": redis_server.url, "redis.lease_seconds": lease, "inbox": str(tmp_path / "inbox"),
            "outbox": str(tmp_path / "outbox"), "state": str(tmp_path / "state"), **overrides})
        broker = RedisBroker(settings, threading.Event())
        broker.prepare()
        broker.open()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker._closing.set()


@pytest.fixture
def queue(redis_server: RedisServer) -> RedisQueue:
    return RedisQueue(redis_server.url)


def submit(queue: RedisQueue, job_id: str, priority: int = 0, **fields: Any) -> str:
    return queue.submit(job_id, {"prompt": f"prompt of {job_id}", "priority": priority, **fields}, priority)


def take_one(broker: RedisBroker, timeout: float = 30) -> Take:
    """The next take, once the broker has one (recovery runs at its refresh)."""
    def attempt() -> list[Take]:
        broker.refresh()
        return broker.take(1, call_key)

    (take,) = wait_for(attempt, timeout, "nothing to take")
    return take


def finish(broker: RedisBroker, take: Take, status: str = "succeeded") -> dict[str, Any]:
    result = {"id": take.entry.id, "status": status, "by": broker.consumer}
    assert broker.may_publish(take)
    broker.done(take, status == "succeeded", result)
    return result


def pending_owner(server: RedisServer, job_id: str) -> str | None:
    """The consumer whose pending list holds the job's entry, from the server."""
    client = server.client()
    key, eid = client.hmget(rq.job_key(job_id), "stream", "entry")
    found = client.xpending_range(key, rq.GROUP, eid, eid, 1)
    return found[0]["consumer"] if found else None


def test_a_submitted_job_is_taken_published_acknowledged_and_its_waiter_wakes(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    broker = make()
    assert submit(queue, "cat", seed=7) == "queued"
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(RedisQueue(redis_server.url).wait("cat", 30)))
    waiter.start()
    take = take_one(broker)
    assert isinstance(take.entry, Job) and take.entry.id == "cat" and take.entry.seed == 7
    assert queue.state("cat") == "running" and pending_owner(redis_server, "cat") == broker.consumer
    assert broker.reserve(take).result_id == "cat"
    result = finish(broker, take)
    waiter.join(30)
    assert waited == [result], "the waiter got the result document kept in Redis"
    assert queue.result("cat") == result and queue.state("cat") == "succeeded"
    client = redis_server.client()
    assert client.xlen(rq.stream("normal")) == 0 and client.xpending(rq.stream("normal"), rq.GROUP)["pending"] == 0
    assert broker.take(1, call_key) == [] and broker.close()


def test_a_submit_sent_again_is_one_job_and_another_job_under_its_id_is_refused(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    assert submit(queue, "dup") == "queued"
    assert submit(queue, "dup") == "exists", "a re-submit by id (a lost reply, a power cut) is safe"
    with pytest.raises(ValueError, match="already in use"):
        queue.submit("dup", {"prompt": "another job"}, 0)
    assert redis_server.client().xlen(rq.stream("normal")) == 1
    broker = make()
    take = take_one(broker)
    finish(broker, take)
    assert submit(queue, "dup") == "exists", "a finished id is never queued again"
    assert broker.take(1, call_key) == []


def test_bands_go_high_normal_low_and_fifo_within_a_band(make: Make, queue: RedisQueue) -> None:
    for job_id, priority in (("low", -3), ("first", 0), ("urgent", 9), ("second", 0), ("also-urgent", 1)):
        submit(queue, job_id, priority)
    broker = make()
    order = []
    for _ in range(5):
        take = take_one(broker)
        order.append(take.entry.id)
        finish(broker, take)
    assert order == ["urgent", "also-urgent", "first", "second", "low"]


def test_compatible_jobs_are_taken_together_up_to_the_image_budget(make: Make, queue: RedisQueue) -> None:
    for k in range(3):
        submit(queue, f"j{k}", count=2)
    submit(queue, "wide", width=128)
    broker = make(**{"perf.batch_size": 4})
    broker.refresh()
    assert [t.entry.id for t in broker.take(4, call_key)] == ["j0", "j1"]
    assert [t.entry.id for t in broker.take(4, call_key)] == ["j2"]
    assert [t.entry.id for t in broker.take(4, call_key)] == ["wide"]


def test_a_held_lease_is_renewed_and_no_other_daemon_takes_the_job(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    lease = 0.6
    owner, other = make(lease), make(lease)
    submit(queue, "long")
    take = take_one(owner)
    client = redis_server.client()

    def idle_ms() -> int:
        key, eid = client.hmget(rq.job_key("long"), "stream", "entry")
        return int(client.xpending_range(key, rq.GROUP, eid, eid, 1)[0]["time_since_delivered"])

    wait_for(lambda: idle_ms() >= 300, 10, "the entry's idle time grows while nobody renews")
    owner._due["renew"] = 0.0
    owner.refresh()
    assert idle_ms() < 300, "a renewal resets the idle time on the server"
    # Over several leases, the owner's refreshes keep the job: the other never gets it.
    deadline = time.monotonic() + 4 * lease
    while time.monotonic() < deadline:
        owner.refresh()
        other.refresh()
        assert other.take(1, call_key) == []
        time.sleep(0.02)
    assert owner.may_publish(take) and pending_owner(redis_server, "long") == owner.consumer


def test_a_dead_daemons_job_is_taken_over_after_its_lease_and_its_late_publish_is_refused(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    dead, alive = make(0.5), make(0.5)
    submit(queue, "victim")
    lost = take_one(dead)
    # `dead` stops renewing (SIGKILL, SIGSTOP): after the lease, `alive` takes the job over.
    taken = take_one(alive)
    assert taken.entry.id == "victim"
    assert taken.delivery.crashes == {"victim": 1}, "a job taken from a daemon that was running it counts a crash"
    assert taken.delivery.token == lost.delivery.token, "the same job: a random seed is drawn the same again"
    assert pending_owner(redis_server, "victim") == alive.consumer
    # The dead daemon wakes up: it is told it lost the job, its commit is refused.
    dead.done(lost, True, {"id": "victim", "status": "succeeded", "by": "zombie"})
    assert queue.state("victim") == "running" and queue.result("victim") is None, "a stale publish+ack is refused"
    assert pending_owner(redis_server, "victim") == alive.consumer, "and it did not ack the new owner's entry"
    result = finish(alive, taken)
    assert queue.result("victim") == result


def test_a_paused_daemon_learns_it_lost_its_job_and_may_not_publish(
        make: Make, queue: RedisQueue) -> None:
    paused, other = make(0.5), make(0.5)
    submit(queue, "paused")
    take = take_one(paused)
    take_one(other)
    paused._due["renew"] = 0.0
    paused.refresh()  # its first renewal after the pause fails
    assert "paused" in paused.cancelled(), "the render in progress is stopped"
    assert not paused.may_publish(take), "and nothing of it is written to the outbox"
    assert "paused" not in paused.cancelled()


def test_a_job_that_kills_its_daemons_is_dead_lettered_at_max_crashes(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    submit(queue, "poison")
    crashes = []
    for _ in range(3):
        daemon = make(0.4, **{"limits.max_crashes": 2})
        crashes.append(take_one(daemon).delivery.crashes.get("poison", 0))  # then it "dies"
    assert crashes == [0, 1, 2]
    dlq = redis_server.client().xrange(rq.DLQ)
    assert [fields["id"] for _, fields in dlq] == ["poison"] and dlq[0][1]["crashes"] == "2"
    assert redis_server.client().hget(rq.job_key("poison"), "attempts") == "3"


def test_a_stop_gives_the_job_back_in_its_place_without_counting_a_crash(
        make: Make, queue: RedisQueue) -> None:
    first = make(30)
    submit(queue, "a")
    submit(queue, "b")
    take = take_one(first)
    first.give_back([take])
    assert first.close(), "nothing is held after a stop"
    second = make(30)
    again = take_one(second, timeout=10)
    assert again.entry.id == "a", "its place in the queue is kept"
    assert again.delivery.crashes == {} and queue.state("a") == "running"


def test_a_queued_job_cancelled_is_taken_out_of_turn_and_a_running_one_is_flagged(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    broker = make()
    for job_id in ("running", "ahead", "cancel-me"):
        submit(queue, job_id)
    running = take_one(broker)
    assert queue.cancel("cancel-me") == "pending"
    assert queue.cancel("running") == "running"
    assert broker.cancelled() == {"cancel-me", "running"}
    (cancelled,) = broker.take_cancelled(broker.cancelled())
    assert cancelled.entry.id == "cancel-me"
    finish(broker, cancelled, "cancelled")
    finish(broker, running, "cancelled")
    assert queue.state("cancel-me") == "cancelled" and queue.state("running") == "cancelled"
    assert broker.cancelled() == set(), "answered requests are cleared"
    assert queue.cancel("running") == "cancelled" and queue.cancel("nope") == "unknown"
    assert take_one(broker).entry.id == "ahead", "the other queued job is untouched"
    assert redis_server.client().xlen(rq.stream("normal")) == 1


def test_an_unreachable_server_pauses_the_broker_and_a_restart_loses_nothing_acknowledged(
        make: Make, queue: RedisQueue, redis_server: RedisServer) -> None:
    broker = make()
    submit(queue, "held")
    submit(queue, "after")
    held = take_one(broker)
    redis_server.kill()
    assert broker.take(1, call_key) == [] and broker.problems(), "an outage is a problem, not an empty queue"
    assert "redis unreachable" in broker.problems()[0]
    assert not broker.may_publish(held), "nothing is published that cannot be fenced"
    redis_server.start()
    wait_for(lambda: broker.problems() == [], 10, "the broker resumes")
    again = take_one(broker)
    assert again.entry.id == "held" and again.delivery.crashes == {}, \
        "the job it could not publish is its own again at once, not after a lease, and no crash"
    assert take_one(broker).entry.id == "after", "the queue came back from the AOF"


@pytest.mark.parametrize("url", ["redis://", "redis://host:port/0", "redis://host:6379/x", "http://host"])
def test_a_bad_queue_url_is_refused_with_the_setting_named(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="setting queue"):
        load_settings(env={}, overrides={"queue": url})


def test_doctor_checks_the_redis_server(redis_server: RedisServer, tmp_path: Path) -> None:
    from sbrender.doctor import FAIL, OK, WARN, check_queue

    def findings(url: str) -> list[tuple[str, str]]:
        return [(f.level, f.message) for f in check_queue(load_settings(env={}, overrides={"queue": url}))]

    (healthy,) = findings(redis_server.url)
    assert healthy[0] == OK and "Redis 7." in healthy[1]
    client = redis_server.client()
    client.config_set("appendonly", "no")
    client.config_set("maxmemory-policy", "allkeys-lru")
    levels = [level for level, _ in findings(redis_server.url)]
    assert levels == [OK, WARN, FAIL], "no AOF is a warning, eviction a failure"
    ((level, message),) = findings("redis://127.0.0.1:1/0")
    assert level == FAIL and "redis unreachable" in message


def test_consumers_of_past_runs_are_removed_but_never_one_holding_a_job(
        make: Make, queue: RedisQueue, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    submit(queue, "held")
    holder = make()
    take_one(holder)
    client = redis_server.client()
    client.xgroup_createconsumer(rq.stream("normal"), rq.GROUP, "a-past-run")  # nothing pending
    monkeypatch.setattr(rq, "PRUNE_IDLE_S", 0.0)
    make()  # a new daemon starts, and prunes
    names = {c["name"] for c in client.xinfo_consumers(rq.stream("normal"), rq.GROUP)}
    assert holder.consumer in names and "a-past-run" not in names
    assert pending_owner(redis_server, "held") == holder.consumer


def test_a_client_closes_its_connections(redis_server: RedisServer, tmp_path: Path) -> None:
    """A Django view may build a Client per request: ``with`` closes what it opened."""
    from sbrender.client import Client

    admin = redis_server.client()
    before = len(admin.client_list())
    with Client(tmp_path / "inbox", tmp_path / "outbox", queue=redis_server.url) as client:
        client.submit("a cat", job_id="closing")
        assert client.queue is not None and client.queue.wait("closing", 0.2) is None  # opens the blocking one
        assert len(admin.client_list()) == before + 2
    wait_for(lambda: len(admin.client_list()) == before, message="the client's connections stayed open")
