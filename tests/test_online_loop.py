"""The online loop with real components: a real Redis server (pso/redis_server.py), the real reward
server, actors and a DeepSpeed learner on CPU, all on the built-in tiny model (configs/tiny.yaml).

The actors and the learner run as separate processes (`python -m pso.cli actor|learner -c CONFIG`)
reading a config file written here; the reward server runs on a thread of this process. Where one
process's behaviour is what is tested (refusing bad weights, waiting out the reward server), the
actor runs in-process on a thread, which makes the test deterministic.

Every record an actor pushes is accounted for by the counters in Redis (docs/protocol.md):
produced == trained + stale + corrupt + backlog (records still in the stream, pending ones included).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from actors.actor import Actor
from launcher.processes import Child
from pso.cli import main
from pso.codecs import decode_experience, decode_weights, encode_experience, encode_weights
from pso.config import dump_config, load_config
from pso.config.schema import LoraFinetune, PSOConfig
from pso.evaluation import score_model
from pso.policy import DistilledPolicy
from pso.prompts import load_prompts
from pso.redis_server import LocalRedis, free_port
from pso.report import read_metrics
from pso.tiny.rewards import large
from pso.tiny.world import all_scenes
from pso.transport.base import TransportError, WeightsUnavailable
from pso.transport.keys import EXPERIENCE_GROUP
from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
from reward_server.app import create_app
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
}
WEIGHTS_MOVE = re.compile(r"actor \S+: weights (\d+) -> (\d+)")
PUSHED = re.compile(r"batch \d+: version (\d+), .*, (\d+) records pushed")
PUBLISHED = re.compile(r"published weights version (\d+)")
LEARNER_DONE = re.compile(r"learner done: (\d+) updates, version (\d+)")
RESUMED = re.compile(r"resumed at update \d+, .*\((?P<acked>\d+) acknowledged now\)")


def tiny_config(*overrides: str) -> PSOConfig:
    return load_config(PSOConfig, TINY, overrides=list(overrides))


@pytest.fixture(scope="module")
def reward_url() -> Iterator[str]:
    """The real reward server (the tiny config's models), on a thread of this process, on a free port."""
    with serve_in_background(create_app(tiny_config().reward_server)) as url:
        RewardClient(url).wait_ready(300)
        yield url


class World:
    """One run: its own Redis, config files and child processes (all stopped, logs printed, at teardown)."""

    def __init__(self, tmp: Path, redis: LocalRedis, reward_url: str):
        self.tmp, self.redis, self.reward_url = tmp, redis, reward_url
        self.children: list[Child] = []

    def config(self, *overrides: str, name: str = "config") -> tuple[PSOConfig, Path]:
        """The tiny config pointed at this world (later overrides win), and the file the processes read."""
        base = [
            f"redis.url={self.redis.url}",
            "redis.retry_s=30",
            f"actor.reward_url={self.reward_url}",
            "actor.weight_poll_s=1",
            f"learner.metrics_file={self.tmp / 'learner' / 'metrics.jsonl'}",
            f"learner.checkpoint_dir={self.tmp / 'learner' / 'checkpoints'}",
            f"learner.run_dir={self.tmp / 'learner'}",
            "learner.checkpoint_every=1000",
        ]
        cfg = tiny_config(*base, *overrides)
        path = self.tmp / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        return cfg, path

    def start(self, name: str, module: str, *args: str) -> Child:
        child = Child(name, module, list(args), self.tmp / "logs" / f"{name}.log", ENV)
        self.children.append(child)
        return child

    def actor(self, i: int, config: Path, *extra: str) -> Child:
        return self.start(f"actor-{i}", "pso.cli", "actor", "-c", str(config), "--set", f"actor.id=actor-{i}", *extra)

    def learner(self, config: Path, *extra: str, name: str = "learner") -> Child:
        return self.start(name, "pso.cli", "learner", "-c", str(config), *extra)

    def queue(self, cfg: PSOConfig) -> RedisExperienceQueue:
        return RedisExperienceQueue(connect(cfg.redis), cfg.redis)

    def weights(self, cfg: PSOConfig) -> RedisWeightStore:
        return RedisWeightStore(connect(cfg.redis), cfg.redis)

    def logs(self) -> str:
        return "\n".join(f"----- {c.name} (exit {c.exit_code}) -----\n{c.tail(40)}" for c in self.children)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, watch: list[Child] = ()) -> None:
        """Poll until `predicate` holds; fail, with every log, when it does not in time or a watched child exits."""
        deadline = time.monotonic() + timeout
        while not predicate():
            for c in watch:
                if c.exit_code is not None:
                    pytest.fail(f"{c.name} exited with {c.exit_code} while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def wait_exit(self, child: Child, timeout: float, watch: list[Child] = ()) -> int:
        self.wait(lambda: child.exit_code is not None, timeout, f"{child.name} to exit", watch)
        return child.exit_code

    def stop(self) -> None:
        for c in sorted(self.children, key=lambda c: not c.name.startswith("actor")):
            c.stop(timeout=15)


@pytest.fixture
def world(tmp_path, reward_url) -> Iterator[World]:
    redis = LocalRedis(tmp_path / "redis", start_timeout_s=60).start()
    w = World(tmp_path, redis, reward_url)
    try:
        yield w
    finally:
        w.stop()
        print(w.logs())  # pytest shows it when the test failed
        redis.close()


# ---- reading what happened ----


def log_text(child: Child) -> str:
    return child.log_path.read_text(errors="replace")


def actor_versions(child: Child) -> list[int]:
    """The versions an actor moved to, in order (its "weights A -> B" lines), starting at 0."""
    versions = [0]
    for a, b in WEIGHTS_MOVE.findall(log_text(child)):
        assert int(a) == versions[-1], f"{child.name} moved from {a} but was at {versions[-1]}:\n{child.tail()}"
        versions.append(int(b))
    return versions


def records_pushed(child: Child) -> int:
    return sum(int(n) for _, n in PUSHED.findall(log_text(child)))


def published(child: Child) -> list[int]:
    return [int(v) for v in PUBLISHED.findall(log_text(child))]


def metrics_rows(cfg: PSOConfig) -> list[dict]:
    return read_metrics(cfg.learner.metrics_file)


def updates_done(cfg: PSOConfig) -> int:
    rows = metrics_rows(cfg)
    return int(rows[-1]["updates"]) if rows else 0


def accounting(queue: RedisExperienceQueue) -> dict[str, int]:
    counters, stats = queue.counters(), queue.stats()
    names = ("produced", "trained", "stale", "corrupt", "redelivered")
    return {**{n: counters.get(n, 0) for n in names}, "backlog": stats.backlog, "pending": stats.pending}


def assert_accounted(acc: dict[str, int]) -> None:
    """Every record produced is trained, stale, corrupt or still in the stream (docs/protocol.md)."""
    assert acc["produced"] > 0, acc
    assert acc["produced"] == acc["trained"] + acc["stale"] + acc["corrupt"] + acc["backlog"], acc


def reward_gain(cfg: PSOConfig, weights: RedisWeightStore, seed: int = 1234) -> dict[str, float]:
    """The tiny `large` reward (the one trained on) of the newest published weights against the base model:
    one image per tiny-world prompt (168), the same starting noise for both."""
    prompts = [s.prompt for s in all_scenes()]
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    version = weights.latest()
    assert version, "no weights were published"
    policy.load_weights(decode_weights(weights.fetch(version), expected=policy.weight_spec()))
    base = score_model(policy, prompts, {"large": large}, seed, reference=True)[0]["large"]
    tuned = score_model(policy, prompts, {"large": large}, seed)[0]["large"]
    diff = tuned - base
    return {
        "version": version,
        "base": float(base.mean()),
        "tuned": float(tuned.mean()),
        "gain": float(diff.mean()),
        "stderr": float(diff.std() / len(diff) ** 0.5),
        "win_rate": float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()),
    }


def check_ops_endpoints(ops: dict[str, int]) -> None:
    """The learner's and the actors' health, metrics and scaling routes, as a probe or Prometheus sees them."""
    get = lambda port, path: httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60)  # noqa: E731
    for name, port in ops.items():
        health = get(port, "/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", (name, health.text)
        assert get(port, "/nope").status_code == 404
    scaling = get(ops["learner"], "/v1/scaling").json()
    print("learner /v1/scaling:", scaling)
    assert scaling["per_actor_per_s"] > 0 and scaling["actors_wanted"] > 0, scaling
    assert "pso_learner_actors_wanted " in get(ops["learner"], "/metrics").text
    batches = re.search(r"^pso_actor_batches_total (\S+)$", get(ops["actor-0"], "/metrics").text, re.M)
    assert batches and float(batches.group(1)) > 0


def kill(child: Child) -> None:
    """SIGKILL the child's whole process group and reap it."""
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait(60)


# ---- 1. the happy path ----


@pytest.mark.slow
def test_two_actors_and_a_learner_raise_the_reward_and_account_for_every_record(world):
    updates = 40  # 30 updates at lr 1e-3 gave +0.006 +- 0.001 (win rate 0.75), 40 gave +0.009 +- 0.0013
    ops = {"learner": free_port(), "actor-0": free_port(), "actor-1": free_port()}
    cfg, path = world.config(f"learner.max_updates={updates}", f"learner.metrics_port={ops['learner']}")
    started = time.monotonic()
    learner = world.learner(path)
    actors = [world.actor(i, path, "--set", f"actor.metrics_port={ops[f'actor-{i}']}") for i in range(2)]
    world.wait(lambda: updates_done(cfg) >= 20, 300, "20 updates", watch=[learner, *actors])
    check_ops_endpoints(ops)
    assert world.wait_exit(learner, 400, watch=actors) == 0, world.logs()
    print(f"{updates} updates in {time.monotonic() - started:.1f} s")
    for a in actors:
        assert a.exit_code is None, f"{a.name} died:\n{a.tail()}"
        a.stop()

    acc = accounting(world.queue(cfg))
    print("counters:", acc)
    assert_accounted(acc)
    # best-vs-worst pairing gives one pair per record, so every update finishes pairs_per_step records
    assert acc["trained"] == updates * cfg.optim.pairs_per_step, acc
    assert acc["redelivered"] == 0 and acc["corrupt"] == 0, acc
    assert sum(records_pushed(a) for a in actors) <= acc["produced"]  # a log line follows its pushes

    rows = metrics_rows(cfg)
    assert [r["updates"] for r in rows] == list(range(1, updates + 1))
    assert all(r["actors_wanted"] > 0 for r in rows[5:]), [r.get("actors_wanted") for r in rows]
    assert published(learner) == list(range(updates + 1))  # version 0 (the base), then one per update
    assert LEARNER_DONE.search(log_text(learner)).groups() == (str(updates), str(updates))

    for a in actors:
        versions = actor_versions(a)
        print(a.name, "versions", versions)
        assert versions == sorted(set(versions)), f"{a.name} went back: {versions}"
        assert len(versions) >= 3 and versions[-1] >= updates // 2, versions
        sampled = [int(v) for v, _ in PUSHED.findall(log_text(a))]
        assert sampled == sorted(sampled), f"{a.name} sampled with an older version after a newer one: {sampled}"

    gain = reward_gain(cfg, world.weights(cfg))
    print("tiny-large, base vs final weights:", gain)
    assert gain["version"] == updates
    assert gain["gain"] > 0.003 and gain["gain"] > 3 * gain["stderr"], gain
    assert gain["win_rate"] > 0.6, gain


# ---- 2. two learner ranks ----


@pytest.mark.slow
def test_two_learner_ranks_under_torchrun_both_train(world):
    updates = 6
    cfg, path = world.config(f"learner.max_updates={updates}", "learner.max_staleness=8")
    learner = world.learner(path, "--nproc-per-node", "2", "--master-port", str(free_port()))  # re-runs under torchrun
    actors = [world.actor(i, path) for i in range(2)]
    assert world.wait_exit(learner, 400, watch=actors) == 0, world.logs()
    for a in actors:
        a.stop()

    text = log_text(learner)
    assert "2 rank(s) on cpu" in text, text[-3000:]
    queue = world.queue(cfg)
    acc = accounting(queue)
    print("counters:", acc)
    assert_accounted(acc)
    # each update takes pairs_per_step one-pair records on every rank: more than one rank alone could finish
    one_rank = updates * cfg.optim.pairs_per_step
    assert acc["trained"] == 2 * one_rank, acc
    consumers = {c["name"].decode() for c in queue.redis.xinfo_consumers(queue.keys.experience, EXPERIENCE_GROUP)}
    assert consumers == {"learner-0", "learner-1"}
    assert published(learner) == list(range(updates + 1))  # rank 0 alone publishes
    assert world.weights(cfg).latest() == updates
    assert [r["updates"] for r in metrics_rows(cfg)] == list(range(1, updates + 1))  # rank 0 alone writes


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of learner rank `rank`, a child of the torchrun process `launcher_pid`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under process {launcher_pid}")


@pytest.mark.slow
def test_a_hung_rank_fails_the_learner_after_collective_timeout_s(world):
    """A rank that stops answering (SIGSTOP: hung, not dead) holds the others in their next collective for
    learner.collective_timeout_s, then they fail and the learner exits non-zero, to be restarted."""
    timeout = 20
    cfg, path = world.config(f"learner.collective_timeout_s={timeout}", "learner.max_staleness=8")
    learner = world.learner(
        path, "--nproc-per-node", "2", "--master-port", str(free_port()), "--shutdown-timeout", "5"
    )  # fmt: skip
    actors = [world.actor(i, path) for i in range(2)]
    world.wait(lambda: updates_done(cfg) >= 2, 300, "two updates", [learner, *actors])
    os.kill(rank_pid(learner.proc.pid, 1), signal.SIGSTOP)
    hung_at, done = time.monotonic(), updates_done(cfg)
    code = world.wait_exit(learner, 300, watch=actors)
    waited = time.monotonic() - hung_at
    print(f"rank 1 hung after {done} updates; the learner exited {code} after {waited:.0f} s")
    assert code not in (0, None), world.logs()
    # rank 0 failed on the timeout, not sooner (it may have entered its collective up to one read before the stop)
    assert waited >= timeout - 2 * cfg.learner.read_block_s - 3, waited
    assert updates_done(cfg) <= done + 1  # rank 0 could not update without rank 1
    assert re.search(r"[Tt]imed out|[Tt]imeout", log_text(learner)), log_text(learner)[-3000:]


# ---- 3. faults ----


@pytest.mark.slow
def test_a_killed_actor_loses_nothing_and_the_run_goes_on(world):
    updates = 14
    cfg, path = world.config(f"learner.max_updates={updates}")
    learner = world.learner(path)
    victim, survivor = world.actor(0, path), world.actor(1, path)
    world.wait(lambda: records_pushed(victim) >= 16 and updates_done(cfg) >= 2, 300, "a few records", [learner])
    kill(victim)
    killed_at = world.queue(cfg).stats().produced
    survivor_before = records_pushed(survivor)
    print(f"killed actor-0 after {records_pushed(victim)} records logged; {killed_at} produced")

    assert world.wait_exit(learner, 400, watch=[survivor]) == 0, world.logs()
    assert records_pushed(survivor) > survivor_before  # the run went on with the other actor
    survivor.stop()
    acc = accounting(world.queue(cfg))
    print("counters:", acc)
    assert acc["produced"] > killed_at  # the survivor went on producing
    assert acc["redelivered"] == 0 and acc["corrupt"] == 0, acc  # the learner never lost a record it held
    assert_accounted(acc)
    assert acc["trained"] == updates * cfg.optim.pairs_per_step, acc
    assert updates_done(cfg) == updates


@pytest.mark.slow
def test_a_killed_learner_resumes_from_its_checkpoint_with_growing_versions(world):
    updates, every = 14, 4
    cfg, path = world.config(f"learner.max_updates={updates}", f"learner.checkpoint_every={every}")
    first = world.learner(path, name="learner")
    actors = [world.actor(i, path) for i in range(2)]
    world.wait(lambda: updates_done(cfg) >= every + 2, 300, f"{every + 2} updates", [first, *actors])
    kill(first)
    queue = world.queue(cfg)
    held = queue.redis.xpending(queue.keys.experience, EXPERIENCE_GROUP)["pending"]  # read, not acknowledged
    done_before = updates_done(cfg)
    before = published(first)
    latest_before = world.weights(cfg).latest()
    print(f"killed the learner after {done_before} updates; published {before}, latest {latest_before}")
    assert done_before < updates

    second = world.learner(path, "--resume", name="learner-resumed")
    assert world.wait_exit(second, 400, watch=actors) == 0, world.logs()
    for a in actors:
        a.stop()

    text = log_text(second)
    resumed = re.search(r"resumed at update (\d+), version (\d+)", text)
    assert resumed, text[-3000:]
    resumed_at = int(resumed.group(1))
    # the newest checkpoint (its metrics row may not have been written when the learner died)
    assert resumed_at % every == 0 and every <= resumed_at <= done_before + 1, (resumed_at, done_before)
    after = published(second)
    print("published after the resume:", after)
    assert after and after[0] > max(before) and after[0] > latest_before, (before, latest_before, after)
    assert after == sorted(set(after))
    # learner.max_updates counts every update, those before the resume included
    assert LEARNER_DONE.search(text).group(1) == str(updates)
    assert updates_done(cfg) == updates
    assert len(after) == updates - resumed_at
    for a in actors:
        versions = actor_versions(a)
        assert versions == sorted(set(versions)), f"{a.name} went back: {versions}"
    acc = accounting(world.queue(cfg))
    covered = int(RESUMED.search(text)["acked"])  # pending, but trained into the checkpoint it resumed from
    print(f"counters: {acc}; records redelivered after the restart: {acc['redelivered']}, {covered} covered")
    assert acc["redelivered"] == held - covered, (acc, held)  # the rest of what it held comes back, once each
    assert_accounted(acc)


def stream_records(queue: RedisExperienceQueue) -> list[tuple[bytes, dict[str, str]]]:
    """Every entry of the run's stream, in order: the record bytes and the other fields."""
    entries = queue.redis.xrange(queue.keys.experience)
    return [(f[b"data"], {k.decode(): v.decode() for k, v in f.items() if k != b"data"}) for _, f in entries]


def latest_tensors(weights: RedisWeightStore) -> dict[str, torch.Tensor]:
    return decode_weights(weights.fetch(weights.latest())).tensors


@pytest.mark.slow
def test_a_learner_killed_at_random_points_trains_every_pair_into_the_model_once(world):
    """SIGKILL the real learner at random moments (mid-update, mid-checkpoint, mid-publish) and resume it,
    several times: its final weights are bit-identical to a learner that ran once, uninterrupted, on a copy
    of the same records (no pair lost from the model, none trained twice), and the counters agree."""
    rng = random.Random(int(os.environ.get("PSO_KILL_SEED", "12")))
    updates = 18
    common = ["pairing.strategy=all-pairs", "learner.max_staleness=100000", "learner.checkpoint_every=2",
              f"learner.max_updates={updates}"]  # fmt: skip
    cfg, queue, _ = run_with_experience(world, "actor.max_batches=3", *common)
    records = stream_records(queue)
    pairs = sum(len(decode_experience(data).pairs) for data, _ in records)
    assert pairs >= updates * cfg.optim.pairs_per_step, f"{pairs} pairs pushed"

    ref_cfg, ref_path = world.config(
        *common, "redis.run=reference", f"learner.checkpoint_dir={world.tmp / 'ref' / 'ckpt'}",
        f"learner.run_dir={world.tmp / 'ref'}",
        f"learner.metrics_file={world.tmp / 'ref' / 'metrics.jsonl'}", name="reference",
    )  # fmt: skip
    ref_queue = world.queue(ref_cfg)
    for data, fields in records:
        ref_queue.push(data, fields)
    reference = world.learner(ref_path, name="reference")

    _, path = world.config("actor.max_backlog=100000", *common)
    kills = []
    for i, target in enumerate(sorted(rng.sample(range(2, updates - 3), 4))):
        learner = world.learner(path, "--resume", name=f"learner-{i}")
        world.wait(lambda t=target: updates_done(cfg) >= t, 300, f"update {target}", [learner])
        time.sleep(rng.uniform(0, 0.6))  # somewhere in the next update, publish or checkpoint
        kill(learner)
        kills.append(updates_done(cfg))
    last = world.learner(path, "--resume", name="learner-last")
    assert world.wait_exit(last, 400) == 0, world.logs()
    assert world.wait_exit(reference, 400) == 0, world.logs()
    print(f"killed after updates {kills}")
    assert updates_done(cfg) == updates

    want, got = latest_tensors(world.weights(ref_cfg)), latest_tensors(world.weights(cfg))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed learner's weights differ"
    acc, ref_acc = accounting(queue), accounting(ref_queue)
    print(f"killed run: {acc}; uninterrupted: {ref_acc}")
    names = ("produced", "trained", "stale", "corrupt", "backlog")
    assert {n: acc[n] for n in names} == {n: ref_acc[n] for n in names}
    assert acc["stale"] == acc["corrupt"] == 0
    assert_accounted(acc)


class _CorruptChunkStore(RedisWeightStore):
    """Publishes with chunk 0 overwritten (one byte flipped) after the chunks are written and before the
    commit: the manifest holds the checksum of the good bytes, and the version is corrupt from the moment
    it is visible, so no reader can have fetched it intact first."""

    def _write_chunks(self, chunk_keys, view, chunk):
        super()._write_chunks(chunk_keys, view, chunk)
        good = self.redis.get(chunk_keys[0])
        self.redis.set(chunk_keys[0], bytes([good[0] ^ 0xFF]) + good[1:])  # a raw SET on weights:{v}:chunk:0


@contextmanager
def running_actor(cfg: PSOConfig, reward_url: str, actor_id: str = "a0") -> Iterator[Actor]:
    """A real Actor on a thread with its own Redis connection; stopped (and its errors raised) on exit."""
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    client = connect(cfg.redis)
    actor = Actor(
        cfg,
        policy,
        load_prompts(cfg.actor.prompts, cfg.loop.prompts),
        RedisExperienceQueue(client, cfg.redis),
        RedisWeightStore(client, cfg.redis),
        RewardClient(reward_url),
        actor_id=actor_id,
    )
    stop, errors = threading.Event(), []

    def run():
        try:
            actor.run(stop)
        except BaseException as e:  # noqa: B036 - reported by the test thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True, name=f"actor-{actor_id}")
    thread.start()
    try:
        yield actor
        assert not errors, errors
        assert thread.is_alive(), "the actor stopped by itself"
    finally:
        stop.set()
        thread.join(300)  # the batch in hand is finished first
        client.close()
    if errors:
        raise errors[0]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_an_actor_pauses_while_more_than_max_backlog_records_wait_and_resumes_when_they_are_read(world, caplog):
    cfg, _ = world.config("actor.max_backlog=8", "learner.target_backlog=4")  # one batch is 8 records
    queue = world.queue(cfg)
    caplog.set_level("INFO", logger="pso.actor")
    with running_actor(cfg, world.reward_url) as actor:
        wait_for(lambda: "pausing, 16 records wait (bound 8)" in caplog.text, 300, "the actor to pause")
        assert queue.stats().produced == 16  # 0 and then 8 waiting were within the bound, 16 are not
        assert actor.stats.batches == 2
        # a version published during the pause is what the next batch samples with (not one stale already)
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        bundle = policy.export_weights(1)
        world.weights(cfg).publish(1, encode_weights(bundle), bundle.manifest())
        taken = queue.read("learner-0", count=16, block_s=1)
        queue.ack([d.id for d in taken], counter="trained")
        wait_for(lambda: actor.stats.batches >= 3, 300, "the actor to resume")
        assert actor.stats.backpressure_s > 0
        assert {d.fields["version"] for d in queue.read("learner-0", count=16, block_s=1)} == {"1"}


def test_an_actor_refuses_a_corrupt_weight_version_and_keeps_its_weights(world):
    cfg, _ = world.config("redis.chunk_bytes=16384", "actor.prompts_per_batch=2", "actor.max_backlog=100000")
    publisher = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    with torch.no_grad():
        for p in publisher.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    good = publisher.export_weights(1)
    store, corrupt_store = world.weights(cfg), _CorruptChunkStore(connect(cfg.redis), cfg.redis)
    wrong_shape = DistilledPolicy.from_config(cfg.model, LoraFinetune(rank=4)).export_weights(3)

    with running_actor(cfg, world.reward_url) as actor:
        store.publish(1, encode_weights(good))
        wait_for(lambda: actor.version == 1, 120, "the actor to move to version 1")
        n_chunks = json.loads(store.redis.get(store.keys.manifest(1)))["n_chunks"]
        assert n_chunks > 1  # several chunks, one of them corrupt below

        good2 = publisher.export_weights(2)
        good2.tensors = {k: v + 1.0 for k, v in good2.tensors.items()}  # what the actor must never load
        corrupt_store.publish(2, encode_weights(good2))
        assert store.latest() == 2
        with pytest.raises(WeightsUnavailable, match="checksum"):
            store.fetch(2)
        wait_for(lambda: 2 in actor.stats.refused, 120, "the actor to refuse version 2")
        batches = actor.stats.batches
        wait_for(lambda: actor.stats.batches >= batches + 2, 180, "two more batches after the refusal")
        assert actor.version == 1 and actor.stats.versions == [0, 1]
        assert "checksum" in actor.stats.refused[2]

        store.publish(3, encode_weights(wrong_shape))  # intact, but its tensors do not fit the model
        wait_for(lambda: 3 in actor.stats.refused, 120, "the actor to refuse version 3")
        assert actor.version == 1
        held = actor.policy.trainable_state_dict()
        for name, tensor in good.tensors.items():
            assert torch.equal(held[name], tensor), f"{name} changed: the actor did not keep version 1's weights"

        store.publish(4, encode_weights(publisher.export_weights(4)))
        wait_for(lambda: actor.version == 4, 120, "the actor to move on to version 4")
        batches = actor.stats.batches  # the batch that moved to version 4 ends after this count, or is in it
        assert actor.stats.versions == [0, 1, 4]
        assert set(actor.stats.refused) == {2, 3}
        wait_for(lambda: actor.stats.batches >= batches + 1, 180, "a batch with version 4")

    sampled = [int(f[b"version"]) for _, f in store.redis.xrange(store.keys.experience)]
    assert sampled == sorted(sampled) and set(sampled) <= {0, 1, 4} and 4 in sampled, sampled


class _CountingStore(RedisWeightStore):
    """A real store that counts the fetches of each version."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fetched: dict[int, int] = {}

    def fetch(self, version: int) -> bytes:
        self.fetched[version] = self.fetched.get(version, 0) + 1
        return super().fetch(version)


def test_an_actor_refuses_a_bundle_stored_under_another_version_and_never_fetches_a_refused_one_again(world):
    cfg, _ = world.config("actor.weight_poll_s=0.01")
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    client = connect(cfg.redis)
    store = _CountingStore(client, cfg.redis)
    prompts = load_prompts(cfg.actor.prompts, cfg.loop.prompts)
    actor = Actor(cfg, policy, prompts, RedisExperienceQueue(client, cfg.redis), store, RewardClient(world.reward_url))
    store.publish(8, encode_weights(policy.export_weights(7)))  # intact bytes, but they say version 7
    for _ in range(3):
        time.sleep(0.02)  # past weight_poll_s: every call polls `latest`
        actor.refresh_weights()
    assert actor.version == 0 and actor.stats.versions == [0]
    assert "says it is version 7" in actor.stats.refused[8]
    assert store.fetched == {8: 1}  # refused once, then skipped
    store.publish(9, encode_weights(policy.export_weights(9)))
    time.sleep(0.02)
    actor.refresh_weights()
    assert actor.version == 9 and store.fetched == {8: 1, 9: 1}


@pytest.mark.slow
def test_actors_wait_out_a_reward_server_outage_and_recover(world):
    port = free_port()
    reward_cfg = tiny_config().reward_server
    url = f"http://127.0.0.1:{port}"
    cfg, path = world.config(f"actor.reward_url={url}", "actor.max_backlog=100000", "actor.prompts_per_batch=4")
    queue = world.queue(cfg)
    produced = lambda: queue.stats().produced  # noqa: E731
    with serve_in_background(create_app(reward_cfg), port=port):
        actor = world.actor(0, path)
        world.wait(lambda: produced() >= 12, 180, "records before the outage", [actor])
    # The server is gone. A batch scored just before is still pushed; the actor works one batch at a time
    # (sample, score, push), so once it has failed to reach the server it is past that batch, however
    # slowly a busy machine runs it: from then on nothing may be pushed.
    since = actor.log_path.stat().st_size
    retries = lambda: actor.log_path.read_bytes()[since:].count(b"retrying")  # noqa: E731
    world.wait(lambda: retries() >= 1, 60, "the actor to find the reward server gone", [actor])
    during, seen = produced(), retries()
    time.sleep(6.0)  # the outage lasts at least this long, and the actor tries again meanwhile
    world.wait(lambda: retries() >= seen + 2, 60, "the actor to retry during the outage", [actor])
    assert actor.exit_code is None, f"the actor died while the reward server was away:\n{actor.tail()}"
    assert produced() == during, "records were pushed while the reward server was away"

    with serve_in_background(create_app(reward_cfg), port=port):
        world.wait(lambda: produced() >= during + 8, 240, "records after the reward server came back", [actor])
    print(f"{during} records before the outage, {produced()} after")


@pytest.mark.slow
def test_a_redis_restart_mid_run_is_survived_by_actors_and_learner(world):
    updates = 16
    cfg, path = world.config(f"learner.max_updates={updates}", "redis.retry_s=60")
    learner = world.learner(path)
    actors = [world.actor(i, path) for i in range(2)]
    world.wait(lambda: updates_done(cfg) >= 5, 300, "5 updates", [learner, *actors])
    world.redis.restart()  # same port, every key lost
    restarted_at = updates_done(cfg)
    print(f"Redis restarted after {restarted_at} updates")

    assert world.wait_exit(learner, 400, watch=actors) == 0, world.logs()
    for a in actors:
        assert a.exit_code is None, f"{a.name} died:\n{a.tail()}"
    assert updates_done(cfg) == updates
    assert LEARNER_DONE.search(log_text(learner)).group(1) == str(updates)
    # published into the new Redis: once when the learner found the run gone, then after every update
    assert world.weights(cfg).latest() == updates + 1
    acc = accounting(world.queue(cfg))
    print("counters since the restart:", acc)
    assert acc["produced"] > 0 and acc["trained"] > 0  # experience flowed through the new Redis
    assert sum(records_pushed(a) for a in actors) > acc["produced"]  # what was pushed before is gone
    for a in actors:
        text = log_text(a)
        assert "answers again" in text or "resubscribed" in text, a.tail()
        versions = actor_versions(a)
        assert versions == sorted(set(versions)) and versions[-1] > restarted_at, versions
    learner_log = log_text(learner)
    assert "answers again" in learner_log or "re-creating it" in learner_log, learner_log[-3000:]
    lost = re.search(r"Redis lost run \S+ data .*: (\d+) records waiting unread .*were: produced (\d+)", learner_log)
    assert lost, learner_log[-3000:]  # said once, with what was lost
    assert len(re.findall("Redis lost run", learner_log)) == 1, learner_log[-3000:]
    assert int(lost[2]) >= restarted_at * cfg.optim.pairs_per_step, lost[0]  # the counters before the restart
    assert metrics_rows(cfg)[-1]["records_lost"] == int(lost[1])


class _Killed(Exception):
    """Stands for the learner dying (SIGKILL, OOM, or a Redis outage longer than redis.retry_s) right here."""


class _DyingQueue(RedisExperienceQueue):
    """The learner's queue; the learner dies right after its first acknowledgement of one kind:
    "trained" (the records of an update) or "stale" (a stale record dropped)."""

    def __init__(self, client, config, point: str):
        super().__init__(client, config)
        self.point = point

    def ack(self, ids: list[str], counter: str | None = None) -> int:
        super().ack(ids, counter)
        if counter == self.point:
            raise _Killed  # the acknowledgement (and its count) is in Redis, nothing after it ran


def in_process_learner(cfg: PSOConfig, queue: RedisExperienceQueue, weights: RedisWeightStore):
    """The real Learner on the real DeepSpeed engine (one CPU rank) in this process, for tests that inject
    faults into its queue or look at one decision of it."""
    from learner.engine import LearnerEngine
    from learner.learner import Learner

    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    return Learner(cfg, LearnerEngine(policy, cfg.loss, cfg.optim, cfg.learner), queue, weights)


def push_actor_batches(world: World, cfg: PSOConfig, queue: RedisExperienceQueue, weights: RedisWeightStore) -> None:
    """`actor.max_batches` batches from a real actor (on this thread), sampled with version 0."""
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    prompts = load_prompts(cfg.actor.prompts, cfg.loop.prompts)
    Actor(cfg, policy, prompts, queue, weights, RewardClient(world.reward_url), actor_id="a0").run()


def run_with_experience(
    world: World, *overrides: str, store: type[RedisWeightStore] = RedisWeightStore
) -> tuple[PSOConfig, RedisExperienceQueue, RedisWeightStore]:
    """A config of this world (no back-pressure), its queue and weight store, and `actor.max_batches`
    batches pushed by a real actor."""
    cfg, _ = world.config("actor.max_backlog=100000", *overrides)
    client = connect(cfg.redis)
    queue, weights = RedisExperienceQueue(client, cfg.redis), store(client, cfg.redis)
    push_actor_batches(world, cfg, queue, weights)
    return cfg, queue, weights


@pytest.mark.parametrize("point", ["trained", "stale"])
def test_a_learner_dying_right_after_an_ack_keeps_every_record_accounted(world, point):
    cfg, queue, weights = run_with_experience(world, "actor.max_batches=2", "learner.checkpoint_every=1")
    assert queue.stats().produced >= 2 * cfg.optim.pairs_per_step

    learner = in_process_learner(cfg, _DyingQueue(queue.redis, cfg.redis, point), weights)
    if point == "stale":
        learner.state.version = cfg.learner.max_staleness + 1  # every record is stale (and dropped)
    with pytest.raises(_Killed):
        learner.run()
    acc = accounting(queue)
    print(f"the learner died after {point!r}: {acc}")
    assert_accounted(acc)
    assert acc[point] > 0, acc  # it died after acknowledging some as `point`


def test_a_record_exactly_max_staleness_versions_old_is_trained_one_older_is_dropped(world):
    for age, run in [(4, "at-the-limit"), (5, "over-it")]:
        cfg, queue, weights = run_with_experience(world, "actor.max_batches=1", f"redis.run={run}")  # version 0
        assert cfg.learner.max_staleness == 4
        learner = in_process_learner(cfg, queue, weights)
        learner.state.version = age  # a new run: the learner publishes this version first
        n = cfg.actor.prompts_per_batch
        run_until(learner, lambda st=learner.state, n=n: st.trained_records + st.stale == n)
        acc = accounting(queue)
        print(f"records {age} versions old: {acc}")
        assert (acc["trained"], acc["stale"]) == ((n, 0) if age == 4 else (0, n)), acc
        assert_accounted(acc)


def test_stale_records_are_trained_at_a_lower_weight_when_downweighted(world):
    cfg, queue, weights = run_with_experience(
        world, "actor.max_batches=1", "learner.stale=downweight", "learner.max_updates=1"
    )
    learner = in_process_learner(cfg, queue, weights)
    learner.state.version = cfg.learner.max_staleness + 1  # every record is stale
    seen = []
    update = learner.engine.update
    learner.engine.update = lambda batch, weights=None, **kw: seen.append(weights) or update(batch, weights, **kw)
    state = learner.run()
    n = cfg.actor.prompts_per_batch
    assert state.trained_records == n and state.stale == n
    assert len(seen) == 1 and seen[0].tolist() == [cfg.learner.stale_weight] * n  # the real engine got the weights
    acc = accounting(queue)
    assert (acc["trained"], acc["stale"], queue.counters()["downweighted"]) == (n, 0, n), acc
    assert_accounted(acc)


def test_weights_are_published_every_publish_every_updates(world):
    cfg, queue, weights = run_with_experience(
        world, "actor.max_batches=4", "learner.publish_every=2", "learner.max_updates=4", store=_CountingStore
    )
    published_versions = []
    publish = weights.publish
    weights.publish = lambda version, *a, **kw: published_versions.append(version) or publish(version, *a, **kw)
    state = in_process_learner(cfg, queue, weights).run()
    assert state.updates == 4 and state.version == 2
    assert published_versions == [0, 1, 2] and weights.latest() == 2  # the base, then after updates 2 and 4


@pytest.mark.slow
def test_the_learner_draws_and_exports_its_run_into_its_folder_tensorboard_and_wandb(world):
    """A grid per version on the same prompts and noise, the reward curve and the export, in the learner's run
    folder and, as images, in TensorBoard and an offline W&B run: what a deployed learner leaves to look at.
    Its last update, which publish_every would skip, is published too: version, checkpoint and export agree."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = world.tmp / "tensorboard"
    cfg, queue, weights = run_with_experience(
        world, "actor.max_batches=5", "learner.publish_every=2", "learner.max_updates=5", "learner.grid_every=1",
        "learner.export_every=1", f"learner.tensorboard_dir={tb}", "learner.wandb.project=pso-tests",
        "learner.wandb.mode=offline",
    )  # fmt: skip
    state = in_process_learner(cfg, queue, weights).run()
    assert state.version == 3 and weights.latest() == 3  # published after updates 2 and 4, and the last, 5
    assert decode_weights(weights.fetch(3)).metadata["updates"] == 5
    run = cfg.learner.run_dir
    grids = sorted((run / "grids").glob("v*.png"))
    assert [g.name for g in grids] == ["v0000.png", "v0001.png", "v0002.png", "v0003.png"]
    first, last = (np.asarray(Image.open(g)) for g in (grids[0], grids[-1]))
    assert first.shape == last.shape and (first != last).any()  # same prompts and noise, trained weights
    assert (run / "reward_curve.png").stat().st_size > 0
    card = (run / "lora" / "README.md").read_text()
    assert "| weight version | 3 |" in card and "| updates | 5 |" in card and not list(run.glob(".lora*"))
    # the export holds the last version's weights, as pso export writes them from the final checkpoint
    assert main(["export", str(run), "--out", str(world.tmp / "exported")]) == 0
    ours, theirs = (load_file(d / "pytorch_lora_weights.safetensors") for d in (run / "lora", world.tmp / "exported"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    events = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"learner/samples", "learner/reward_curve"} <= set(events.Tags()["images"])
    assert len(events.Images("learner/samples")) == 4
    assert [e.step for e in events.Images("learner/reward_curve")] == [5]  # at the end, with the last update
    assert [e.step for e in events.Scalars("learner/loss")] == [1, 2, 3, 4, 5]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert len(list((offline[0] / "files" / "media").rglob("*.png"))) >= 5  # four grids and the curve


@pytest.mark.slow
def test_sigterm_makes_the_learner_checkpoint_and_exit_143_and_resume_continues_from_there(world):
    cfg, path = world.config("learner.checkpoint_every=1000")
    learner, actor = world.learner(path), world.actor(0, path)
    world.wait(lambda: updates_done(cfg) >= 2, 300, "two updates", [learner, actor])
    # stopped before learner.max_updates: not a success (a Kubernetes Job would not run it again)
    assert learner.stop(timeout=120) == 143, world.logs()
    text = log_text(learner)
    done = int(LEARNER_DONE.search(text)[1])
    assert f"checkpoint at update {done} " in text, text[-3000:]  # saved on the way out, not at an interval
    assert f"stopped at update {done}; checkpointed" in text
    resumed = world.learner(path, "--resume", "--set", f"learner.max_updates={done + 1}", name="learner-resumed")
    assert world.wait_exit(resumed, 400, watch=[actor]) == 0, world.logs()
    assert f"resumed at update {done}," in log_text(resumed)


def test_a_learner_takes_over_the_records_a_dead_rank_held(world):
    cfg, queue, weights = run_with_experience(
        world, "actor.max_batches=1", "learner.reclaim_idle_s=0.5", "learner.max_updates=1"
    )
    n = cfg.actor.prompts_per_batch
    held = RedisExperienceQueue(connect(cfg.redis), cfg.redis).read("learner-1", count=n, block_s=1)
    assert len(held) == n and queue.stats().waiting == 0  # every record is pending on rank 1, which dies
    state = in_process_learner(cfg, queue, weights).run()  # rank 0
    assert state.trained_records == n and state.redelivered == n
    acc = accounting(queue)
    assert (acc["trained"], acc["redelivered"], acc["pending"]) == (n, n, 0), acc
    assert_accounted(acc)


def test_a_redis_outage_longer_than_retry_s_ends_the_learner_with_a_checkpoint_that_loses_nothing(world):
    """Redis gone for longer than redis.retry_s: the learner checkpoints before it stops (the records it
    trained, not yet acknowledged, listed in the checkpoint), and resumed against the same data it
    acknowledges them without training them again."""
    cfg, queue, _ = run_with_experience(world, "actor.max_batches=2", "redis.retry_s=2")
    n = 2 * cfg.actor.prompts_per_batch  # one pair each: two updates
    learner = in_process_learner(cfg, world.queue(cfg), world.weights(cfg))
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(TransportError, learner.run)), daemon=True)
    thread.start()
    wait_for(lambda: learner.state.updates == 2 and learner.buffer.pairs == 0, 300, "both updates")
    acc = accounting(queue)
    assert (acc["trained"], acc["pending"]) == (0, n), acc  # trained into the model, not yet checkpointed
    world.redis.client().save()  # what a Redis with persistence keeps over the outage
    world.redis.stop()
    thread.join(120)
    assert errors and "unreachable" in str(errors[0].value), errors
    assert learner.checkpointed_at == 2  # saved on the way out
    world.redis.start()
    resumed = in_process_learner(cfg, world.queue(cfg), world.weights(cfg))
    assert resumed.resume() and resumed.state.updates == 2 and resumed.state.trained_records == n
    acc = accounting(queue)
    assert (acc["trained"], acc["pending"], acc["redelivered"]) == (n, 0, 0), acc
    assert_accounted(acc)


def run_until(learner, predicate: Callable[[], bool], timeout: float = 300) -> None:
    """Run the learner until `predicate` holds (checked on another thread); fail if it does not in time."""
    stop, held = threading.Event(), []

    def watch():
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        held.append(predicate())
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    learner.run(stop)
    assert held == [True], f"the learner stopped, or {timeout} s passed, before the condition held"


@pytest.mark.slow
def test_records_the_learner_cannot_use_are_dropped_counted_and_logged_while_it_keeps_publishing(world):
    """Poison in the stream (fields that are not UTF-8, bytes that are not a record, a well-formed record
    sampled at other timesteps) is acknowledged as `corrupt` with its id in the log; nothing stays
    pending to crash a restart, and the learner trains on the good records around it."""

    cfg, path = world.config("actor.max_batches=1", "actor.max_backlog=100000", "learner.max_updates=2")
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    client = connect(cfg.redis)
    queue, weights = RedisExperienceQueue(client, cfg.redis), RedisWeightStore(client, cfg.redis)
    prompts = load_prompts(cfg.actor.prompts, cfg.loop.prompts)

    def push_good_batch(actor_id: str) -> None:
        Actor(cfg, policy, prompts, queue, weights, RewardClient(world.reward_url), actor_id=actor_id).run()

    push_good_batch("a0")
    good = client.xrange(queue.keys.experience)
    assert len(good) == cfg.actor.prompts_per_batch
    data, fields = good[0][1][b"data"], {k.decode(): v for k, v in good[0][1].items() if k != b"data"}
    misfit = decode_experience(data)
    misfit.timesteps = [t - 1 for t in misfit.timesteps]  # off by one: sampled with another schedule
    poison = {
        "field name": queue.push(data, {**fields, b"\xff\xfe": b"1"}),
        "field value": queue.push(data, {**fields, "actor": b"\xc3\x28"}),
        "bytes": queue.push(b"not an experience record", fields),
        "misfit": queue.push(encode_experience(misfit), fields),
    }
    push_good_batch("a1")  # the second update needs records from behind the poison

    learner = world.learner(path)
    assert world.wait_exit(learner, 400) == 0, world.logs()
    acc = accounting(queue)
    print("counters:", acc)
    assert_accounted(acc)
    assert acc["corrupt"] == len(poison) and acc["pending"] == 0, acc  # nothing left to crash a --resume
    assert acc["trained"] == 2 * cfg.optim.pairs_per_step, acc
    assert published(learner) == [0, 1, 2]
    text = log_text(learner)
    for what, record_id in poison.items():
        assert f"dropping record {record_id}" in text, (what, text[-3000:])
    assert "not UTF-8" in text and "sampled at timesteps" in text, text[-3000:]


@pytest.mark.slow
def test_a_learner_without_a_checkpoint_continues_above_the_versions_its_run_published(world):
    """A lost checkpoint volume beside a persistent Redis: the new learner must not reuse a version."""
    cfg, path = world.config("learner.max_updates=2")
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    weights = world.weights(cfg)
    weights.publish(1017, encode_weights(policy.export_weights(1017)))
    learner, actor = world.learner(path), world.actor(0, path)
    assert world.wait_exit(learner, 400, watch=[actor]) == 0, world.logs()
    assert published(learner) == [1018, 1019, 1020]  # its base weights at once, then one per update
    assert "has published weight version 1017, but this learner has no checkpoint" in log_text(learner)
    assert weights.latest() == 1020
    world.wait(lambda: actor_versions(actor)[-1] >= 1018, 120, "the actor to follow the new learner", [actor])
    acc = accounting(world.queue(cfg))
    assert_accounted(acc)
    assert acc["trained"] == 2 * cfg.optim.pairs_per_step, acc


@pytest.mark.slow
def test_garbage_in_the_latest_weights_key_stops_learner_and_actor_naming_the_key_and_redis(world):
    cfg, path = world.config()
    key = world.weights(cfg).keys.weights_latest
    connect(cfg.redis).set(key, b"\x00garbage")
    learner, actor = world.learner(path), world.actor(0, path)
    for child in (learner, actor):
        assert world.wait_exit(child, 300) not in (None, 0)
        text = log_text(child)
        assert f"{key} in Redis at {world.redis.url} holds" in text and "not a weight version" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


# ---- 4. bad configuration fails fast, naming the problem ----

BAD_CASES = {  # name: (command, --set overrides, exit code (None: any but 0), texts stderr must hold)
    "actor-unreachable-redis": ("actor", ["redis.url={dead}", "redis.retry_s=0.5"], None, ["{dead}", "retry_s = 0.5"]),
    "learner-unreachable-redis": (
        "learner",
        ["redis.url={dead}", "redis.retry_s=0.5"],
        None,
        ["{dead}", "retry_s = 0.5"],
    ),
    "actor-unknown-family": ("actor", ["redis.url={live}", "model.family=nope"], 2, ["model.family", "'nope'"]),
    "actor-missing-model": ("actor", ["redis.url={live}", "model.pretrained=/no/such/dir"], 1, ["/no/such/dir"]),
    "learner-missing-model": ("learner", ["redis.url={live}", "model.pretrained=/no/such/dir"], 1, ["/no/such/dir"]),
    "actor-ftp-reward-url": (
        "actor",
        ["redis.url={live}", "actor.reward_url=ftp://127.0.0.1:21"],
        2,
        ["actor.reward_url", "ftp://127.0.0.1:21", "not an http(s) URL"],
    ),  # fmt: skip
    "actor-reward-url-not-a-reward-server": (
        "actor",
        ["redis.url={live}", "actor.reward_url={web}"],
        1,
        ["{web}", "not as a PSO reward server", "404"],
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> Iterator[dict[str, tuple[int, float, str, dict[str, str]]]]:
    """Every bad-configuration command, run at once (they are independent): name -> (exit code, seconds,
    stderr, the URLs of the dead Redis and of a web server that is not a reward server)."""
    tmp = tmp_path_factory.mktemp("bad-config")
    with LocalRedis(tmp / "redis") as live, web_server(tmp / "www") as web:
        dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        procs = {}
        for name, (command, sets, _, _) in BAD_CASES.items():
            args = [sys.executable, "-m", "pso.cli", command, "-c", str(TINY)]
            for s in sets:
                args += ["--set", s.format(dead=dead, live=live.url, web=web_url(web))]
            args += [
                "--set",
                f"learner.checkpoint_dir={tmp / name}",
                "--set",
                f"learner.metrics_file={tmp / name}.jsonl",
                "--set",
                f"learner.run_dir={tmp / name}-run",
            ]
            proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs[name] = (time.monotonic(), proc)
        results = {}
        try:
            for name, (started, proc) in procs.items():
                _, err = proc.communicate(timeout=600)
                urls = {"dead": dead, "web": web_url(web)}
                results[name] = (proc.returncode, time.monotonic() - started, err.decode(errors="replace"), urls)
        finally:
            for _, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        yield results


@contextmanager
def web_server(folder: Path) -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server (static files of an empty folder) on a free port: it answers, but not as a reward server."""
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def web_url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_configuration_fails_fast_naming_the_problem(bad_runs, case):
    code, seconds, stderr, urls = bad_runs[case]
    _, _, want_code, want_texts = BAD_CASES[case]
    print(f"{case}: exit {code} after {seconds:.1f} s\n{stderr[-2000:]}")
    assert code != 0
    if want_code is not None:
        assert code == want_code
    for text in want_texts:
        assert text.format(**urls) in stderr
    # Failing fast is waiting for nothing that cannot come: the Redis ones give up after their redis.retry_s
    # (0.5 s, where the default is 60 s), as their message says, timed by the process itself.
    if "{dead}" in want_texts:
        waited = re.search(r"gave up after (\d+\.\d) s \(redis\.retry_s = 0\.5\)", stderr)
        assert waited and 0.5 <= float(waited[1]) < 30, stderr[-2000:]
    # All start at once: on two idle cores about 15 s (alone, each takes about 5 s, mostly imports),
    # on a busy machine a multiple of that: the bound only tells a slow start from a hang.
    assert seconds < 300


@pytest.mark.parametrize("case", ["actor-unreachable-redis", "learner-unreachable-redis"])
def test_unreachable_redis_is_reported_without_a_traceback(bad_runs, case):
    code, _, stderr, urls = bad_runs[case]
    assert code == 1 and urls["dead"] in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr, stderr[-2000:]
