"""The in-process online PSO loop: sample groups, score, pair, update, repeat.

It calls the same core functions the actor and learner services call, with no Redis or HTTP
in between, so research runs, tests and the demo exercise the real algorithm. Read it top to
bottom: one round is `run_round`. With target images (style transfer, customization) a round samples
references for the targets' captions and pairs every reference with its target; the reward, if any,
is only reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pso.config.schema import PSOConfig
from pso.objectives import EncodedTargets, PairBatch, check_loss_fits_sampler, compute_loss
from pso.pairing import pairs_in_groups
from pso.policy import DistilledPolicy
from pso.sampling import sample_groups

log = logging.getLogger(__name__)

# images (B, 3, H, W) in [0, 1] and the prompt of each image -> one score per image, (B,)
RewardFn = Callable[[Tensor, list[str]], Tensor]


@dataclass
class RoundResult:
    round: int
    reward_mean: float
    pairs: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def make_optimizer(policy: DistilledPolicy, cfg: PSOConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def update_on_pairs(
    policy: DistilledPolicy, optimizer: torch.optim.Optimizer, batch: PairBatch, cfg: PSOConfig, gen: torch.Generator
) -> dict[str, float]:
    """One pass over the pairs in micro-batches of `optim.pairs_per_step`; returns averaged metrics."""
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, len(batch), cfg.optim.pairs_per_step):
        out = compute_loss(policy, cfg.loss, batch[start : start + cfg.optim.pairs_per_step], gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        out.metrics["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
        )
        optimizer.step()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {k: v / steps for k, v in sums.items()}


def round_seed(seed: int, round_index: int) -> int:
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0])


def run_round(
    policy: DistilledPolicy,
    optimizer: torch.optim.Optimizer,
    cfg: PSOConfig,
    reward_fn: RewardFn | None,
    round_index: int,
    rng: np.random.Generator,
    targets: EncodedTargets | None = None,
) -> RoundResult:
    start = time.perf_counter()
    g = cfg.sampling.group_size
    if targets is None:
        prompts = [cfg.loop.prompts[i] for i in rng.integers(len(cfg.loop.prompts), size=cfg.loop.prompts_per_round)]
    else:
        chosen = rng.integers(len(targets.captions), size=cfg.loop.prompts_per_round)
        prompts = [targets.captions[i] for i in chosen]
    # 1. sample a group per prompt from the current policy, keeping every state
    traj = sample_groups(
        policy, prompts, g, round_seed(cfg.sampling.seed, round_index), batch_size=cfg.sampling.batch_size
    )
    # 2. score the final images (with targets: for the record only)
    scores = None if reward_fn is None else reward_fn(traj.images, [p for p in prompts for _ in range(g)]).float()
    # 3. pair: within each group by score (ties give no pair), or every sample against its prompt's target
    if targets is None:
        pairs = pairs_in_groups(scores, g, cfg.pairing)
        batch = PairBatch.from_trajectories(traj, pairs, policy.encode(prompts)) if pairs else None
    else:
        batch = PairBatch.from_targets(targets.latents[torch.from_numpy(chosen)], traj, policy.encode(prompts))
    # 4. one PSO pass over the pairs; the reference model never changes
    metrics = {}
    if batch is not None:
        gen = torch.Generator().manual_seed(round_seed(cfg.sampling.seed + 1, round_index))
        metrics = update_on_pairs(policy, optimizer, batch, cfg, gen)
    reward = float("nan") if scores is None else float(scores.mean())
    return RoundResult(round_index, reward, 0 if batch is None else len(batch), time.perf_counter() - start, metrics)


def run_local_loop(
    policy: DistilledPolicy,
    cfg: PSOConfig,
    reward_fn: RewardFn | None,
    progress: bool = True,
    targets: EncodedTargets | None = None,
) -> list[RoundResult]:
    """`cfg.loop.rounds` rounds; `reward_fn` pairs the samples, or, with `targets`, is only reported (or None)."""
    if targets is None and reward_fn is None:
        raise ValueError("online training without targets pairs its samples by reward: give a reward function")
    check_loss_fits_sampler(policy, cfg.loss)
    optimizer = make_optimizer(policy, cfg)
    rng = np.random.default_rng(cfg.sampling.seed)
    results = []
    bar = tqdm(range(cfg.loop.rounds), desc="online PSO", disable=not progress)
    for r in bar:
        res = run_round(policy, optimizer, cfg, reward_fn, r, rng, targets)
        results.append(res)
        bar.set_postfix(reward=f"{res.reward_mean:.4f}", pairs=res.pairs, loss=f"{res.metrics.get('loss', 0):.4f}")
        log.info(
            "round %d: reward %.4f, %d pairs, %s (%.2fs)",
            r,
            res.reward_mean,
            res.pairs,
            ", ".join(f"{k} {v:.4g}" for k, v in res.metrics.items()),
            res.seconds,
        )
    return results
