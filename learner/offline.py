"""The learner in offline mode (`preferences` in the config): pairs from a preference data set, no actors.

    each rank reads its own shard of `preferences.source` (pso/preference_data.py), epoch after epoch
    an update takes `pairs_per_step x gradient_accumulation_steps` pairs, their images encoded by the
    policy's VAE (once: the latents are cached under learner.run_dir/preference-latents), and trains them
    in the same DeepSpeed engine, publishing, checkpointing, drawing and exporting as the online learner
    the checkpoint holds each rank's position in its shard after the pairs it trained, so `--resume`
    continues at the next pair; every rank stops after the same update once any rank's data is used up
    (or at learner.max_updates)

Only where the pairs come from differs from `Learner`; the rest is its code.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import Tensor

from learner.learner import Learner
from pso.config.schema import PSOConfig
from pso.objectives import PairBatch
from pso.offline import PreferenceReader, ReaderState, latent_cache, open_stream, pair_batch_from_pairs
from pso.preference_data import PreferencePair
from pso.transport.base import WeightStore

log = logging.getLogger("pso.learner")


class OfflineLearner(Learner):
    def __init__(self, cfg: PSOConfig, engine, weights: WeightStore, rank: int = 0):
        if cfg.preferences is None:
            raise ValueError("the offline learner needs a preferences section")
        super().__init__(cfg, engine, None, weights, rank)
        self.pending: list[PreferencePair] = []  # read, not trained yet
        self.reader = self._reader(ReaderState(world_size=engine.world_size))
        self.data_state = self.reader.state()  # where the pairs trained end: what a checkpoint keeps
        pc, policy = cfg.preferences, engine.policy
        self.cache = (
            latent_cache(pc, policy, cfg.learner.run_dir / "preference-latents", rank, engine.world_size)
            if pc.cache_latents
            else None
        )

    def _reader(self, state: ReaderState) -> PreferenceReader:
        pc = self.cfg.preferences
        stream = open_stream(
            pc, rank=self.rank, world_size=self.engine.world_size, image_size=self.engine.policy.image_size,
            start=state.position,
        )  # fmt: skip
        return PreferenceReader(stream, epochs=pc.epochs, max_pairs=pc.max_pairs, state=state)

    # ----- where the pairs come from -----
    def _check_marker_on_start(self) -> None:  # no queue: nothing of the run's in Redis but its weights
        pass

    def _check_marker(self) -> None:
        pass

    def _fill(self, stop: threading.Event) -> float:
        start = time.monotonic()
        need = self.pairs_per_update - len(self.pending)
        if need > 0 and not stop.is_set():
            self._beat()
            self.pending += self.reader.take(need)
        return time.monotonic() - start

    def _ready(self) -> bool:
        return len(self.pending) >= self.pairs_per_update

    def _exhausted(self) -> bool:
        return self.reader.exhausted and not self._ready()

    def _take(self) -> tuple[PairBatch, Tensor, list[PreferencePair]]:
        taken, self.pending = self.pending[: self.pairs_per_update], self.pending[self.pairs_per_update :]
        batch = pair_batch_from_pairs(self.engine.policy, taken, self.cache)
        return batch, torch.ones(len(taken)), taken

    def _trained(self, taken: list[PreferencePair]) -> None:
        self.data_state = self.reader.state()  # nothing is read beyond an update's pairs: they end here

    def _row(self, taken: list[PreferencePair], trained_at: int, busy: float) -> dict[str, float]:
        s = self.data_state
        row = {"epoch": s.epoch, "position": s.position, "ties": s.ties, "bad_rows": s.bad_rows}
        if self.cache is not None:
            row["latents_cached"] = self.cache.hits
        return row

    # ----- checkpoints -----
    def _rank_state(self) -> dict:
        return {"data": self.data_state.as_dict(), "source": self.cfg.preferences.source}

    def _checkpointed(self) -> None:
        if self.cache is not None:
            self.cache.flush()  # the latents of the pairs the checkpoint holds: a resumed learner finds them

    def _resumed(self, ranks: list[dict]) -> None:
        mine = ranks[self.rank] if self.rank < len(ranks) else {}
        if "data" not in mine:
            raise ValueError(
                f"the checkpoint in {self.cfg.learner.checkpoint_dir} holds no data position for rank {self.rank} "
                f"(it was saved by {len(ranks)} rank(s), online or of another run): resume with the ranks and "
                "the preferences that saved it, or start in a new checkpoint_dir"
            )
        if mine.get("source") != self.cfg.preferences.source:
            raise ValueError(
                f"the checkpoint was trained on preferences.source {mine.get('source')!r}, this config names "
                f"{self.cfg.preferences.source!r}"
            )
        self.state.data_exhausted = False  # more epochs (or updates) than before may be asked for
        self.data_state = ReaderState(**mine["data"])
        self.reader = self._reader(self.data_state)
        log.info(
            "resumed at update %d, version %d; rank %d continues its shard of %s at example %d of epoch %d",
            self.state.updates, self.state.version, self.rank, self.cfg.preferences.source,
            self.data_state.position, self.data_state.epoch + 1,
        )  # fmt: skip
