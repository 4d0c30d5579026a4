"""Compute the configured loss for a batch of pairs on a `DistilledPolicy`.

This is the one place where a loss name turns into model evaluations; the learner and the
local loop both call `compute_loss`. Averaging convention: the loss is the mean over pairs
(and, for the transition forms, over the stochastic transitions of each trajectory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pso.conditioning import Conditioning
from pso.config.schema import (
    CustomizationLoss,
    DiffusionDPOLoss,
    Loss,
    OfflinePSOLoss,
    OnlinePSOLoss,
    SFTLoss,
    TargetVsReferenceLoss,
)
from pso.losses import (
    clip_log_ratio,
    customization_loss,
    online_pso_loss,
    pairwise_error_loss,
    sft_loss,
    target_vs_reference_loss,
)
from pso.policy import DistilledPolicy
from pso.sampling import Trajectories


@dataclass
class EncodedTargets:
    """Target images (style transfer, customization) as final latents, with their captions."""

    captions: list[str]
    latents: Tensor  # (N, C, H, W), the sampler's final-state units (pso/targets.py: encode_targets)

    def __post_init__(self):
        if len(self.captions) != len(self.latents) or not self.captions:
            raise ValueError(f"{len(self.captions)} captions for {len(self.latents)} target latents")


@dataclass
class PairBatch:
    """P pairs. States are (P, N+1, C, H, W) trajectories, or (P, 1, C, H, W) for fixed images
    (targets); the last entry along dim 1 is always the final latent."""

    cond: Conditioning
    winner_states: Tensor
    loser_states: Tensor

    @classmethod
    def from_trajectories(cls, traj: Trajectories, pairs: list[tuple[int, int]], cond: Conditioning) -> PairBatch:
        """`cond` holds one row per prompt of `traj`; pairs index samples of `traj` within one group."""
        if not pairs:
            raise ValueError("no pairs to train on (every group was a tie)")
        g, n = traj.group_size, len(traj.seeds)
        bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n) or p[0] // g != p[1] // g]
        if bad:
            raise ValueError(
                f"pairs {bad[:5]} do not join two samples of one prompt group (group size {g}, {n} samples)"
            )
        w = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        lo = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return cls(cond.index(w // traj.group_size), traj.states[w], traj.states[lo])

    @classmethod
    def from_targets(cls, target_latents: Tensor, traj: Trajectories, cond: Conditioning) -> PairBatch:
        """Every sample of each prompt group of `traj` (a reference) against that prompt's target image:
        `target_latents` (P, C, H, W) and `cond` hold one row per prompt of `traj`."""
        if len(target_latents) != len(traj.prompts):
            raise ValueError(f"{len(target_latents)} targets for {len(traj.prompts)} prompts")
        rows = torch.arange(len(traj.prompts)).repeat_interleave(traj.group_size)
        return cls(cond.index(rows), target_latents[rows][:, None].to(traj.states), traj.states)

    def __len__(self) -> int:
        return len(self.winner_states)

    def __getitem__(self, idx: slice) -> PairBatch:
        return PairBatch(self.cond.index(idx), self.winner_states[idx], self.loser_states[idx])


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float]


def _transitions(states: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Flatten the stochastic transitions k = 0..N-2 of (P, N+1, ...) states (the last step is not trained)."""
    p, n_states = states.shape[:2]
    k = n_states - 2
    if k < 1:
        raise ValueError(
            f"trajectories with {n_states - 1} step(s) have no stochastic transition; online PSO needs >= 2 "
            "steps (use offline-pso for 1-step sampling)"
        )
    x = states[:, :k].reshape(p * k, *states.shape[2:])
    x_next = states[:, 1 : k + 1].reshape(p * k, *states.shape[2:])
    step = torch.arange(k, device=states.device).repeat(p)
    return x, x_next, step, k


def _log_ratios(policy: DistilledPolicy, states: Tensor, cond: Conditioning, reduction) -> Tensor:
    """(P, K) transition log-ratios of trajectories against the reference model."""
    x, x_next, step, k = _transitions(states)
    cond_k = cond.index(torch.arange(len(states)).repeat_interleave(k))
    return policy.transition_log_ratio(x, x_next, step, cond_k, reduction).view(len(states), k)


def _distilled_t(policy: DistilledPolicy, n: int, gen: torch.Generator) -> Tensor:
    ts = policy.sampler.timesteps
    return ts[torch.randint(len(ts), (n,), generator=gen)]


def _pair_errors(
    policy: DistilledPolicy, batch: PairBatch, t: Tensor, reduction, gen: torch.Generator, with_reference: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Prediction errors (2P,) of the winners' then the losers' final latents, each pair forward-noised to its
    timestep in `t` (P,) with one noise drawn from `gen` (the reference's too, unless `with_reference` is off)."""
    x0 = torch.cat([batch.winner_states[:, -1], batch.loser_states[:, -1]])
    noise = torch.randn(batch.winner_states[:, -1].shape, generator=gen).to(x0)
    cond = Conditioning.cat([batch.cond, batch.cond])
    return policy.forward_noised_errors(
        x0, torch.cat([t, t]), torch.cat([noise, noise]), cond, reduction, with_reference=with_reference
    )


def check_loss_fits_sampler(policy: DistilledPolicy, cfg: Loss) -> None:
    """Fail before any sampling when a transition-form loss meets a sampler with nothing to train on."""
    if isinstance(cfg, (OnlinePSOLoss, TargetVsReferenceLoss)) and not policy.sampler.stochastic:
        raise ValueError(
            f"loss {cfg.name!r} trains on stochastic transitions, but sampler {policy.sampler.kind!r} at "
            f"{policy.sampler.num_steps} step(s) (eta={policy.sampler.eta}) has none; use >= 2 steps with a "
            "stochastic sampler (euler_ancestral, lcm, tcd, ddim or flow_euler with eta > 0), or loss offline-pso"
        )


def compute_loss(policy: DistilledPolicy, cfg: Loss, batch: PairBatch, gen: torch.Generator) -> LossOutput:
    """The configured loss on `batch`. `gen` (CPU) draws timesteps and noise for forward-noised forms."""
    p = len(batch)
    x0_w = batch.winner_states[:, -1]
    if isinstance(cfg, OnlinePSOLoss):
        both = torch.cat([batch.winner_states, batch.loser_states])
        lr = _log_ratios(policy, both, Conditioning.cat([batch.cond, batch.cond]), cfg.reduction)
        lr_w, lr_l = lr[:p], lr[p:]
        loss = online_pso_loss(lr_w, lr_l, cfg.beta, cfg.clip_eps).mean()
        return LossOutput(loss, _margin_metrics(loss, lr_w, lr_l, cfg.clip_eps))
    if isinstance(cfg, (OfflinePSOLoss, DiffusionDPOLoss)):
        if isinstance(cfg, OfflinePSOLoss):
            t = _distilled_t(policy, p, gen)
        else:
            t = policy.sampler.random_timesteps(p, gen)
        err, err_ref = _pair_errors(policy, batch, t, cfg.reduction, gen)
        loss = pairwise_error_loss(err[:p], err_ref[:p], err[p:], err_ref[p:], cfg.beta).mean()
        # a lower error is a higher likelihood, so the implicit log-ratio is -(e - e_ref)
        return LossOutput(loss, _margin_metrics(loss, -(err[:p] - err_ref[:p]), -(err[p:] - err_ref[p:])))
    if isinstance(cfg, CustomizationLoss):
        err, _ = _pair_errors(policy, batch, _distilled_t(policy, p, gen), cfg.reduction, gen, with_reference=False)
        err_w, err_l = err[:p], err[p:]
        loss = customization_loss(err_w, err_l, cfg.beta, cfg.sample_weight).mean()
        metrics = _margin_metrics(loss, -err_w, -err_l) | {"error_target": float(err_w.detach().mean())}
        return LossOutput(loss, metrics)
    if isinstance(cfg, SFTLoss):
        t = _distilled_t(policy, p, gen)
        noise = torch.randn(x0_w.shape, generator=gen).to(x0_w)
        err, _ = policy.forward_noised_errors(x0_w, t, noise, batch.cond, cfg.reduction, with_reference=False)
        loss = sft_loss(err).mean()
        return LossOutput(loss, {"loss": loss.item()})
    if isinstance(cfg, TargetVsReferenceLoss):
        lr_l = _log_ratios(policy, batch.loser_states, batch.cond, cfg.reduction)
        t = _distilled_t(policy, p, gen)
        noise = torch.randn(x0_w.shape, generator=gen).to(x0_w)
        err, err_ref = policy.forward_noised_errors(x0_w, t, noise, batch.cond, cfg.reduction)
        lr_w = -(err - err_ref)
        loss = target_vs_reference_loss(err[:, None], err_ref[:, None], lr_l, cfg.beta, cfg.clip_eps).mean()
        return LossOutput(loss, _margin_metrics(loss, lr_w[:, None].expand_as(lr_l), lr_l, cfg.clip_eps))
    raise ValueError(f"unknown loss {cfg!r}")


@torch.no_grad()
def _margin_metrics(loss: Tensor, lr_w: Tensor, lr_l: Tensor, clip_eps: float | None = None) -> dict[str, float]:
    margin = lr_w - lr_l
    metrics = {
        "loss": float(loss),
        "log_ratio_winner": float(lr_w.mean()),
        "log_ratio_loser": float(lr_l.mean()),
        "margin": float(margin.mean()),
        "accuracy": float((margin > 0).float().mean()),
    }
    if clip_eps is not None:
        clipped = torch.cat([lr_w.flatten(), lr_l.flatten()])
        metrics["clip_fraction"] = float((clip_log_ratio(clipped, clip_eps) != clipped).float().mean())
    return metrics
