"""An actor facing a full Redis (maxmemory reached under noeviction, so every write is refused with an OOM
error) against a real Redis server: it keeps its batch and retries with backoff, says why and what to do
in an ERROR line, counts the refusals on its /metrics, lets /healthz fail once it has been stuck for
actor.stall_s, and pushes everything once there is room again. Other refusals still end the actor."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

import actors.actor as actor_module
from actors.actor import Actor, redis_full
from actors.metrics import ActorCollector
from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.ops_http import OpsServer
from pso.policy import DistilledPolicy
from pso.prompts import load_prompts
from pso.redis_server import LocalRedis, LocalRedisError
from pso.transport.base import TransportError
from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
from reward_server.app import create_app
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RETRY = re.compile(r"Retrying in ([\d.]+) s; refused (\d+) times")


@pytest.fixture(scope="module")
def reward_url() -> Iterator[str]:
    with serve_in_background(create_app(load_config(PSOConfig, TINY).reward_server)) as url:
        RewardClient(url).wait_ready(300)
        yield url


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    try:
        server = LocalRedis(start_timeout_s=60).start()
    except LocalRedisError as e:
        pytest.fail(f"no local Redis: {e}")
    with server:
        yield server


def _actor(redis_server: LocalRedis, reward_url: str, *overrides: str) -> tuple[PSOConfig, Actor]:
    cfg = load_config(
        PSOConfig,
        TINY,
        overrides=[
            f"redis.url={redis_server.url}",
            "redis.run=full",
            f"actor.reward_url={reward_url}",
            "actor.max_backlog=100000",
            "actor.prompts_per_batch=2",
            *overrides,
        ],
    )
    client = connect(cfg.redis)
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    prompts = load_prompts(cfg.actor.prompts, cfg.loop.prompts)
    queue, weights = RedisExperienceQueue(client, cfg.redis), RedisWeightStore(client, cfg.redis)
    return cfg, Actor(cfg, policy, prompts, queue, weights, RewardClient(reward_url), actor_id="a0")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_an_actor_waits_out_a_full_redis_loudly_and_pushes_everything_once_there_is_room(
    redis_server, reward_url, caplog, monkeypatch
):
    monkeypatch.setattr(actor_module, "REDIS_FULL_RETRY_S", (0.2, 0.8))
    cfg, actor = _actor(redis_server, reward_url, "actor.stall_s=1")
    admin = redis_server.client()
    registry = CollectorRegistry()
    registry.register(ActorCollector(actor))
    ops = OpsServer("actor", 0, registry, cfg.actor.stall_s, host="127.0.0.1")
    actor.on_progress = ops.beat
    base = f"http://127.0.0.1:{ops.port}"
    admin.config_set("maxmemory", 1)  # far below what Redis already uses: every write that needs memory fails
    stop, failed = threading.Event(), []

    def run() -> None:
        try:
            actor.run(stop)
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    caplog.set_level(logging.INFO, logger="pso.actor")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _wait(lambda: actor.stats.redis_full >= 4 or failed, 300, "four refused writes")
        assert not failed, f"the actor ended on a full Redis: {failed[0]!r}"
        assert thread.is_alive()
        assert admin.hget("pso:full:counters", "produced") is None and actor.stats.records == 0

        # loud: an ERROR line that names the cause and the fix, each time, with a growing delay
        errors = [r for r in caplog.records if r.name == "pso.actor" and r.levelno == logging.ERROR]
        assert len(errors) >= 4
        message = errors[0].getMessage()
        for words in ("Redis is full", "maxmemory", "noeviction", "the learner is not consuming", "raise maxmemory"):
            assert words in message, message
        retries = [RETRY.search(r.getMessage()).groups() for r in errors]
        delays = [float(d) for d, _ in retries]
        assert delays[:4] == [0.2, 0.4, 0.8, 0.8], delays
        assert [int(n) for _, n in retries] == list(range(1, len(retries) + 1))

        # visible: the counter on /metrics, and /healthz failing once stuck for longer than actor.stall_s
        metrics = httpx.get(f"{base}/metrics").text
        (count,) = re.findall(r"^pso_actor_redis_full_total (\S+)$", metrics, re.M)
        assert float(count) >= 4
        _wait(lambda: httpx.get(f"{base}/healthz").status_code == 503, 30, "/healthz to fail")

        # room again: the batch held is pushed, nothing lost, and the actor is healthy and goes on
        admin.config_set("maxmemory", 0)
        _wait(lambda: actor.stats.batches >= 2 or failed, 300, "two batches after Redis has room")
        _wait(lambda: httpx.get(f"{base}/healthz").status_code == 200, 30, "/healthz to recover")
    finally:
        stop.set()
        thread.join(120)
        ops.close()
    assert not failed, repr(failed[:1])
    produced = int(admin.hget("pso:full:counters", "produced"))
    assert produced == actor.stats.records == admin.xlen("pso:full:experience") > 0
    assert int(admin.hget("pso:full:counters", "actor_busy_ms")) > 0


def test_other_refusals_still_end_the_actor_and_only_oom_counts_as_full(redis_server, reward_url):
    _, actor = _actor(redis_server, reward_url)
    admin = redis_server.client()
    admin.set("pso:full:experience", "not a stream")  # XADD on it: WRONGTYPE, a mistake no wait can fix
    with pytest.raises(TransportError, match="WRONGTYPE") as refused:
        actor.step(threading.Event())
    assert not redis_full(refused.value) and actor.stats.redis_full == 0

    admin.delete("pso:full:experience")
    admin.config_set("maxmemory", 1)
    with pytest.raises(TransportError) as full:
        actor.queue.push(b"record", {"version": "0"})
    assert redis_full(full.value), repr(full.value.__cause__)
