"""Redis backend of the transport contracts (key layout in `keys.py`).

Experience: a stream with the consumer group `learners`. An acknowledged record is also deleted, so the
stream's length is the backlog. The group is created at id 0, so records pushed before it existed
(e.g. by actors after a Redis restart) are still delivered.

Weights: chunks, then an atomic commit (a Lua script) that checks every chunk is there and the version
is newer than `latest`, writes the manifest, moves `latest` and publishes the notice.

Every operation retries a lost connection for up to `RedisConfig.retry_s` seconds, then raises
TransportError. Objects are not thread-safe (one per thread); the redis client they share may be.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

from pso.config.services import RedisConfig
from pso.secrets import read_secret
from pso.transport import digest
from pso.transport.base import (
    Delivery,
    ExperienceQueue,
    QueueStats,
    TransportError,
    WeightStore,
    WeightsUnavailable,
)
from pso.transport.keys import EXPERIENCE_GROUP, Keys

__all__ = ["RedisExperienceQueue", "RedisWeightStore", "connect"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOST = (redis.ConnectionError, redis.TimeoutError)
_REFUSED_CREDENTIALS = (AuthenticationError, AuthorizationError)  # ConnectionErrors a retry won't fix
SOCKET_TIMEOUT_S = 30.0  # a dead peer is noticed after this long; blocking reads wait in shorter slices
BLOCK_SLICE_S = 10.0
BATCH_BYTES = 64 * 2**20  # per pipeline of chunk writes: bounds the client's and the server's buffers
# per round trip of chunk reads: Redis holds a reply in that client's output buffer until it is sent, so
# this times the fetchers reading at once is what Redis needs beside its data (64 actors: 512 MiB)
FETCH_BATCH_BYTES = 8 * 2**20
MIN_VERSION = (6, 2)  # XPENDING IDLE and exclusive ranges


def redact(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _client_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class _Retrying:
    """Runs Redis operations, retrying a lost connection with backoff for up to `retry_s` seconds.

    Logs a warning on the first failure of an outage and an info line when Redis answers again;
    `on_lost` is called on every failure (callers reset per-connection state there).
    """

    def __init__(self, url: str, retry_s: float, on_lost: Callable[[], None] | None = None) -> None:
        self.url = url
        self.retry_s = retry_s
        self.on_lost = on_lost
        self.outage_since: float | None = None

    def __call__(self, what: str, op: Callable[[], T]) -> T:
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                result = op()
            except _REFUSED_CREDENTIALS as exc:
                raise TransportError(f"Redis at {self.url} refused the credentials ({what}): {exc}") from exc
            except _LOST as exc:
                now = time.monotonic()
                if self.outage_since is None:
                    self.outage_since = now
                    logger.warning(
                        "lost the connection to Redis at %s (%s: %s); retrying for up to %.0f s",
                        self.url,
                        what,
                        exc,
                        self.retry_s,
                    )
                if self.on_lost is not None:
                    self.on_lost()
                waited = now - started
                if waited >= self.retry_s:
                    self.outage_since = None  # the next operation's failure is reported afresh
                    raise TransportError(
                        f"Redis at {self.url} unreachable ({what}): {exc}; gave up after {waited:.1f} s"
                        f" (redis.retry_s = {self.retry_s})"
                    ) from exc
                time.sleep(min(delay, self.retry_s - waited))
                delay = min(delay * 2, 1.0)
                continue
            except redis.RedisError as exc:
                raise TransportError(f"Redis at {self.url} refused {what}: {exc}") from exc
            if self.outage_since is not None:
                logger.info(
                    "Redis at %s answers again after %.1f s (%s)", self.url, time.monotonic() - self.outage_since, what
                )
                self.outage_since = None
            return result


def _zero_copy_packer() -> object | None:
    """redis-py's pure-Python command packer, which sends large values as they are; the hiredis packer
    (redis-py's default when hiredis is installed) copies each value twice, halving publish speed."""
    try:
        from redis.connection import Encoder, PythonRespSerializer
    except ImportError:  # moved in a later redis-py: the default packer is correct, only slower
        return None
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def connect(config: RedisConfig) -> redis.Redis:
    """A client for `config.url`, checked by asking the server's version (retried for up to `config.retry_s` s).

    The password comes from the environment variable `config.password_env`, or the file its `_FILE` twin names
    (pso.secrets), when set (one in the URL wins).
    Raises TransportError naming the URL if it is unset, malformed or unreachable, or the server is too old;
    ConfigError if the password's file cannot be read.
    """
    if config.url is None:
        raise TransportError(
            "redis.url is not set: `pso up` starts a local Redis; other processes need redis.url (redis://host:port/db)"
        )
    url = redact(config.url)
    options = {
        "password": read_secret(config.password_env) or None,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5.0,
        "socket_read_size": 2**20,  # per connection; fetches of large chunks run ~25% faster than with 64 KiB
        "retry": Retry(NoBackoff(), 0),  # _Retrying does the retrying, with logs and a deadline
    }
    packer = _zero_copy_packer()
    if packer is not None:
        options["command_packer"] = packer
    try:
        client = redis.Redis.from_url(config.url, **options)
    except ValueError as exc:
        raise TransportError(f"bad Redis URL {url}: {exc}") from exc

    def server_info() -> dict:
        try:
            return client.info("server")
        except redis.ResponseError:  # INFO disabled (some managed services): reachable is all we learn
            client.ping()
            return {}

    info = _Retrying(url, config.retry_s)("connect", server_info)
    version = tuple(int(x) for x in str(info.get("redis_version", "6.2")).split(".")[:2])
    if version < MIN_VERSION:
        client.close()
        raise TransportError(f"Redis at {url} is version {info.get('redis_version')}; Redis >= 6.2 is needed")
    return client


class _RedisTransport:
    def __init__(self, client: redis.Redis, config: RedisConfig, on_lost: Callable[[], None] | None) -> None:
        self.redis = client
        self.config = config
        self.keys = Keys(config.run)
        self.url = redact(config.url) if config.url else _client_url(client)
        self._retry = _Retrying(self.url, config.retry_s, on_lost)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisExperienceQueue(_RedisTransport, ExperienceQueue):
    """Experience records in the stream `pso:{run}:experience`, consumer group `learners`. `client`: from
    `connect(config)`, and may be shared with a RedisWeightStore.

    After construction (a consumer restart) or a lost connection, `read` first hands out the consumer's
    records that are pending in Redis and were not handed out by this object since (`times_delivered` > 1).
    """

    def __init__(self, client: redis.Redis, config: RedisConfig) -> None:
        super().__init__(client, config, on_lost=self._connection_lost)
        self._group_ready = False
        self._ack = self.redis.register_script(_ACK)
        self._history: dict[str, str | None] = {}  # consumer -> last pending id re-read; None: done
        self._held: set[str] = set()  # ids handed out by this object and not acknowledged

    def _connection_lost(self) -> None:
        # A reply may have been lost with the connection (records now pending on us that we never saw),
        # or Redis restarted empty: look at the pending lists and the group again.
        self._history.clear()
        self._group_ready = False

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.experience, EXPERIENCE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _with_group(self, op: Callable[[], T]) -> T:
        if not self._group_ready:
            self._create_group()
        try:
            return op()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        logger.warning(
            "consumer group %r of %s is gone (Redis restarted or the stream was deleted); re-creating it",
            EXPERIENCE_GROUP,
            self.keys.experience,
        )
        self._create_group()
        return op()

    def push(self, data: bytes, fields: Mapping[str, str]) -> str:
        if "data" in fields:
            raise ValueError("the field name 'data' is reserved for the record bytes")
        entry = {"data": data, **fields}

        def op() -> str:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.keys.experience, entry)
            pipe.hincrby(self.keys.counters, "produced", 1)
            record_id, _ = pipe.execute()
            return _text(record_id)

        return self._retry("push", op)

    def _deliveries(self, entries: list, times: Mapping[str, int] | None = None) -> list[Delivery]:
        out = []
        for raw_id, raw_fields in entries:
            record_id, problem = _text(raw_id), None
            try:
                fields = {_text(k): _text(v) for k, v in raw_fields.items() if k != b"data"}
            except UnicodeDecodeError:  # not written by push: handed out to be dropped, not raised on every read
                fields, problem = {}, "its field names or values are not UTF-8"
            delivered = times.get(record_id, 2) if times is not None else 1
            out.append(Delivery(record_id, raw_fields.get(b"data", b""), fields, delivered, problem))
            self._held.add(record_id)
        return out

    def _read_history(self, consumer: str, count: int) -> list[Delivery]:
        """The next of `consumer`'s pending records not held by this object; [] once they are exhausted."""
        key = self.keys.experience
        while (cursor := self._history.get(consumer, "0")) is not None:
            reply = self.redis.xreadgroup(EXPERIENCE_GROUP, consumer, {key: cursor}, count=count)
            entries = reply[0][1] if reply else []
            if not entries:
                self._history[consumer] = None
                break
            self._history[consumer] = _text(entries[-1][0])
            deleted = [entry_id for entry_id, fields in entries if not fields]
            if deleted:  # deleted without an acknowledgement: nothing to deliver, clear the pending entry
                self.redis.xack(key, EXPERIENCE_GROUP, *deleted)
            fresh = [(i, f) for i, f in entries if f and _text(i) not in self._held]
            if fresh:
                pending = self.redis.xpending_range(
                    key, EXPERIENCE_GROUP, min=fresh[0][0], max=fresh[-1][0], count=len(entries), consumername=consumer
                )
                times = {_text(p["message_id"]): p["times_delivered"] for p in pending}
                deliveries = self._deliveries(fresh, times)
                logger.info("re-delivering %d unacknowledged records to consumer %s", len(deliveries), consumer)
                return deliveries
        return []

    def _read_once(self, consumer: str, count: int, block_ms: int | None) -> list[Delivery]:
        history = self._read_history(consumer, count)
        if history:
            return history
        reply = self.redis.xreadgroup(
            EXPERIENCE_GROUP, consumer, {self.keys.experience: ">"}, count=count, block=block_ms
        )
        return self._deliveries(reply[0][1]) if reply else []

    def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        deadline = time.monotonic() + block_s
        while True:
            remaining = deadline - time.monotonic()
            block_ms = int(min(remaining, BLOCK_SLICE_S) * 1000)
            block_ms = block_ms if block_ms >= 1 else None  # BLOCK 0 would wait forever
            out = self._retry("read", partial(self._with_group, partial(self._read_once, consumer, count, block_ms)))
            if out or block_ms is None or deadline - time.monotonic() <= 0:
                return out

    def ack(self, ids: list[str], counter: str | None = None) -> int:
        if not ids:
            return 0
        keys = [self.keys.experience, self.keys.counters]
        args = [EXPERIENCE_GROUP, counter or "", *ids]
        acked = self._retry("ack", lambda: self._ack(keys=keys, args=args))
        self._held.difference_update(ids)
        return int(acked)

    def reclaim(self, consumer: str, min_idle_s: float, count: int, live: Collection[str] = ()) -> list[Delivery]:
        """XPENDING (IDLE) + XCLAIM rather than XAUTOCLAIM, which would also hand a consumer its own
        idle records (duplicates of records it still holds)."""
        key, min_idle_ms = self.keys.experience, int(min_idle_s * 1000)
        keep = {consumer, *live}

        def op() -> list[Delivery]:
            candidates: dict[str, int] = {}  # id -> times delivered so far
            start, page = "-", max(count, 64)
            while len(candidates) < count:
                pending = self.redis.xpending_range(key, EXPERIENCE_GROUP, start, "+", page, idle=min_idle_ms)
                for p in pending:
                    if _text(p["consumer"]) not in keep and len(candidates) < count:
                        candidates[_text(p["message_id"])] = p["times_delivered"]
                if len(pending) < page:
                    break
                start = "(" + _text(pending[-1]["message_id"])
            if not candidates:
                return []
            claimed = self.redis.xclaim(key, EXPERIENCE_GROUP, consumer, min_idle_ms, list(candidates))
            entries = [(i, f) for i, f in claimed if i is not None and f]
            if len(entries) < len(claimed):  # records deleted meanwhile are now pending on us, as nil
                missing = sorted(candidates.keys() - {_text(i) for i, _ in entries})
                pipe = self.redis.pipeline(transaction=False)
                for record_id in missing:
                    pipe.xpending_range(key, EXPERIENCE_GROUP, record_id, record_id, 1, consumername=consumer)
                # Ours now and absent from the reply: deleted (not taken by another reclaimer meanwhile).
                gone = [record_id for record_id, mine in zip(missing, pipe.execute()) if mine]
                if gone:
                    self.redis.xack(key, EXPERIENCE_GROUP, *gone)
            deliveries = self._deliveries(entries, {i: n + 1 for i, n in candidates.items()})
            if deliveries:
                logger.info("consumer %s reclaimed %d records idle for over %g s", consumer, len(entries), min_idle_s)
            return deliveries

        return self._retry("reclaim", lambda: self._with_group(op))

    def stats(self) -> QueueStats:
        def op() -> QueueStats:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(self.keys.counters, "produced")
            pipe.xlen(self.keys.experience)
            pipe.xpending(self.keys.experience, EXPERIENCE_GROUP)
            produced, backlog, pending = pipe.execute(raise_on_error=False)
            for result in (produced, backlog):
                if isinstance(result, Exception):
                    raise result
            if isinstance(pending, Exception):
                if "NOGROUP" not in str(pending):
                    raise pending
                pending = {"pending": 0}  # no group yet: nothing was read
            return QueueStats(int(produced or 0), int(backlog), int(pending["pending"]))

        return self._retry("stats", op)

    def count(self, name: str, n: int = 1) -> int:
        return int(self._retry(f"count {name}", lambda: self.redis.hincrby(self.keys.counters, name, n)))

    def counters(self) -> dict[str, int]:
        raw = self._retry("counters", lambda: self.redis.hgetall(self.keys.counters))
        return {_text(k): int(v) for k, v in raw.items()}

    def run_marker(self, create: bool = False) -> str | None:
        key = self.keys.marker

        def op() -> bytes | None:
            if not create:
                return self.redis.get(key)
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(key, f"{uuid.uuid4().hex} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", nx=True)
            pipe.get(key)
            return pipe.execute()[1]

        value = self._retry(f"GET {key}", op)
        return None if value is None else value.decode(errors="replace")


# KEYS: manifest, latest, chunk 0 .. n-1; ARGV: version, manifest JSON, notice channel.
# Returns {"ok"}, {"stale", latest} or {"missing", chunks present}.
# Acknowledge, delete and count in one atomic step, counting only what this call acknowledged: a retry
# after a lost reply counts nothing twice, and no record is ever gone from the stream yet uncounted.
_ACK = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
if ARGV[2] ~= '' and acked > 0 then
    redis.call('HINCRBY', KEYS[2], ARGV[2], acked)
end
return acked
"""

_COMMIT = """
local latest = redis.call('GET', KEYS[2])
if latest and tonumber(latest) >= tonumber(ARGV[1]) then return {'stale', latest} end
local n = #KEYS - 2
if n > 0 then
  local present = redis.call('EXISTS', unpack(KEYS, 3))
  if present ~= n then return {'missing', tostring(present)} end
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {'ok'}
"""


class RedisWeightStore(_RedisTransport, WeightStore):
    """Weight bundles in chunks under `pso:{run}:weights:{version}:`, `latest` pointer, notice channel.

    `client`: from `connect(config)`. Publishing assumes one publisher per run; a second one racing it
    gets a ValueError at the commit.
    """

    def __init__(self, client: redis.Redis, config: RedisConfig) -> None:
        super().__init__(client, config, on_lost=None)
        self._commit = self.redis.register_script(_COMMIT)
        self._pubsub: redis.client.PubSub | None = None
        self._notices_lost = False

    def close(self) -> None:
        """Drop the notice subscription (the client is the caller's to close)."""
        self._drop_pubsub()

    def latest(self) -> int | None:
        key = self.keys.weights_latest
        value = self._retry(f"GET {key}", lambda: self.redis.get(key))
        if value is None:
            return None
        if not value.isdigit() or len(value) > 18:  # what publish writes: a version >= 0
            raise TransportError(
                f"{key} in Redis at {self.url} holds {value[:40]!r}, not a weight version: something other than "
                f"the learner wrote it. Delete the key (the learner then publishes afresh) or use another redis.run"
            )
        return int(value)

    def publish(self, version: int, data: bytes, tensors: Mapping[str, dict] | None = None) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        current = self.latest()
        if current is not None and version <= current:
            raise ValueError(f"weight version {version} is not newer than the latest published version {current}")
        started = time.monotonic()
        view = memoryview(data).cast("B")
        size, chunk = len(view), self.config.chunk_bytes
        n_chunks = -(-size // chunk)
        chunk_keys = [self.keys.chunk(version, i) for i in range(n_chunks)]
        # Indexed first, so that a publish interrupted midway is pruned later.
        self._retry("publish", lambda: self.redis.zadd(self.keys.weights_versions, {str(version): version}))
        keys = [self.keys.manifest(version), self.keys.weights_latest, *chunk_keys]
        hasher = digest.new()
        hasher.update(view)
        self._write_chunks(chunk_keys, view, chunk)
        manifest = json.dumps(
            {
                "version": version,
                "n_chunks": n_chunks,
                "total_bytes": size,
                digest.FIELD: hasher.hexdigest(),
                "chunk_bytes": chunk,
                "tensors": dict(tensors or {}),
            }
        )
        args = [version, manifest, self.keys.weights_notices]
        for attempt in range(3):
            if attempt:  # chunks lost between the writing and the commit
                self._write_chunks(chunk_keys, view, chunk)
            result = self._retry("publish", lambda: self._commit(keys=keys, args=args))
            status = _text(result[0])
            if status == "ok":
                break
            if status == "stale":
                raise ValueError(f"weight version {version} is not newer than the latest version {_text(result[1])}")
            logger.warning(
                "weights %d: %s of %d chunks survived the writing (Redis restarted?); writing them again (try %d)",
                version,
                _text(result[1]),
                n_chunks,
                attempt + 2,
            )
        else:
            raise TransportError(f"Redis at {self.url} kept losing the chunks of weight version {version}")
        elapsed = time.monotonic() - started
        logger.info("published weights %d: %.1f MB in %d chunks in %.2f s", version, size / 1e6, n_chunks, elapsed)
        self._prune()

    def _write_chunks(self, chunk_keys: list[str], view: memoryview, chunk: int) -> None:
        per_batch = max(1, BATCH_BYTES // chunk)
        for first in range(0, len(chunk_keys), per_batch):

            def op(first: int = first) -> None:
                pipe = self.redis.pipeline(transaction=False)
                for i in range(first, min(first + per_batch, len(chunk_keys))):
                    pipe.set(chunk_keys[i], view[i * chunk : (i + 1) * chunk])
                pipe.execute()

            self._retry("publish", op)

    def _prune(self) -> None:
        keep = self.config.keep_versions
        old = self._retry("prune", lambda: self.redis.zrange(self.keys.weights_versions, 0, -keep - 1))
        for raw in old:
            version = int(raw)
            self._retry("prune", lambda v=version: self._delete_version(v))
            logger.debug("pruned weights %d", version)

    def _delete_version(self, version: int) -> None:
        """Delete the manifest and chunks of `version`: those the manifest lists, then any further chunk
        (an interrupted publish writes a prefix of the chunks, and its manifest may be missing)."""
        raw = self.redis.get(self.keys.manifest(version))
        n_chunks = 0
        if raw is not None:
            try:
                n_chunks = int(json.loads(raw)["n_chunks"])
            except (ValueError, KeyError, TypeError):
                n_chunks = 0
        self.redis.delete(self.keys.manifest(version), *[self.keys.chunk(version, i) for i in range(n_chunks)])
        i = n_chunks
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for j in range(i, i + 16):
                pipe.delete(self.keys.chunk(version, j))
            if not all(pipe.execute()):
                break
            i += 16
        self.redis.zrem(self.keys.weights_versions, str(version))

    def manifest(self, version: int) -> dict:
        """The manifest of `version` (n_chunks, total_bytes, xxh3_128, chunk_bytes, tensors), checked for the
        fields a reader needs; WeightsUnavailable if it is missing or unreadable."""
        what = f"weights {version} of run {self.config.run!r}"
        raw = self._retry("fetch", lambda: self.redis.get(self.keys.manifest(version)))
        if raw is None:
            raise WeightsUnavailable(f"{what}: missing manifest (never published, or pruned)")
        try:
            manifest = json.loads(raw)
            for name in ("n_chunks", "total_bytes", "chunk_bytes"):
                manifest[name] = int(manifest[name])
            if manifest["chunk_bytes"] < 1 or not isinstance(manifest[digest.FIELD], str):
                raise ValueError(f"chunk_bytes {manifest['chunk_bytes']}, {digest.FIELD} {manifest[digest.FIELD]!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsUnavailable(f"{what}: unreadable manifest: {exc!r}") from exc
        return manifest

    def fetch(self, version: int, manifest: dict | None = None) -> bytearray:
        """The bundle of `version` in one buffer (writable, so that decode_weights loads the tensors in place).

        The chunk lengths are checked first (one round trip, before any bytes move), then the chunks are
        read in round trips of FETCH_BATCH_BYTES, each copied into the buffer and hashed: one pass.
        """
        what = f"weights {version} of run {self.config.run!r}"
        manifest = manifest or self.manifest(version)
        n_chunks, total, chunk = manifest["n_chunks"], manifest["total_bytes"], manifest["chunk_bytes"]
        keys = [self.keys.chunk(version, i) for i in range(n_chunks)]

        def lengths() -> list[int]:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            return pipe.execute()

        for i, length in enumerate(self._retry("fetch", lengths)):
            if length == 0:
                raise WeightsUnavailable(f"{what}: missing chunk {i} of {n_chunks} (pruned while reading?)")
            if length != min(chunk, total - i * chunk):
                raise WeightsUnavailable(
                    f"{what}: size mismatch: chunk {i} holds {length} bytes, manifest says {total} in all"
                )
        data = bytearray(total)
        view, hasher, per_batch = memoryview(data), digest.new(), max(1, FETCH_BATCH_BYTES // chunk)
        for first in range(0, n_chunks, per_batch):
            batch = keys[first : first + per_batch]
            for i, value in enumerate(self._retry("fetch", lambda batch=batch: self.redis.mget(batch)), start=first):
                at = i * chunk
                if value is None or len(value) != min(chunk, total - at):
                    raise WeightsUnavailable(f"{what}: chunk {i} of {n_chunks} changed while reading (pruned?)")
                view[at : at + len(value)] = value
                hasher.update(value)
        if hasher.hexdigest() != manifest[digest.FIELD]:
            raise WeightsUnavailable(f"{what}: checksum mismatch ({digest.FIELD} of the chunks is not the manifest's)")
        return data

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except redis.RedisError:
                pass
            self._pubsub = None

    def wait_for_notice(self, timeout_s: float) -> int | None:
        """The highest version announced within `timeout_s` (a burst of notices is drained at once).

        The first call subscribes; notices published before it are not seen (poll `latest`). A lost
        connection is retried until the timeout, then None: the caller's polling of `latest` reports it.
        """
        deadline = time.monotonic() + timeout_s
        best: int | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self._pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.weights_notices)
                    self._pubsub = pubsub
                message = self._pubsub.get_message(timeout=max(remaining, 0.0) if best is None else 0.0)
            except _LOST as exc:
                self._drop_pubsub()
                if not self._notices_lost:
                    logger.warning("weight notices from Redis at %s lost (%s); resubscribing", self.url, exc)
                    self._notices_lost = True
                if time.monotonic() >= deadline:
                    return best
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
                continue
            if self._notices_lost:
                logger.info("weight notices from Redis at %s resubscribed", self.url)
                self._notices_lost = False
            if message is None:
                if best is not None or time.monotonic() >= deadline:
                    return best
                continue
            if message.get("type") == "message":
                try:
                    version = int(message["data"])
                except ValueError:
                    logger.warning("ignoring a malformed weight notice %r", message["data"])
                    continue
                best = version if best is None else max(best, version)
