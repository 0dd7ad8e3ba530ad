"""The Redis queue's layout and its scripts: what producers and daemons share.

Torch-free: the client (CLI, Django) and the daemon's broker both use it.
Every key carries the hash tag ``{sbr}``. A job is a hash ``job:<id>`` (its
document, state, owner, crash count and, once finished, its result) and an
entry in one stream per priority band; ``ev:<id>`` is its event stream, which
waiters block on. Every change after submit is a Lua script, so an owner
check and the change it guards cannot interleave with a takeover.

Priorities: three bands, read in this order: ``high`` (priority > 0),
``normal`` (0), ``low`` (< 0); FIFO by submit time within a band (the value
of a positive or negative priority does not order jobs inside its band). A
queued job someone cancelled moves to the ``cancelling`` lane, which daemons
read first, so its cancelled result comes at once.

redis-py's defaults retry a timed-out command up to 10 times (a write sent
twice) and time out blocking reads: connections here never retry, and
blocking reads get a socket timeout longer than their block.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import QueueUnavailable

PREFIX = "{sbr}:"
GROUP = "render"
BANDS = ("high", "normal", "low")
CANCEL_LANE = PREFIX + "q:cancelling"
CANCELS = PREFIX + "cancels"  # ids with a cancel request not yet answered by a result
DLQ = PREFIX + "dlq"  # jobs that killed their daemons limits.max_crashes times
RETURNED = "(returned)"  # the consumer that holds entries given back, claimable at once
FINISHED = ("succeeded", "failed", "cancelled")
EVENTS_TTL_S = 86_400  # a finished job's event stream; its result stays in its hash
BLOCK_S = 1.0  # blocking reads: short, so a reconnect or a stop is noticed soon
SCHEMES = ("redis", "rediss", "unix")


def stream(band: str) -> str:
    return f"{PREFIX}q:{band}"


STREAMS = tuple(stream(b) for b in BANDS)
ALL_STREAMS = (CANCEL_LANE, *STREAMS)  # the order daemons read in


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}ev:{job_id}"


def daemon_key(consumer: str) -> str:
    return f"{PREFIX}daemon:{consumer}"


# A daemon's status lives this long after its last write (the heartbeat writes every
# status.HEARTBEAT_S): the server's clock says which daemons are alive, on every host.
DAEMON_TTL_S = 20


def band(priority: int) -> str:
    return "high" if priority > 0 else "normal" if priority == 0 else "low"


def is_redis_url(text: str) -> bool:
    return urlsplit(text).scheme in SCHEMES


def check_url(text: str) -> str:
    """``text`` when it is a usable Redis URL (``redis://host:port/db``); ValueError otherwise."""
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise ValueError("expected 'files' (the spool folders) or a Redis URL such as redis://host:6379/0")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"no host in {text!r}; expected redis://host:6379/0")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(f"bad database number {db!r} in {text!r}; expected redis://host:6379/0")
    del port
    return text


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def connect(url: str, *, blocking: bool = False, timeout: float = 5.0) -> Any:
    """A client that never re-sends a command. ``blocking``: for reads that block
    up to ``BLOCK_S`` (its socket waits longer than that)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=BLOCK_S + 5 if blocking else timeout,
                                socket_connect_timeout=min(2.0, timeout),
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, decode_responses=True)


# Replies that mean "the server cannot serve now", not "a bug": the daemon pauses.
UNAVAILABLE_REPLIES = ("NOGROUP", "MISCONF", "OOM", "LOADING", "READONLY", "MASTERDOWN", "NOREPLICAS")


def unavailable(err: Exception) -> str | None:
    """Why the server cannot be used, when ``err`` says so; None for other errors."""
    import redis

    if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
        return f"redis unreachable: {err}"
    if isinstance(err, redis.ResponseError) and str(err).startswith(UNAVAILABLE_REPLIES):
        return f"redis refuses: {err}"
    return None


# --- scripts ---------------------------------------------------------------------------------

# Owner check used by every script after submit: the entry is in this consumer's
# pending list. XACK alone does not check it.
_OWNS = """
local function owns(key, eid, consumer)
  local p = redis.call('XPENDING', key, 'render', eid, eid, 1)
  return #p > 0 and p[1][2] == consumer
end
"""

# KEYS: job, band stream, events. ARGV: id, spec, spec hash, token.
# A second submit of one id is answered with the job's state: safe to re-send.
SUBMIT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  if redis.call('HGET', KEYS[1], 'spec_hash') ~= ARGV[3] then return {'conflict', state} end
  return {'exists', state}
end
local t = redis.call('TIME')
local eid = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'spec', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'pending', 'spec', ARGV[2], 'spec_hash', ARGV[3], 'token', ARGV[4],
           'stream', KEYS[2], 'entry', eid, 'queued_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])),
           'crashes', 0, 'attempts', 0)
redis.call('XADD', KEYS[3], '*', 'type', 'pending')
return {'queued', 'pending'}
"""

# KEYS: job, cancels, cancel lane. ARGV: id. A queued job moves to the cancel lane;
# a running one is flagged, and its daemon stops it at the next step.
CANCEL = """
local st = redis.call('HMGET', KEYS[1], 'state', 'stream', 'entry', 'spec')
if not st[1] then return 'unknown' end
if st[1] == 'succeeded' or st[1] == 'failed' or st[1] == 'cancelled' then return st[1] end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'cancel', '1')
if st[1] == 'pending' and st[2] ~= KEYS[3] then
  redis.call('XDEL', st[2], st[3])
  local eid = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'spec', st[4])
  redis.call('HSET', KEYS[1], 'stream', KEYS[3], 'entry', eid)
end
return st[1]
"""

# KEYS: streams, in the order to read them. ARGV: consumer, count. The new entries
# of the first stream that has any: one round trip, not one per band.
FETCH = """
for _, key in ipairs(KEYS) do
  local r = redis.call('XREADGROUP', 'GROUP', 'render', ARGV[1], 'COUNT', ARGV[2], 'STREAMS', key, '>')
  if r then return {key, r[1][2]} end
end
return false
"""

# start(job, stream, events, dlq, entry id, consumer, max crashes, job id):
# 0: not ours to start (moved, finished, taken over): it is acked away or left.
# A job taken over from another daemon that was running it gets a crash counted.
_START = _OWNS + """
local function start(job, stream, events, dlq, eid, consumer, max_crashes, id)
  local st = redis.call('HMGET', job, 'state', 'stream', 'entry', 'owner')
  if not st[1] or st[2] ~= stream or st[3] ~= eid
     or st[1] == 'succeeded' or st[1] == 'failed' or st[1] == 'cancelled' then
    if owns(stream, eid, consumer) then
      redis.call('XACK', stream, 'render', eid)
      redis.call('XDEL', stream, eid)
    end
    return 0
  end
  if not owns(stream, eid, consumer) then return 0 end
  local crashes = tonumber(redis.call('HGET', job, 'crashes') or '0')
  if st[1] == 'running' and st[4] and st[4] ~= '' and st[4] ~= consumer then
    crashes = redis.call('HINCRBY', job, 'crashes', 1)
    if crashes >= tonumber(max_crashes) then
      redis.call('XADD', dlq, '*', 'id', id, 'crashes', crashes, 'last_owner', st[4])
    end
  end
  redis.call('HSET', job, 'state', 'running', 'owner', consumer, 'step', 0)
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('XADD', events, '*', 'type', 'running', 'owner', consumer)
  local r = redis.call('HMGET', job, 'spec', 'token', 'queued_at')
  return {r[1], r[2], r[3], crashes}
end
"""

# KEYS: job, stream, events, dlq. ARGV: entry id, consumer, max crashes, job id.
START = _START + """
return start(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: streams, in the order to read them, then the dlq. ARGV: consumer, count,
# max crashes. FETCH, then START of the first entry fetched, in one round trip:
# {stream, entries, start's reply for the first}. The first entry's job and
# events keys are made here from its id (they share the streams' hash tag).
FETCH_START = _START + """
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  local r = redis.call('XREADGROUP', 'GROUP', 'render', ARGV[1], 'COUNT', ARGV[2], 'STREAMS', key, '>')
  if r then
    local entries = r[1][2]
    local first, id = entries[1], nil
    for j = 1, #first[2], 2 do
      if first[2][j] == 'id' then id = first[2][j + 1] end
    end
    local started = 0
    if id then
      started = start('%(job)s' .. id, key, '%(events)s' .. id, KEYS[#KEYS], first[1], ARGV[1], ARGV[3], id)
    end
    return {key, entries, started}
  end
end
return false
""" % {"job": job_key(""), "events": events_key("")}

# KEYS: the streams of the held entries. ARGV: consumer, then one entry id per key.
# Resets each owned entry's idle time (JUSTID: the delivery counter stays); 0 for
# an entry that is no longer ours (taken over, or deleted by a cancel).
RENEW = _OWNS + """
local out = {}
for i, key in ipairs(KEYS) do
  local eid = ARGV[i + 1]
  out[i] = 0
  if owns(key, eid, ARGV[1]) then
    local claimed = redis.call('XCLAIM', key, 'render', ARGV[1], 0, eid, 'JUSTID')
    if #claimed > 0 then out[i] = 1 end
  end
end
return out
"""

# KEYS: job, stream, events, cancels. ARGV: entry id, consumer, status, result JSON, job id.
# The fenced publish: 1 when this consumer still owned the entry (or this very
# commit was applied before, its reply lost); 0 when another daemon took it over.
COMMIT = _OWNS + """
local st = redis.call('HMGET', KEYS[1], 'state', 'entry', 'done_by')
local by = ARGV[2] .. ' ' .. ARGV[1]
if st[3] == by then return 1 end
if st[2] ~= ARGV[1] or not owns(KEYS[2], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'result', ARGV[4], 'done_by', by)
redis.call('HDEL', KEYS[1], 'owner', 'cancel')
redis.call('XACK', KEYS[2], 'render', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[5])
redis.call('XADD', KEYS[3], '*', 'type', 'finished', 'status', ARGV[3])
redis.call('EXPIRE', KEYS[3], %d)
return 1
""" % EVENTS_TTL_S

# KEYS: job, stream. ARGV: entry id, consumer. A stop interrupted the render: the
# job is pending again, in its place, and any daemon's recovery takes it at once.
GIVE_BACK = _OWNS + """
if not owns(KEYS[2], ARGV[1], ARGV[2]) then return 0 end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'owner', '')
end
redis.call('XCLAIM', KEYS[2], 'render', '%s', 0, ARGV[1], 'IDLE', 315360000000, 'JUSTID')
return 1
""" % RETURNED


# KEYS: job, band stream, events. ARGV: id, token. A failed or cancelled job is
# queued again under its id (a new token: a job without a seed draws a new one);
# its old result is kept in the list ``retried``.
RETRY = """
local st = redis.call('HMGET', KEYS[1], 'state', 'spec', 'result')
if st[1] ~= 'failed' and st[1] ~= 'cancelled' then return st[1] or 'unknown' end
local eid = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'spec', st[2])
redis.call('RPUSH', KEYS[1] .. ':retried', st[3])
redis.call('HDEL', KEYS[1], 'result', 'done_by', 'owner', 'cancel', 'step', 'steps')
redis.call('HSET', KEYS[1], 'state', 'pending', 'stream', KEYS[2], 'entry', eid, 'token', ARGV[2], 'crashes', 0)
redis.call('PERSIST', KEYS[3])
redis.call('XADD', KEYS[3], '*', 'type', 'pending')
return 'retried'
"""

# KEYS: streams. ARGV: idle ms. Consumer names are unique per process start, so
# those of past runs pile up: one with nothing pending, idle that long, goes (a
# live one is made again by its next read). Atomic, so nothing becomes pending
# to it between the look and the removal (that entry would be lost).
PRUNE = """
local removed = 0
for _, key in ipairs(KEYS) do
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, 'render')) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', key, 'render', f['name'])
      removed = removed + 1
    end
  end
end
return removed
"""
PRUNE_IDLE_S = 3600.0


def spec_hash(job: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def watch(url: str, wake: threading.Event, closing: threading.Event) -> None:
    """Until ``closing``: block on the job streams (reading, not consuming) and set
    ``wake`` when an entry is added, so a submit reaches an idle daemon in
    milliseconds. Errors only delay: the daemon learns of an outage elsewhere."""
    client = connect(url, blocking=True)
    last: dict[str, str] | None = None
    while not closing.is_set():
        try:
            if last is None:
                last = {key: _last_id(client, key) for key in ALL_STREAMS}
            reply = client.xread(last, count=64, block=int(BLOCK_S * 1000))
        except Exception:  # noqa: BLE001 - see the docstring
            last = None
            closing.wait(0.5)
            continue
        for key, items in reply or []:
            if items:
                last[key] = items[-1][0]
        if reply:
            wake.set()
    client.close()


def _last_id(client: Any, key: str) -> str:
    newest = client.xrevrange(key, count=1)
    return newest[0][0] if newest else "0-0"


class RedisQueue:
    """What a producer or a waiter does with the queue (the daemon's side is
    ``redisbroker.RedisBroker``). Raises ``QueueUnavailable`` when the server cannot serve."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = connect(url)
        self._blocking: Any = None
        self._submit = self.redis.register_script(SUBMIT)
        self._cancel = self.redis.register_script(CANCEL)

    def close(self) -> None:
        """Close both connections (the second exists once ``wait`` ran)."""
        for conn in (self.redis, self._blocking):
            if conn is not None:
                conn.close()
        self._blocking = None

    def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            why = unavailable(err)
            if why is None:
                raise
            raise QueueUnavailable(f"{why} ({redacted(self.url)})",
                                   hint="is redis-server running and reachable? the job may be re-submitted "
                                        "under the same id") from None

    def submit(self, job_id: str, job: Mapping[str, Any], priority: int, attempts: int = 3) -> str:
        """Queue ``job`` under ``job_id``; "queued", or "exists" when this very job
        was queued before (a re-submit). Raises ``ValueError`` when the id holds another job."""
        spec = json.dumps(job, ensure_ascii=False)
        args = [job_id, spec, spec_hash(job), secrets.token_hex(8)]
        keys = [job_key(job_id), stream(band(priority)), events_key(job_id)]
        for attempt in range(attempts):
            try:
                outcome, state = self._call(self._submit, keys=keys, args=args)
                break
            except QueueUnavailable:
                # Safe to send again: the script answers a second submit of one id with its state.
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if outcome == "conflict":
            raise ValueError(f"job id {job_id} is already in use ({state})")
        return str(outcome)

    def state(self, job_id: str) -> str | None:
        return self._call(self.redis.hget, job_key(job_id), "state")

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The finished job's result document, or None while it is not finished."""
        state, result = self._call(self.redis.hmget, job_key(job_id), "state", "result")
        if state not in FINISHED or result is None:
            return None
        return json.loads(result)

    def look(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Many jobs at once, in one round trip (the HTTP front's watcher): each
        job's ``state``, ``step`` and ``steps`` while running, and ``result`` once finished."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(job_key(job_id), "state", "step", "steps", "result")
        out: dict[str, dict[str, Any]] = {}
        for job_id, (state, step, steps, result) in zip(job_ids, self._call(pipe.execute)):
            item: dict[str, Any] = {"state": state or "unknown"}
            if state in FINISHED and result is not None:
                item["result"] = json.loads(result)
            elif state == "running" and steps:
                item.update(step=int(step or 0), steps=int(steps))
            out[job_id] = item
        return out

    def progress(self, job_id: str) -> dict[str, Any]:
        """The job's state; while running, its step and steps too."""
        state, step, steps = self._call(self.redis.hmget, job_key(job_id), "state", "step", "steps")
        if state == "running" and steps:
            return {"state": state, "step": int(step or 0), "steps": int(steps)}
        return {"state": state or "unknown"}

    def document(self, job_id: str) -> dict[str, Any] | None:
        """The job as submitted (a mapping of fields) and its state, or None for an unknown id."""
        state, spec, queued_at = self._call(self.redis.hmget, job_key(job_id), "state", "spec", "queued_at")
        if state is None:
            return None
        return {"state": state, "job": json.loads(spec), "queued_at": float(queued_at or 0)}

    def daemons(self) -> list[dict[str, Any]]:
        """The status of every daemon alive on the queue, on any host: each one's key
        expires ``DAEMON_TTL_S`` after its last heartbeat (SCAN: O(all keys))."""
        keys = self._call(lambda: sorted(self.redis.scan_iter(match=daemon_key("*"), count=1000)))
        values = self._call(self.redis.mget, keys) if keys else []
        return [json.loads(value) for value in values if value]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job's id, state, document, queue time and result (SCAN: O(all jobs))."""
        keys = [key for key in self._call(lambda: list(self.redis.scan_iter(match=job_key("*"), count=1000)))
                if key.count(":") == 2]  # not job:<id>:retried
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "state", "spec", "queued_at", "result")
        out = []
        for key, (state, spec, queued_at, result) in zip(keys, self._call(pipe.execute)):
            if state is not None:
                out.append({"id": key[len(job_key("")):], "state": state, "job": json.loads(spec or "{}"),
                            "queued_at": float(queued_at or 0), "result": json.loads(result) if result else None})
        return out

    def retry(self, job_id: str, priority: int) -> str:
        """"retried", or the state that forbids it ("unknown", "pending", ...)."""
        keys = [job_key(job_id), stream(band(priority)), events_key(job_id)]
        return str(self._call(self.redis.register_script(RETRY), keys=keys, args=[job_id, secrets.token_hex(8)]))

    def cancel(self, job_id: str) -> str:
        """The job's state when asked: "unknown", a finished state, or "pending"/"running"."""
        keys = [job_key(job_id), CANCELS, CANCEL_LANE]
        return str(self._call(self._cancel, keys=keys, args=[job_id]))

    def wait(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Block until the job's result is there (None after ``timeout`` seconds).
        Reads its event stream from the start, so the end cannot be missed."""
        if self._blocking is None:
            self._blocking = connect(self.url, blocking=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        last = "0-0"
        while True:
            result = self.result(job_id)
            if result is not None:
                return result
            left = BLOCK_S if deadline is None else min(BLOCK_S, deadline - time.monotonic())
            if left <= 0:
                return None
            reply = self._call(self._blocking.xread, {events_key(job_id): last}, count=16,
                               block=max(1, int(left * 1000)))
            for _, entries in reply or []:
                if entries:
                    last = entries[-1][0]
