"""Offline preference training: fixed (winner, loser) image pairs instead of the policy's own samples.

    pairs of one rank's shard of a Pick-a-Pic-layout source (pso/preference_data.py), epoch after epoch
    -> winner and loser images encoded once by the model's own VAE (optionally cached on disk)
    -> a PairBatch of (P, 1, C, H, W) final latents, as for target images
    -> the offline losses (offline-pso, diffusion-dpo), which forward-noise those latents

`PreferenceReader` hands out a shard's pairs in batches and says where it is (`state()`: epoch, example
position, pairs used this epoch), so a checkpoint that keeps the state of the pairs trained resumes at the
next pair. `run_offline_loop` is the in-process loop (no services) the tests and benchmarks call; the learner
(`learner/offline.py`) runs the same steps in its DeepSpeed engine. Nothing here knows a service.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pso.objectives import PairBatch
from pso.preference_data import PreferencePair, PreferenceStream
from pso.targets import builtin_data, encode_images, hub_id, parquet_files, vae_identity

if TYPE_CHECKING:
    from pso.config.schema import PreferencesConfig, PSOConfig
    from pso.policy import DistilledPolicy

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # images per VAE call
CURVE = ("accuracy", "implicit-reward accuracy of the pairs trained on")  # offline runs' curve: no sample rewards


# ----- pairs as a batch -----


def encode_pairs(
    policy: DistilledPolicy, pairs: list[PreferencePair], cache: PairLatentCache | None = None
) -> tuple[Tensor, Tensor]:
    """The winners' and losers' final latents, (P, *policy.latent_shape) each, float32 on the CPU: from the
    cache where it holds them, the rest encoded by the policy's VAE (and added to the cache)."""
    found = cache.lookup([p.index for p in pairs]) if cache is not None else {}
    missing = [p for p in pairs if p.index not in found]
    if missing:
        images = torch.stack([p.winner for p in missing] + [p.loser for p in missing])
        latents = encode_images(policy, images.split(ENCODE_BATCH))
        n = len(missing)
        for k, p in enumerate(missing):
            found[p.index] = (latents[k], latents[n + k])
            if cache is not None:
                cache.add(p.index, latents[k], latents[n + k])
    winners = torch.stack([found[p.index][0] for p in pairs])
    losers = torch.stack([found[p.index][1] for p in pairs])
    return winners, losers


def pair_batch_from_pairs(
    policy: DistilledPolicy, pairs: list[PreferencePair], cache: PairLatentCache | None = None
) -> PairBatch:
    """Preference pairs as a PairBatch for `policy`: captions encoded by its text encoders, images by its VAE
    into (P, 1, C, H, W) final states on its device and in its dtype (as PairBatch.from_targets builds them)."""
    if not pairs:
        raise ValueError("no preference pairs to train on")
    sizes = {tuple(p.winner.shape[1:]) for p in pairs} | {tuple(p.loser.shape[1:]) for p in pairs}
    if sizes != {(policy.image_size, policy.image_size)}:
        raise ValueError(
            f"the pairs' images are {sorted(sizes)} px, the model samples {policy.image_size} px: read them with "
            f"image_size={policy.image_size}"
        )
    winners, losers = encode_pairs(policy, pairs, cache)
    captions = sorted({p.caption for p in pairs})
    row = {c: i for i, c in enumerate(captions)}
    cond = policy.encode(captions)
    rows = torch.tensor([row[p.caption] for p in pairs], device=policy.device)
    device, dtype = policy.device, policy.dtype
    return PairBatch(cond.index(rows), winners[:, None].to(device, dtype), losers[:, None].to(device, dtype))


# ----- reading a shard, epoch after epoch -----


def open_stream(
    cfg: PreferencesConfig, *, rank: int, world_size: int, image_size: int, start: int = 0
) -> PreferenceStream:
    """This rank's shard of `preferences.source` (a built-in data set is written on first use)."""
    return PreferenceStream(
        builtin_data(cfg.source), rank=rank, world_size=world_size, image_size=image_size, start=start, split=cfg.split
    )


@dataclass
class ReaderState:
    """Where a reader is: `epoch` (0-based; == epochs once the data is used up), `position` (examples of the
    shard consumed in this epoch: a resumed stream starts there), `pairs` (pairs handed out this epoch)."""

    epoch: int = 0
    position: int = 0
    pairs: int = 0
    ties: int = 0
    bad_rows: int = 0
    world_size: int = 1

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class PreferenceReader:
    """The pairs of `stream` (one rank's shard) for `epochs` passes, at most `max_pairs` of them per pass, handed
    out by `take(n)`; later epochs read the shard from its start. `state()` is where the pairs taken so far end;
    a reader made with that state (and a stream of the same shard) hands out the next pair."""

    def __init__(
        self,
        stream: PreferenceStream,
        *,
        epochs: int = 1,
        max_pairs: int | None = None,
        state: ReaderState | None = None,
    ):
        if state is None:  # from where the stream is (its `start`), in the first epoch
            state = ReaderState(0, stream.position, 0, stream.ties, stream.bad_rows, stream.world_size)
        if state.world_size != stream.world_size:
            raise ValueError(
                f"the saved data position is of a shard of {state.world_size} ranks, this learner has "
                f"{stream.world_size}: resume with {state.world_size} ranks"
            )
        self.stream, self.epochs, self.max_pairs = stream, epochs, max_pairs
        self.epoch, self.pairs = state.epoch, state.pairs
        stream.position, stream.ties, stream.bad_rows = state.position, state.ties, state.bad_rows
        self._it: Iterator[PreferencePair] | None = None
        self._from_start = state.position == 0  # this epoch is read from its first example (an empty shard shows)
        self.exhausted = False

    def take(self, n: int) -> list[PreferencePair]:
        """The next `n` pairs; fewer (then `exhausted`) only when the last epoch ended."""
        out: list[PreferencePair] = []
        while len(out) < n and self.epoch < self.epochs:
            pair = None
            if self.max_pairs is None or self.pairs < self.max_pairs:
                if self._it is None:
                    self._it = iter(self.stream)
                pair = next(self._it, None)
            if pair is None:  # this epoch is over: the shard ended, or max_pairs of it were used
                self._next_epoch()
                continue
            self.pairs += 1
            out.append(pair)
        self.exhausted = self.epoch >= self.epochs
        return out

    def _next_epoch(self) -> None:
        log.info(
            "rank %d: epoch %d of %d over %s done: %d pairs (%d ties and %d bad rows skipped)",
            self.stream.rank, self.epoch + 1, self.epochs, self.stream.source, self.pairs, self.stream.ties,
            self.stream.bad_rows,
        )  # fmt: skip
        if self.pairs == 0 and self._from_start:
            raise ValueError(f"{self.stream.source}: rank {self.stream.rank}'s shard holds no preference pairs")
        self.epoch += 1
        self.pairs = 0
        self._it = None
        self._from_start = True
        self.stream.position = self.stream.ties = self.stream.bad_rows = 0

    def state(self) -> ReaderState:
        s = self.stream
        return ReaderState(self.epoch, s.position, self.pairs, s.ties, s.bad_rows, s.world_size)


# ----- the latents on disk -----


def cache_key(cfg: PreferencesConfig, policy: DistilledPolicy, world_size: int) -> str:
    """What names a pair's latents besides its (rank, index): the source (and, for local files, each file's name,
    size and modification time), its split, the shards' world size, the image size and the VAE's weights."""
    source = builtin_data(cfg.source)
    parts = ["pso-preference-latents/1", source, cfg.split, str(world_size), str(policy.image_size)]
    if hub_id(source) is None and Path(source).exists():
        for f in parquet_files(Path(source)):
            st = f.stat()
            parts.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
    parts.append(vae_identity(policy))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class _Block:
    number: int
    latents: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    dirty: bool = False


class PairLatentCache:
    """One rank's pair latents on disk, by the pair's index in the rank's shard: `directory/KEY/rankR/` holds a
    safetensors file per block of `block` consecutive indices (index, winner, loser). One block is in memory
    at a time (the stream reads its shard in order); it is written when the reader moves past it and at
    `flush()` (the learner's checkpoints). A file that does not check out is ignored, with a warning, and
    rewritten."""

    FORMAT = "pso-pair-latents/1"

    def __init__(
        self, directory: str | Path, key: str, rank: int, latent_shape: tuple[int, ...], block: int | None = None
    ):
        self.directory = Path(directory) / key[:32] / f"rank{rank}"
        self.key, self.latent_shape = key, tuple(latent_shape)
        pair_bytes = 2 * 4 * int(torch.Size(latent_shape).numel())
        self.block = block or max(1, min(1024, (32 * 2**20) // pair_bytes))  # about 32 MiB of latents a file
        self._current: _Block | None = None
        self.hits = self.misses = 0

    def path(self, number: int) -> Path:
        return self.directory / f"block{number:07d}.safetensors"

    def _load(self, number: int) -> _Block:
        if self._current is not None and self._current.number == number:
            return self._current
        self.flush()
        self._current = _Block(number, self._read(number))
        return self._current

    def _read(self, number: int) -> dict[int, tuple[Tensor, Tensor]]:
        from safetensors import safe_open

        path = self.path(number)
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            log.warning("pair latent cache %s is unreadable (%s): encoding again", path, str(e)[:200])
            return {}
        index, winner, loser = (tensors.get(k) for k in ("index", "winner", "loser"))
        n = -1 if index is None else len(index)
        ok = (
            meta.get("format") == self.FORMAT
            and meta.get("key") == self.key
            and set(tensors) == {"index", "winner", "loser"}
            and all(t.dtype == torch.float32 and tuple(t.shape) == (n, *self.latent_shape) for t in (winner, loser))
            and bool(torch.isfinite(winner).all() and torch.isfinite(loser).all())
            and all(i // self.block == number for i in index.tolist())
        )
        if not ok:
            log.warning("pair latent cache %s is ignored (other data, another VAE, or damaged): encoding again", path)
            return {}
        return {i: (winner[k], loser[k]) for k, i in enumerate(index.tolist())}

    def lookup(self, indices: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
        found = {}
        for i in indices:
            hit = self._load(i // self.block).latents.get(i)
            if hit is not None:
                found[i] = hit
        self.hits += len(found)
        self.misses += len(set(indices)) - len(found)
        return found

    def add(self, index: int, winner: Tensor, loser: Tensor) -> None:
        block = self._load(index // self.block)
        block.latents[index] = (winner.detach().float().cpu(), loser.detach().float().cpu())
        block.dirty = True

    def flush(self) -> None:
        """Write the block in memory if it has latents the file lacks (atomically: a reader sees the old file or
        the new one)."""
        from safetensors.torch import save_file

        block = self._current
        if block is None or not block.dirty:
            return
        indices = sorted(block.latents)
        tensors = {
            "index": torch.tensor(indices, dtype=torch.int64),
            "winner": torch.stack([block.latents[i][0] for i in indices]).contiguous(),
            "loser": torch.stack([block.latents[i][1] for i in indices]).contiguous(),
        }
        path = self.path(block.number)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": self.FORMAT, "key": self.key})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        block.dirty = False


def latent_cache(
    cfg: PreferencesConfig, policy: DistilledPolicy, directory: str | Path, rank: int, world_size: int
) -> PairLatentCache:
    return PairLatentCache(directory, cache_key(cfg, policy, world_size), rank, tuple(policy.latent_shape))


# ----- the in-process loop -----


@dataclass
class OfflineStep:
    step: int
    pairs: int
    epoch: int  # the reader's epoch after the step (== epochs once the data is used up)
    position: int  # examples of the shard consumed in that epoch: the next pair's index is at or after it
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def run_offline_loop(
    policy: DistilledPolicy,
    cfg: PSOConfig,
    stream: PreferenceStream,
    steps: int | None = None,
    progress: bool = True,
    *,
    cache: PairLatentCache | None = None,
) -> list[OfflineStep]:
    """Offline training in this process: each step takes `optim.pairs_per_step` pairs of `stream` and makes one
    optimiser step of `cfg.loss` (offline-pso or diffusion-dpo) on them. Stops after `steps` steps or when the
    data is used up (`preferences.epochs` passes, at most `preferences.max_pairs` pairs each; one whole pass
    without a preferences section); a last batch short of `pairs_per_step` is not trained. Reproducible: the
    pairs come in the stream's order and step k draws its timesteps and noise from a seed of (sampling.seed, k),
    as the learner's rank 0 does."""
    from pso.config.schema import DiffusionDPOLoss, OfflinePSOLoss
    from pso.loop import make_optimizer, round_seed, update_on_pairs

    if not isinstance(cfg.loss, (OfflinePSOLoss, DiffusionDPOLoss)):
        raise ValueError(f"offline pairs train with loss offline-pso or diffusion-dpo, not {cfg.loss.name}")
    pc = cfg.preferences
    reader = PreferenceReader(
        stream, epochs=pc.epochs if pc else 1, max_pairs=pc.max_pairs if pc else None
    )  # fmt: skip
    optimizer = make_optimizer(policy, cfg)
    n = cfg.optim.pairs_per_step
    results: list[OfflineStep] = []
    bar = tqdm(total=steps, desc=f"offline {cfg.loss.name}", unit="step", disable=not progress)
    while steps is None or len(results) < steps:
        start = time.perf_counter()
        pairs = reader.take(n)
        if len(pairs) < n:
            break
        batch = pair_batch_from_pairs(policy, pairs, cache)
        gen = torch.Generator().manual_seed(round_seed(cfg.sampling.seed + 1, len(results)))
        metrics = update_on_pairs(policy, optimizer, batch, cfg, gen)
        state = reader.state()
        results.append(OfflineStep(len(results), n, state.epoch, state.position, time.perf_counter() - start, metrics))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', 0):.4f}", accuracy=f"{metrics.get('accuracy', 0):.2f}")
    bar.close()
    if cache is not None:
        cache.flush()
    return results
