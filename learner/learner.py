"""The learner: online PSO updates on experience from the actors, weights back to them.

    resume from the last checkpoint, if any (versions continue from there)
    while running:
        read records (this rank's own unacknowledged ones first, then new ones; reclaim those a
        dead consumer left), dropping or down-weighting the stale ones
        once `pairs_per_step x gradient_accumulation_steps` pairs are buffered: one update
        every K updates publish the weights (and draw a sample grid of them); every N checkpoint, then
        acknowledge the records it covers
    checkpoint on the way out (a signal, max_updates, or Redis unreachable for longer than redis.retry_s),
    and export the weights as diffusers loads them (learner.run_dir/lora; also every `export_every` versions)

Every rank reads its own records and runs the same number of micro-batches per update, so the
data-parallel gradient averaging of the DeepSpeed engine always lines up.

A record is acknowledged only once a checkpoint holds the updates that trained it, so a learner killed
at any point loses nothing from the model: the records trained since its newest checkpoint are still
pending on it and come back after `--resume`. The checkpoint lists the records it covers that were not
acknowledged yet, and how many pairs of a partly trained record it holds; a resumed learner acknowledges
the former and skips those pairs of the latter, so no pair is trained twice into the model.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from learner.buffer import BufferedRecord, PairBuffer, Take
from learner.metrics import MetricsSink
from learner.monitors import Monitors, best_effort
from learner.pictures import RunPictures
from learner.scaling import ActorDemand
from pso.codecs import WeightBundle, decode_experience, encode_weights
from pso.config.schema import PSOConfig
from pso.experience import check_record_fits, pair_batch_from_records
from pso.export import export_policy
from pso.loop import round_seed
from pso.objectives import PairBatch
from pso.ops_http import OpsServer
from pso.targets import is_prior, load_target_latents
from pso.transport.base import Delivery, ExperienceQueue, QueueStats, TransportError, WeightStore

log = logging.getLogger("pso.learner")
T = TypeVar("T")


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
    lost: int = 0  # records lost with a Redis that restarted empty (waiting unread when last seen)
    run_marker: str | None = None  # the run's marker in Redis (pso/transport/base.py: ExperienceQueue.run_marker)
    data_exhausted: bool = False  # offline (learner/offline.py): every rank stopped because its data was used up
    history: list[dict[str, float]] = field(default_factory=list)


class Learner:
    """The online learner: pairs from the actors' records in the experience queue. Where its pairs come from is
    in `_fill`, `_ready`, `_take`, `_trained`, `_row`, `_resumed`, `_rank_state` and `_checkpointed`; the
    offline learner (learner/offline.py) overrides just those."""

    def __init__(self, cfg: PSOConfig, engine, queue: ExperienceQueue | None, weights: WeightStore, rank: int = 0):
        self.cfg, self.engine, self.queue, self.weights, self.rank = cfg, engine, queue, weights, rank
        self.consumer = f"learner-{rank}"  # stable across restarts: this rank's pending records come back to it
        self.pairs_per_update = cfg.optim.pairs_per_step * cfg.learner.gradient_accumulation_steps
        self.buffer = PairBuffer()
        self.state = LearnerState()
        self.unacked: list[str] = []  # records trained since the last checkpoint: acknowledged once one holds them
        self.skip: dict[str, int] = {}  # pairs of partly trained records that the resumed checkpoint holds
        self.checkpointed_at = 0  # updates in the newest checkpoint
        self.failure: TransportError | None = None  # Redis gone for longer than redis.retry_s: checkpoint, stop
        self.redis_lost = False  # rank 0 found the run's marker gone: Redis lost the run's data
        self.seen: tuple[QueueStats, dict[str, int]] | None = None  # the queue at the last update, to report losses
        self.live = [f"learner-{r}" for r in range(engine.world_size)]  # never reclaimed from
        lc = cfg.learner
        self.sink = MetricsSink(lc.metrics_file) if rank == 0 else None
        self.monitors = Monitors(cfg) if rank == 0 else None
        self.pictures = RunPictures(cfg, engine.policy, rank, lc.zero_stage, self.monitors)
        # target images (style transfer, customization): encoded once, cached on disk for restarts
        self.target_latents, self.target_images = (
            (None, 0)
            if cfg.targets is None
            else load_target_latents(cfg.targets, engine.policy, lc.run_dir / "target-latents")
        )
        # the weights of (updates, version), made once for publishing, checkpointing and exporting (rank 0 keeps
        # them; the others only take part in gathering them), and their encoding, made once for Redis and disk
        self._bundle: tuple[tuple[int, int], WeightBundle | None] | None = None
        self._encoded: tuple[tuple[int, int], bytes] | None = None
        self.published_at = 0  # updates in the newest published version
        self.exported: tuple[int, int] | None = None  # (updates, version) of the newest export
        self.demand = ActorDemand(lc.target_backlog, lc.scale_horizon_s, ranks=engine.world_size)
        self.ops = None
        if self.sink is not None and lc.metrics_port is not None:
            routes = {"/v1/scaling": self.demand.report}
            self.ops = OpsServer("learner", lc.metrics_port, self.sink.registry, lc.stall_s, routes)

    def resume(self) -> bool:
        """Continue from the newest checkpoint in `learner.checkpoint_dir`; False if there is none."""
        loaded = self.engine.load_checkpoint(self.cfg.learner.checkpoint_dir)
        if loaded is None:
            return False
        client, ranks = loaded
        known = LearnerState.__dataclass_fields__
        self.state = LearnerState(**{k: v for k, v in client.items() if k in known})
        self.checkpointed_at = self.published_at = self.state.updates
        # a version published after the checkpoint must not be reused
        self.state.version = max(self.state.version, self.weights.latest() or 0)
        self._resumed(ranks)
        return True

    def _resumed(self, ranks: list[dict]) -> None:
        """What the checkpoint's rank states say about the pairs it holds: here, the records it covers."""
        covered = [i for r in ranks for i in r.get("covered", [])]  # every rank's, however many ranks resume
        self.skip = {i: n for r in ranks for i, n in r.get("partial", {}).items()}
        acked = self.queue.ack(covered, counter="trained")  # before any read: they must not come back
        log.info(
            "resumed at update %d, version %d; the checkpoint holds %d records not acknowledged before (%d "
            "acknowledged now) and part of %d more", self.state.updates, self.state.version, len(covered), acked,
            len(self.skip),
        )  # fmt: skip

    def run(self, stop: threading.Event | None = None) -> LearnerState:
        stop = stop or threading.Event()
        limit = self.cfg.learner.max_updates
        self.reported = {"stale": self.state.stale, "lost": self.state.lost}  # counted in rows (after a resume)
        self._start_versions()
        try:
            while limit is None or self.state.updates < limit:
                stopping, lost, exhausted = _any_rank(
                    stop.is_set() or self.failure is not None, self.redis_lost, self._exhausted()
                )
                if lost:
                    self._report_lost_redis()
                if exhausted:  # offline: some rank's data is used up, and every rank stops after the same update
                    self.state.data_exhausted = True
                    log.info("the data is used up: stopping after update %d", self.state.updates)
                if stopping or exhausted:
                    break
                waited = self._fill(stop)
                if _any_rank(not self._ready())[0]:
                    continue  # some rank was stopped or alarmed while waiting: nobody updates, all go to the top
                self._update(waited)
            if self.state.updates > self.published_at:
                self._publish()  # the final weights are a version, whatever publish_every
            self.pictures.grid(self.state.version, self.state.updates, last=True)
            if self.state.updates > self.checkpointed_at:
                self.save_checkpoint()  # on every orderly way out, Redis lost for good included
            if self.state.updates:
                self.export()
                self.pictures.reward_curve(self.state.history, self.state.updates)
        finally:
            if self.monitors:
                self.monitors.close()
            if self.ops:
                self.ops.close()
        if self.failure is not None:
            raise self.failure
        return self.state

    def _guard(self, op: Callable[[], T]) -> T | None:
        """Run a Redis operation; if Redis stays unreachable past redis.retry_s, remember it (every rank then
        stops after this update, checkpointing first) instead of leaving the ranks' collectives unmatched."""
        if self.failure is not None:
            return None
        try:
            return op()
        except TransportError as exc:
            log.error("stopping after this update, with a checkpoint: %s", exc)
            self.failure = exc
            return None

    def _start_versions(self) -> None:
        """Publish what the actors start from, so that they and the learner agree: version 0 in a new run.
        A learner without a checkpoint in a run that has published already (its checkpoint volume lost
        beside a persistent Redis) starts from the base model above the published versions, which only
        grow: it publishes its weights as the next version at once, so the actors follow it."""
        self._check_marker_on_start()
        latest = int(_rank_max(-1 if (v := self.weights.latest()) is None else v)[0])  # read by all before a publish
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

    def _check_marker_on_start(self) -> None:
        """Rank 0: write the run's marker if there is none; a resumed learner whose run's marker is gone
        (or another) says that Redis lost the run's data while it was down."""
        if self.rank != 0:
            return
        had = self.state.run_marker
        if had is not None and self.queue.run_marker() != had:
            log.error(
                "Redis no longer holds run %r as this learner's checkpoint knew it (its marker is gone): "
                "Redis restarted empty or was flushed while the learner was down. The records that were queued "
                "then are lost, the run's counters start again from 0, and the weights are published afresh",
                self.cfg.redis.run,
            )  # fmt: skip
        self.state.run_marker = self.queue.run_marker(create=True)

    def _check_marker(self) -> None:
        if self.rank == 0 and not self.redis_lost and self.queue.run_marker() != self.state.run_marker:
            self.redis_lost = True

    def _report_lost_redis(self) -> None:
        """Every rank, once rank 0 found the run's marker gone: say what was lost, mark the run afresh and
        publish the weights again (the versions went with the rest), so that the actors have them."""
        self.redis_lost = False
        self.demand.samples.clear()  # the counters restart: rates across the reset mean nothing
        if self.rank == 0:
            stats, counters = self.seen or (QueueStats(0, 0, 0), {})
            self.state.lost += stats.waiting
            log.error(
                "Redis lost run %r's data (restarted without persistence, or flushed): %d records waiting "
                "unread at the last update were lost with it, and the counters start again from 0 (they were: "
                "%s); the %d records this learner holds (read, or trained since its checkpoint) are kept. Publishing "
                "the weights again",
                self.cfg.redis.run, stats.waiting,
                ", ".join(f"{k} {counters.get(k, 0)}" for k in ("produced", "trained", "stale", "corrupt")),
                len(self.buffer) + len(self.unacked),
            )  # fmt: skip
            marker = self._guard(lambda: self.queue.run_marker(create=True))
            if marker is not None:  # else stopping: the checkpoint keeps the old one, to report at the next start
                self.state.run_marker = marker
        self._publish()

    def _fill(self, stop: threading.Event) -> float:
        """Read until an update's pairs are buffered (or stopped, or Redis lost the run); returns the seconds
        spent waiting."""
        start = time.monotonic()
        lc = self.cfg.learner
        self._guard(self._check_marker)
        while self.buffer.pairs < self.pairs_per_update and not (stop.is_set() or self.failure or self.redis_lost):
            self._beat()  # waiting for experience is progress as far as health goes
            self._guard(lambda: self._read(lc))
            self._guard(self._check_marker)
        return time.monotonic() - start

    def _ready(self) -> bool:
        """An update's pairs are at hand."""
        return self.buffer.pairs >= self.pairs_per_update

    def _exhausted(self) -> bool:
        """No more pairs will come (offline data used up); the online learner waits for the actors instead."""
        return False

    def _read(self, lc) -> None:
        deliveries = self.queue.reclaim(self.consumer, lc.reclaim_idle_s, 16, live=self.live)
        deliveries += self.queue.read(self.consumer, 4, lc.read_block_s)
        for d in deliveries:
            self._admit(d)

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
        self.buffer.add(BufferedRecord(d.id, record, weight, next_pair=self.skip.pop(d.id, 0)))

    def _update(self, waited: float) -> None:
        start = time.monotonic()
        self._bundle = self._encoded = None  # the last update's weights: not held through this one (a UNet, if full)
        batch, weights, taken = self._take()
        gen = torch.Generator().manual_seed(round_seed(self.cfg.sampling.seed + 1 + self.rank, self.state.updates))
        metrics = self.engine.update(batch, None if bool((weights == 1).all()) else weights, gen=gen)
        st = self.state
        trained_at = st.version
        st.updates += 1
        st.trained_pairs += len(weights)
        self._trained(taken)
        if st.updates % self.cfg.learner.publish_every == 0:
            self._publish()
        if st.updates % self.cfg.learner.checkpoint_every == 0:
            self.save_checkpoint()
        busy = time.monotonic() - start
        row = {"updates": st.updates, "version": st.version, **{k: float(v) for k, v in metrics.items()}}
        row.update(self._row(taken, trained_at, busy))
        row.update(pairs_per_s=len(weights) / max(busy + waited, 1e-9), wait_s=waited, pairs=len(weights))
        row["time"] = time.time()
        st.history.append(row)
        self._beat()
        if self.sink:
            self.sink.write(row)
        if self.monitors:
            with best_effort("the monitors' figures"):
                self.monitors.scalars(row, st.updates)
        if self.checkpointed_at == st.updates:  # the curve with this update's row, as often as checkpoints
            self.pictures.reward_curve(st.history, st.updates)

    def _take(self) -> tuple[PairBatch, Tensor, Take]:
        """An update's pairs, their loss weights (one each), and what `_trained` and `_row` need to know of them."""
        take = self.buffer.take(self.pairs_per_update)
        batch = pair_batch_from_records(self.engine.policy, take.records, self.target_latents)
        weights = torch.tensor(take.pair_weights)
        if self.cfg.targets is not None and self.cfg.targets.class_prompts:  # prior preservation's own weight
            prior = [is_prior(self.cfg.targets, self.target_images, r.target) for r in take.records for _ in r.pairs]
            weights = torch.where(torch.tensor(prior), weights * self.cfg.targets.prior_weight, weights)
        return batch, weights, take

    def _trained(self, take: Take) -> None:
        """Right after the update trained them (before any publish or checkpoint)."""
        self.unacked += [r.id for r in take.finished]
        self.state.trained_records += len(take.finished)

    def _row(self, take: Take, trained_at: int, busy: float) -> dict[str, float]:
        """The update's figures of where its pairs came from: the queue, the records' rewards and ages."""
        st = self.state
        queue = self._guard(self.queue.stats)
        counters = self._guard(self.queue.counters)
        self._guard(self._check_marker)  # after the reads: the figures kept for a loss report predate it
        if queue is not None and counters is not None:
            if not self.redis_lost:
                self.seen = queue, counters
            actor_busy_s = counters.get("actor_busy_ms", 0) / 1000
            self.demand.observe(queue.produced, actor_busy_s, queue.waiting, len(take.finished), busy)
        versions = [r.policy_version for r in take.records]
        row = {
            "reward_mean": float(torch.cat([r.scores for r in take.records]).mean()),
            "staleness": trained_at - sum(versions) / len(versions),
            "stale": st.stale - self.reported["stale"],  # since the previous row: Prometheus counts these
            "lost": st.lost - self.reported["lost"],
            "stale_total": st.stale,
            "stale_share": st.stale / max(st.stale + st.trained_records + len(self.buffer), 1),
            "records_lost": st.lost,
        }
        if queue is not None:
            row["backlog"] = queue.backlog
        wanted = self.demand.wanted()
        if wanted is not None:
            row["actors_wanted"] = wanted
        self.reported = {"stale": st.stale, "lost": st.lost}
        return row

    def _beat(self) -> None:
        if self.ops:
            self.ops.beat()

    def _weights(self) -> WeightBundle | None:
        """The weights now, as the current version, on rank 0 (None on the others). Collective: every rank
        gathers them under ZeRO-3, so every rank calls it at the same points."""
        key = (self.state.updates, self.state.version)
        if self._bundle is None or self._bundle[0] != key:
            bundle = self.engine.export_weights(self.state.version)
            bundle.metadata["updates"] = self.state.updates  # a checkpoint may hold updates after its version's
            self._bundle = key, bundle if self.rank == 0 else None
        return self._bundle[1]

    def _weight_bytes(self) -> bytes:
        """Rank 0: `_weights()` encoded, once per (updates, version) for publishing and checkpointing alike."""
        key = (self.state.updates, self.state.version)
        if self._encoded is None or self._encoded[0] != key:
            self._encoded = key, encode_weights(self._weights())
        return self._encoded[1]

    def _publish(self) -> None:
        """Every rank gathers (ZeRO-3 needs all of them); rank 0 writes the new version. Then its sample grid
        and, every `export_every` versions, its export."""
        self.state.version += 1 if self.state.updates else 0
        self.published_at = self.state.updates
        version, bundle = self.state.version, self._weights()
        if bundle is not None:
            data = self._weight_bytes()
            if self._guard(lambda: self.weights.publish(version, data, bundle.manifest()) or True):
                log.info("published weights version %d", version)
        self.pictures.grid(version, self.state.updates)
        every = self.cfg.learner.export_every
        if every is not None and self.state.updates and version % every == 0:
            self.export()

    def export(self) -> None:
        """Collective: the weights now into `run_dir/lora`, as diffusers (or kohya-style tools) load them, with a
        model card; the folder is replaced whole, so a reader never sees half an export."""
        key = (self.state.updates, self.state.version)
        if self.exported == key:
            return
        self.exported = key
        bundle = self._weights()
        with self.engine.gathered_weights():  # full fine-tuning saves the UNet itself
            if bundle is not None:
                with best_effort("the export"):
                    self._replace_export(bundle)

    def _replace_export(self, bundle: WeightBundle) -> None:
        lc = self.cfg.learner
        final, partial, old = (lc.run_dir / name for name in ("lora", ".lora.partial", ".lora.old"))
        if old.exists() and not final.exists():  # killed between the renames below: the old one is whole
            old.rename(final)
        for folder in (partial, old):
            shutil.rmtree(folder, ignore_errors=True)
        export_policy(self.engine.policy, bundle.version, self.cfg, partial, lc.export_format,
                      tensors=bundle.tensors, updates=bundle.metadata["updates"])  # fmt: skip
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        log.info("exported weights version %d (%s) to %s", bundle.version, lc.export_format, final)

    def save_checkpoint(self) -> None:
        """Collective. Then acknowledge the records trained since the last one: the checkpoint holds them
        (and lists them, for a learner resumed before the acknowledgement reached Redis)."""
        client = {k: v for k, v in vars(self.state).items() if k != "history"}
        rank_state = self._rank_state()
        bundle = self._weights()  # on every rank: a collective under ZeRO-3
        weights = self._weight_bytes() if bundle is not None else b""
        self.engine.save_checkpoint(self.cfg.learner.checkpoint_dir, client, rank_state, weights)
        self.checkpointed_at = self.state.updates
        log.info("checkpoint at update %d (version %d)", self.state.updates, self.state.version)
        self._checkpointed()

    def _rank_state(self) -> dict:
        """This rank's part of a checkpoint: the records it covers (acknowledged once it is saved); pairs of a
        straddling record the resumed checkpoint held stay held until the record is read again."""
        return {"covered": self.unacked, "partial": {**self.skip, **self.buffer.started()}}

    def _checkpointed(self) -> None:
        """Once a checkpoint holds them: acknowledge the records trained since the last one."""
        covered, self.unacked = self.unacked, []
        self._guard(lambda: self.queue.ack(covered, counter="trained"))


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag True on every rank if it is True on any (so that all ranks stop after the same update)."""
    return [v > 0 for v in _rank_max(*(1.0 if f else 0.0 for f in flags))]


def _rank_max(*values: float) -> list[float]:
    """The largest of every rank's `values`, each, on every rank (a collective: all ranks call it together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def run_learner(cfg: PSOConfig, resume: bool = False, stop: threading.Event | None = None) -> LearnerState:
    """`pso learner`: one rank (the `deepspeed` or torchrun launcher starts several); until
    `learner.max_updates`, or SIGTERM/SIGINT, after which it checkpoints and exits."""
    import os
    import signal

    from learner.engine import LearnerEngine
    from pso.policy import DistilledPolicy
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

    client = None
    if cfg.preferences is None or cfg.redis.url is not None:
        client = connect(cfg.redis)  # fails fast, naming the URL, when Redis is unreachable
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = cfg.model
    if model.device.startswith("cuda"):
        model = model.model_copy(update={"device": f"cuda:{local_rank}"})
    policy = DistilledPolicy.from_config(model, cfg.finetune)
    engine = LearnerEngine(policy, cfg.loss, cfg.optim, cfg.learner)
    if cfg.preferences is not None:  # offline: pairs from a data set, no actors, no queue
        from learner.offline import OfflineLearner
        from pso.transport.memory import MemoryWeightStore

        if client is None:
            log.info("no redis.url: the weights are not published (checkpoints and exports in %s)", cfg.learner.run_dir)
        weights = MemoryWeightStore() if client is None else RedisWeightStore(client, cfg.redis)
        learner = OfflineLearner(cfg, engine, weights, rank=engine.rank)
    else:
        learner = Learner(cfg, engine, RedisExperienceQueue(client, cfg.redis), RedisWeightStore(client, cfg.redis),
                          rank=engine.rank)  # fmt: skip
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if resume and not learner.resume():
        log.info("no checkpoint in %s: starting fresh", cfg.learner.checkpoint_dir)
    state = learner.run(stop)
    log.info(
        "learner done: %d updates, version %d, %d records (%d pairs) trained, %d stale, %d redelivered",
        state.updates, state.version, state.trained_records, state.trained_pairs, state.stale, state.redelivered,
    )  # fmt: skip
    return state
