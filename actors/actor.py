"""The actor: sample prompt groups from the newest policy, score them, pair them, push experience.

    while running:
        move to the newest complete weight version, if there is one (a notice, or polling)
        wait while more records than its bound wait unread in the queue (back-pressure)
        sample G images per prompt from the current policy, keeping every trajectory state
        score the images on the reward server (waiting out an unreachable server)
        pair within each group; push one record per group that has pairs (waiting out a full Redis)

With target images (`targets`: style transfer, customization) the prompts are the targets' captions, every
sample is a reference to its prompt's target (the learner pairs them), and scoring is optional
(`targets.score`), for monitoring.

Nothing is shared with the other processes but the transport and the reward server, so any
number of actors can run on any hosts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from actors.metrics import ActorCollector
from pso.codecs import CodecError, decode_weights, encode_experience
from pso.config.schema import PSOConfig
from pso.experience import group_records
from pso.judging import Tournament, decide
from pso.loop import round_seed
from pso.ops_http import OpsServer
from pso.pairing import pairs_in_groups
from pso.policy import DistilledPolicy
from pso.reward_norm import RewardNormalizer
from pso.sampling import sample_groups
from pso.transport.base import ExperienceQueue, TransportError, WeightStore, WeightsUnavailable
from reward_server.client import NotARewardServer, RewardClient, RewardServerError

log = logging.getLogger("pso.actor")

# Redis refusing a write because it reached maxmemory (noeviction): the first retry after this many seconds,
# doubling up to the second number
REDIS_FULL_RETRY_S = (1.0, 30.0)


@dataclass
class ActorStats:
    batches: int = 0
    records: int = 0
    pairs: int = 0
    reward_sum: float = 0.0
    images: int = 0
    versions: list[int] = field(default_factory=lambda: [0])  # every version this actor sampled with, in order
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it was refused
    backpressure_s: float = 0.0
    reward_wait_s: float = 0.0
    judgements: int = 0  # with actor.judge: pairwise judgements asked for
    judged_ties: int = 0  # pairs the judge called a tie in either order
    judged_inconsistent: int = 0  # pairs the judge decided by position (the same side won in both orders)
    redis_full: int = 0  # writes Redis refused because it was out of memory (maxmemory reached); each is retried


def default_actor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Actor:
    def __init__(
        self,
        cfg: PSOConfig,
        policy: DistilledPolicy,
        prompts: list[str],
        queue: ExperienceQueue,
        weights: WeightStore,
        reward: RewardClient,
        actor_id: str | None = None,
    ):
        """`prompts`: the targets' captions, in target order, when `cfg.targets` is set."""
        self.cfg, self.policy, self.prompts = cfg, policy, prompts
        self.targets = cfg.targets is not None
        self.judge = cfg.actor.judge
        # scalar scores: for pairing, for the targets' monitoring, or beside a judge for the reward curve only
        self.scoring = (cfg.targets.score if self.targets else True) and (
            not self.judge or bool(cfg.actor.reward_models)
        )
        self.queue, self.weights, self.reward = queue, weights, reward
        self.id = actor_id or cfg.actor.id or default_actor_id()
        self.version = 0  # the base model until the learner publishes
        self.stats = ActorStats()
        seed = np.random.SeedSequence([cfg.sampling.seed, *self.id.encode()]).generate_state(1)[0]
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self._last_poll = 0.0
        self.on_progress = lambda: None  # the ops server's heartbeat, when there is one
        self.normalizer: RewardNormalizer | None = None  # built from the served weights at the first score

    def run(self, stop: threading.Event | None = None) -> ActorStats:
        stop = stop or threading.Event()
        limit = self.cfg.actor.max_batches
        log.info("actor %s: %d prompts, group size %d", self.id, len(self.prompts), self.cfg.sampling.group_size)
        while not stop.is_set() and (limit is None or self.stats.batches < limit):
            self.on_progress()
            self.step(stop)
        return self.stats

    def step(self, stop: threading.Event) -> int:
        """One batch: respect back-pressure, refresh weights, sample, score, pair, push. Returns records pushed.
        The weights are refreshed after the pause: a batch sampled with the version from before it would
        reach the learner stale."""
        self._wait_for_room(stop)
        if stop.is_set():
            return 0
        self.refresh_weights()
        started = time.monotonic()
        cfg, g = self.cfg, self.cfg.sampling.group_size
        chosen = self.rng.integers(len(self.prompts), size=cfg.actor.prompts_per_batch)
        prompts = [self.prompts[i] for i in chosen]
        traj = sample_groups(
            self.policy, prompts, g, round_seed(self.seed, self.stats.batches), batch_size=cfg.sampling.batch_size
        )
        per_model: dict[str, list[float]] = {}
        if self.scoring:
            scored = self._score(traj.images, [p for p in prompts for _ in range(g)], stop)
            if scored is None:  # stopped while the reward server was away: nothing unscored is pushed
                return 0
            scores, per_model = torch.tensor(scored.total, dtype=torch.float32), scored.per_model
            ranked = self._normalized(per_model, stop) if cfg.actor.reward_normalization == "running" else scores
            if ranked is None:  # stopped while the reward server was away
                return 0
        else:
            scores = ranked = torch.zeros(len(traj.seeds))
        if self.judge:
            tournaments = self._judged(traj.images, prompts, stop)
            if tournaments is None:
                return 0
            if not self.scoring:  # net wins over the group stand in for scores
                scores = torch.cat([t.scores for t in tournaments])
            pairs = [(p * g + w, p * g + lo) for p, t in enumerate(tournaments) for w, lo in t.pairs]
            records = group_records(traj, scores, pairs, policy_version=self.version, actor_id=self.id)
        elif self.targets:  # every sample is a reference to its prompt's target
            records = group_records(
                traj, scores, [], policy_version=self.version, actor_id=self.id, targets=chosen.tolist()
            )
            pairs = [pair for r in records for pair in r.pairs]
        else:
            pairs = pairs_in_groups(ranked, g, cfg.pairing)
            records = group_records(traj, scores, pairs, policy_version=self.version, actor_id=self.id)
        pushed = 0
        kept = [r for r in records if r.pairs]  # a tie has nothing to learn from
        for p, record in enumerate(records):
            record.reward_details = {name: values[p * g : (p + 1) * g] for name, values in per_model.items()}
        for record in kept:
            fields = {"version": str(self.version), "actor": self.id, "pairs": str(len(record.pairs))}
            if not self._write("push", partial(self.queue.push, encode_experience(record), fields), stop):
                log.warning(
                    "actor %s: stopped while Redis was full; %d of the %d records of this batch were not pushed",
                    self.id, len(kept) - pushed, len(kept),
                )  # fmt: skip
                self.stats.records += pushed
                return pushed
            pushed += 1
        # the actors' producing time (not paused), summed in Redis: the learner's autoscaling signal
        # divides production by it to get one actor's unthrottled rate (learner/scaling.py); not counted
        # when stopped while Redis was full
        busy_ms = round((time.monotonic() - started) * 1000)
        self._write("count", partial(self.queue.count, "actor_busy_ms", busy_ms), stop)
        self.stats.batches += 1
        self.stats.records += pushed
        self.stats.pairs += len(pairs)
        self.stats.images += len(scores)
        self.stats.reward_sum += float(scores.sum())
        log.info(
            "actor %s batch %d: version %d, reward %.4f, %d pairs, %d records pushed%s",
            self.id, self.stats.batches, self.version, float(scores.mean()), len(pairs), pushed,
            f"; judge so far: {self.stats.judgements} judgements, {self.stats.judged_ties} ties, "
            f"{self.stats.judged_inconsistent} inconsistent" if self.judge else "",
        )  # fmt: skip
        return pushed

    def refresh_weights(self) -> None:
        """Move to the newest complete version: on a notice, or by polling every `weight_poll_s`."""
        newest = self.weights.wait_for_notice(0)
        now = time.monotonic()
        if newest is None and now - self._last_poll >= self.cfg.actor.weight_poll_s:
            self._last_poll = now
            newest = self.weights.latest()
        if newest is None or newest <= self.version or newest in self.stats.refused:
            return
        try:
            # fetch checked the size and checksum against the manifest: the codec's own SHA-256 pass is redundant
            data = self.weights.fetch(newest)
            bundle = decode_weights(data, expected=self.policy.weight_spec(), checksum=False)
            if bundle.version != newest:
                raise CodecError(f"the bundle stored as version {newest} says it is version {bundle.version}")
            self.policy.load_weights(bundle)
        except (WeightsUnavailable, CodecError, ValueError) as e:
            self.stats.refused[newest] = str(e)
            log.warning(
                "actor %s: refusing weight version %d (%s); keeping version %d", self.id, newest, e, self.version
            )
            return
        log.info("actor %s: weights %d -> %d", self.id, self.version, newest)
        self.version = newest
        self.stats.versions.append(newest)

    def _write(self, what: str, call, stop: threading.Event) -> bool:
        """Run a write to the transport (True once done); a Redis out of memory is waited out with backoff, loudly
        (an ERROR line each time, the pso_actor_redis_full_total counter, and no heartbeat, so /healthz fails once
        it has lasted actor.stall_s), never pushed past and never the end of the actor. False once stopped
        meanwhile. Any other transport error ends the actor, as before."""
        delay, most = REDIS_FULL_RETRY_S
        while True:
            try:
                call()
                return True
            except TransportError as e:
                if not redis_full(e):
                    raise
                self.stats.redis_full += 1
                log.error(
                    "actor %s: Redis is full: it refused the %s of experience (%s). Redis stores experience and "
                    "weights with maxmemory-policy noeviction, so once maxmemory is reached every write fails. "
                    "Either the learner is not consuming the experience (is it running? see its log and "
                    "pso_learner_backlog), or maxmemory is too small for actor.max_backlog records (and a batch "
                    "per actor) plus redis.keep_versions weight versions: raise maxmemory (REDIS_MAXMEMORY in the "
                    "compose and Kubernetes deployments, with the container's memory limit). Retrying in %g s; "
                    "refused %d times so far",
                    self.id, what, e, delay, self.stats.redis_full,
                )  # fmt: skip
                if stop.wait(delay):
                    return False
                delay = min(delay * 2, most)

    def _normalized(self, per_model: dict[str, list[float]], stop: threading.Event) -> torch.Tensor | None:
        """The weighted total of each model's standardised scores (pso/reward_norm.py), with the weights the
        reward server serves the models with (None when stopped while asking for them)."""
        if self.normalizer is None:
            served = self._ask(self.reward.models, stop)
            if served is None:
                return None
            weights = {m["name"]: float(m["weight"]) for m in served if m["name"] in per_model}
            self.normalizer = RewardNormalizer(weights)
            log.info("actor %s: normalising the rewards of %s, weights %s", self.id, list(weights), weights)
        return self.normalizer.total(per_model)

    def _wait_for_room(self, stop: threading.Event) -> None:
        start, told = time.monotonic(), False
        while not stop.is_set():
            waiting = self.queue.stats().waiting
            if waiting <= self.cfg.actor.max_backlog:
                break
            self.on_progress()  # paused by design, not stuck
            if not told:
                log.info("actor %s: pausing, %d records wait (bound %d)", self.id, waiting, self.cfg.actor.max_backlog)
                told = True
            stop.wait(0.2)
        self.stats.backpressure_s += time.monotonic() - start

    def _judged(self, images: torch.Tensor, prompts: list[str], stop: threading.Event) -> list[Tournament] | None:
        """Each group's round-robin by the judge (pso/judging.py), or None when stopped meanwhile."""
        g, tournaments = self.cfg.sampling.group_size, []
        for p, prompt in enumerate(prompts):
            answer = self._ask(partial(self.reward.judge, images[p * g : (p + 1) * g], prompt, self.judge), stop)
            if answer is None:
                return None
            tournament = decide(g, [j["preference"] for j in answer["judgements"]], self.cfg.pairing.strategy)
            self.stats.judgements += len(answer["judgements"])
            self.stats.judged_ties += tournament.ties
            self.stats.judged_inconsistent += tournament.inconsistent
            tournaments.append(tournament)
        return tournaments

    def _score(self, images: torch.Tensor, prompts: list[str], stop: threading.Event):
        return self._ask(lambda: self.reward.score(images, prompts, self.cfg.actor.reward_models), stop)

    def _ask(self, call, stop: threading.Event):
        """The reward server's answer to `call`; an unreachable or failing server is waited out, never pushed
        past (None once stopped). A refusal of the request itself (4xx) is a configuration mistake and ends the
        actor."""
        start, delay = time.monotonic(), 1.0
        try:
            while not stop.is_set():
                try:
                    return call()
                except RewardServerError as e:
                    if e.status is not None and 400 <= e.status < 500 and e.status != 429:
                        raise
                    log.warning("actor %s: reward server unavailable (%s); retrying in %.0f s", self.id, e, delay)
                    self.on_progress()
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
            return None
        finally:
            self.stats.reward_wait_s += time.monotonic() - start


def redis_full(error: BaseException) -> bool:
    """Whether a transport error is Redis refusing a write because it reached maxmemory (its OOM reply)."""
    from redis.exceptions import OutOfMemoryError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_judge(reward: RewardClient, judge: str, group_size: int) -> None:
    """Stop at start, saying why, when the reward server has no such judge or cannot judge a whole group."""
    judges = [m["name"] for m in reward.models() if m.get("pairwise")]
    if judge not in judges:
        raise SystemExit(f"pso actor: actor.judge {judge!r} is no judge of the reward server; its judges: {judges}")
    most = reward.limits()["max_judgements"]
    needed = group_size * (group_size - 1)
    if needed > most:
        raise SystemExit(
            f"pso actor: a group of {group_size} needs {needed} judgements, over the reward server's "
            f"limits.max_judgements ({most}); use smaller groups or raise the limit"
        )


def run_actor(cfg: PSOConfig, stop: threading.Event | None = None) -> ActorStats:
    """`pso actor`: build everything from the config and run until `actor.max_batches`, or SIGTERM/SIGINT,
    after which it finishes the batch in hand (its records are pushed, not lost) and exits."""
    import signal

    from pso.prompts import load_prompts
    from pso.targets import target_captions
    from pso.transport.node_cache import NodeWeightCache
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():  # as a container's PID 1, an unhandled SIGTERM is lost
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    registry = CollectorRegistry()  # the actor's metrics join it once it exists
    # up before the model loads (minutes, the first time): probes get an answer from the start
    port = cfg.actor.metrics_port
    ops = OpsServer("actor", port, registry, cfg.actor.stall_s) if port is not None else None
    try:
        # with targets, the references' prompts: the targets' captions in target order (no image is decoded)
        prompts = (
            load_prompts(cfg.actor.prompts, cfg.loop.prompts) if cfg.targets is None else target_captions(cfg.targets)
        )
        client = connect(cfg.redis)  # fails fast, naming the URL, when Redis is unreachable
        weights = RedisWeightStore(client, cfg.redis)
        if cfg.actor.weights_cache_dir is not None:  # an unwritable folder fails here, before the model loads
            weights = NodeWeightCache(weights, cfg.actor.weights_cache_dir, cfg.redis.keep_versions)
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        reward = RewardClient(cfg.actor.reward_url)
        queue = RedisExperienceQueue(client, cfg.redis)
        actor = Actor(cfg, policy, prompts, queue, weights, reward)
        registry.register(ActorCollector(actor))
        if ops:
            actor.on_progress = ops.beat
        log.info("waiting for the reward server at %s", cfg.actor.reward_url)
        while (actor.scoring or actor.judge) and not stop.is_set():
            try:
                reward.wait_ready(timeout=15)
                break
            except NotARewardServer:
                raise
            except RewardServerError as e:
                actor.on_progress()  # waiting for a server that loads its models is not a stall
                log.warning("%s; still waiting", e)
        if actor.judge and not stop.is_set():
            check_judge(reward, actor.judge, cfg.sampling.group_size)
        return actor.run(stop)
    except (TransportError, NotARewardServer) as e:
        raise SystemExit(f"pso actor: {e}") from None
    finally:
        if ops:
            ops.close()
