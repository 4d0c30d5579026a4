"""The learner: online PSO updates on experience from the actors, weights back to them.

    resume from the last checkpoint, if any (versions continue from there)
    while running:
        read records (this rank's own unacknowledged ones first, then new ones; reclaim those a
        dead consumer left), dropping or down-weighting the stale ones
        once `pairs_per_step x gradient_accumulation_steps` pairs are buffered: one update
        acknowledge the records fully used; every K updates publish the weights; every N checkpoint

Every rank reads its own records and runs the same number of micro-batches per update, so the
data-parallel gradient averaging of the DeepSpeed engine always lines up.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from learner.buffer import BufferedRecord, PairBuffer
from learner.metrics import MetricsSink
from learner.scaling import ActorDemand
from pso.codecs import decode_experience, encode_weights
from pso.config.schema import PSOConfig
from pso.experience import check_record_fits, pair_batch_from_records
from pso.loop import round_seed
from pso.ops_http import OpsServer
from pso.transport.base import Delivery, ExperienceQueue, WeightStore

log = logging.getLogger("pso.learner")


@dataclass
class LearnerState:
    """What a checkpoint carries beside the engine, and what a run reports."""

    updates: int = 0
    version: int = 0
    trained_records: int = 0
    trained_pairs: int = 0
    stale: int = 0
    redelivered: int = 0
    corrupt: int = 0
    last_id: str = "0-0"  # the newest record acknowledged (the stream position)
    history: list[dict[str, float]] = field(default_factory=list)


class Learner:
    def __init__(self, cfg: PSOConfig, engine, queue: ExperienceQueue, weights: WeightStore, rank: int = 0):
        self.cfg, self.engine, self.queue, self.weights, self.rank = cfg, engine, queue, weights, rank
        self.consumer = f"learner-{rank}"  # stable across restarts: this rank's pending records come back to it
        self.pairs_per_update = cfg.optim.pairs_per_step * cfg.learner.gradient_accumulation_steps
        self.buffer = PairBuffer()
        self.state = LearnerState()
        lc = cfg.learner
        self.sink = MetricsSink(lc.metrics_file, lc.tensorboard_dir) if rank == 0 else None
        self.demand = ActorDemand(lc.target_backlog, lc.scale_horizon_s, ranks=engine.world_size)
        self.ops = None
        if self.sink is not None and lc.metrics_port is not None:
            routes = {"/v1/scaling": self.demand.report}
            self.ops = OpsServer("learner", lc.metrics_port, self.sink.registry, lc.stall_s, routes)

    def resume(self) -> bool:
        """Continue from the newest checkpoint in `learner.checkpoint_dir`; False if there is none."""
        client = self.engine.load_checkpoint(self.cfg.learner.checkpoint_dir)
        if client is None:
            return False
        known = LearnerState.__dataclass_fields__
        self.state = LearnerState(**{k: v for k, v in client.items() if k in known})
        # a version published after the checkpoint must not be reused
        self.state.version = max(self.state.version, self.weights.latest() or 0)
        log.info("resumed at update %d, version %d", self.state.updates, self.state.version)
        return True

    def run(self, stop: threading.Event | None = None) -> LearnerState:
        stop = stop or threading.Event()
        limit = self.cfg.learner.max_updates
        self._start_versions()
        try:
            while (limit is None or self.state.updates < limit) and not _any_rank(stop.is_set()):
                waited = self._fill(stop)
                if _any_rank(self.buffer.pairs < self.pairs_per_update):
                    continue  # some rank was stopped while waiting: nobody updates, all stop at the top
                self._update(waited)
        finally:
            if self.sink:
                self.sink.close()
            if self.ops:
                self.ops.close()
        return self.state

    def _start_versions(self) -> None:
        """Publish what the actors start from, so that they and the learner agree: version 0 in a new run.
        A learner without a checkpoint in a run that has published already (its checkpoint volume lost
        beside a persistent Redis) starts from the base model above the published versions, which only
        grow: it publishes its weights as the next version at once, so the actors follow it."""
        latest = int(_rank_max(-1 if (v := self.weights.latest()) is None else v))  # read by all before any publish
        if latest < 0:
            self._publish()
        elif self.state.updates == 0:
            log.warning(
                "run %r in Redis has published weight version %d, but this learner has no checkpoint (%s): it "
                "starts from the base model and publishes it as version %d; the actors move to it",
                self.cfg.redis.run, latest, self.cfg.learner.checkpoint_dir, latest + 1,
            )  # fmt: skip
            self.state.version = latest + 1
            self._publish()

    def _fill(self, stop: threading.Event) -> float:
        """Read until an update's pairs are buffered (or stopped); returns the seconds spent waiting."""
        start = time.monotonic()
        lc = self.cfg.learner
        while self.buffer.pairs < self.pairs_per_update and not stop.is_set():
            self._beat()  # waiting for experience is progress as far as health goes
            deliveries = self.queue.reclaim(self.consumer, lc.reclaim_idle_s, 16)
            deliveries += self.queue.read(self.consumer, 4, lc.read_block_s)
            for d in deliveries:
                self._admit(d)
        return time.monotonic() - start

    def _admit(self, d: Delivery) -> None:
        lc = self.cfg.learner
        if d.times_delivered > 1:
            self.state.redelivered += 1
            self.queue.count("redelivered")
        problem = d.problem
        if problem is None:
            try:
                record = decode_experience(d.data)
                check_record_fits(self.engine.policy, record)
            except ValueError as e:  # a CodecError, or a record that does not fit the model
                problem = str(e)
        if problem is not None:  # left pending it would come back after every restart
            log.warning("dropping record %s, which this learner cannot use: %s", d.id, problem)
            self.state.corrupt += 1
            self.queue.ack([d.id], counter="corrupt")
            return
        age = self.state.version - record.policy_version
        weight = 1.0
        if age > lc.max_staleness:
            self.state.stale += 1
            if lc.stale == "drop":
                self.queue.ack([d.id], counter="stale")
                return
            self.queue.count("downweighted")  # trained on later, and counted `trained` then
            weight = lc.stale_weight
        self.buffer.add(BufferedRecord(d.id, record, weight))

    def _update(self, waited: float) -> None:
        start = time.monotonic()
        take = self.buffer.take(self.pairs_per_update)
        batch = pair_batch_from_records(self.engine.policy, take.records)
        weights = torch.tensor(take.pair_weights)
        gen = torch.Generator().manual_seed(round_seed(self.cfg.sampling.seed + 1 + self.rank, self.state.updates))
        metrics = self.engine.update(batch, None if bool((weights == 1).all()) else weights, gen=gen)
        st = self.state
        trained_at = st.version
        st.updates += 1
        st.trained_pairs += len(weights)
        if take.finished:
            self.queue.ack([r.id for r in take.finished], counter="trained")
            st.trained_records += len(take.finished)
            st.last_id = take.finished[-1].id
        if st.updates % self.cfg.learner.publish_every == 0:
            self._publish()
        if st.updates % self.cfg.learner.checkpoint_every == 0:
            self.save_checkpoint()
        busy = time.monotonic() - start
        queue = self.queue.stats()
        actor_busy_s = self.queue.counters().get("actor_busy_ms", 0) / 1000
        self.demand.observe(queue.produced, actor_busy_s, queue.waiting, len(take.finished), busy)
        versions = [r.policy_version for r in take.records]
        row = {
            "updates": st.updates,
            "version": st.version,
            **{k: float(v) for k, v in metrics.items()},
            "reward_mean": float(torch.cat([r.scores for r in take.records]).mean()),
            "staleness": trained_at - sum(versions) / len(versions),
            "pairs_per_s": len(weights) / max(busy + waited, 1e-9),
            "wait_s": waited,
            "stale_total": st.stale,
            "backlog": queue.backlog,
            "time": time.time(),
        }
        wanted = self.demand.wanted()
        if wanted is not None:
            row["actors_wanted"] = wanted
        st.history.append(row)
        self._beat()
        if self.sink:
            self.sink.write(row)

    def _beat(self) -> None:
        if self.ops:
            self.ops.beat()

    def _publish(self) -> None:
        """Every rank gathers (ZeRO-3 needs all of them); rank 0 writes the new version."""
        version = self.state.version + (1 if self.state.updates else 0)
        bundle = self.engine.export_weights(version)
        if self.rank == 0:
            self.weights.publish(version, encode_weights(bundle), bundle.manifest())
            log.info("published weights version %d", version)
        self.state.version = version

    def save_checkpoint(self) -> None:
        client = {k: v for k, v in vars(self.state).items() if k != "history"}
        self.engine.save_checkpoint(self.cfg.learner.checkpoint_dir, client)
        log.info("checkpoint at update %d (version %d)", self.state.updates, self.state.version)


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (so that all ranks stop after the same update)."""
    return _rank_max(1.0 if flag else 0.0) > 0


def _rank_max(value: float) -> float:
    """The largest of every rank's `value`, on every rank (a collective: all ranks call it together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run_learner(cfg: PSOConfig, resume: bool = False, stop: threading.Event | None = None) -> LearnerState:
    """`pso learner`: one rank (the `deepspeed` or torchrun launcher starts several); until
    `learner.max_updates`, or SIGTERM/SIGINT, after which it checkpoints and exits."""
    import os
    import signal

    from learner.engine import LearnerEngine
    from pso.policy import DistilledPolicy
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

    client = connect(cfg.redis)  # fails fast, naming the URL, when Redis is unreachable
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = cfg.model
    if model.device.startswith("cuda"):
        model = model.model_copy(update={"device": f"cuda:{local_rank}"})
    policy = DistilledPolicy.from_config(model, cfg.finetune)
    engine = LearnerEngine(policy, cfg.loss, cfg.optim, cfg.learner)
    learner = Learner(cfg, engine, RedisExperienceQueue(client, cfg.redis), RedisWeightStore(client, cfg.redis),
                      rank=engine.rank)  # fmt: skip
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if resume and not learner.resume():
        log.info("no checkpoint in %s: starting fresh", cfg.learner.checkpoint_dir)
    state = learner.run(stop)
    if state.updates % cfg.learner.checkpoint_every:
        learner.save_checkpoint()  # the updates since the last one are not lost
    log.info(
        "learner done: %d updates, version %d, %d records (%d pairs) trained, %d stale, %d redelivered",
        state.updates, state.version, state.trained_records, state.trained_pairs, state.stale, state.redelivered,
    )  # fmt: skip
    return state
