"""Between sampled trajectories, experience records (the actor -> learner contract) and pair batches."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from pso.codecs import TARGET, ExperienceRecord
from pso.objectives import PairBatch
from pso.policy import DistilledPolicy
from pso.sampling import Trajectories


def group_records(
    traj: Trajectories,
    scores: Tensor,
    pairs: list[tuple[int, int]],
    *,
    policy_version: int,
    actor_id: str,
    extra: dict | None = None,
    targets: list[int] | None = None,
) -> list[ExperienceRecord]:
    """One record per prompt group; `pairs` hold global sample indices of `traj` (as pairs_in_groups gives).
    With `targets` (the target image of each prompt) every sample of a group is a reference to its target
    instead, and `pairs` are not used."""
    g = traj.group_size
    now = time.time()
    records = []
    for p, prompt in enumerate(traj.prompts):
        group = traj.group(p)
        records.append(
            ExperienceRecord(
                prompt=prompt,
                states=traj.states[group].contiguous(),
                timesteps=[float(t) for t in traj.timesteps],
                stds=traj.stds.float(),
                scores=scores[group].float().contiguous(),
                pairs=[(w - p * g, lo - p * g) for w, lo in pairs if w // g == p]
                if targets is None
                else [(TARGET, j) for j in range(g)],
                policy_version=policy_version,
                actor_id=actor_id,
                created_at=now,
                seeds=traj.seeds[group],
                extra=dict(extra or {}),
                target=None if targets is None else targets[p],
            )
        )
    return records


def pair_batch_from_records(
    policy: DistilledPolicy, records: list[ExperienceRecord], target_latents: Tensor | None = None
) -> PairBatch:
    """Every pair of every record, with its prompt encoded by the policy's (frozen) text encoders. Pairs of
    target records take their winner from `target_latents` (N, C, H, W), one per target image."""
    for r in records:
        check_record_fits(policy, r)
    with_target = {r.target is not None for r in records}
    if len(with_target) > 1:
        raise ValueError("the records mix target pairs and sample pairs; a run trains one kind")
    if True in with_target:
        if target_latents is None:
            raise ValueError("records reference target images, but this learner has none (set targets.source)")
        bad = sorted({r.target for r in records if r.target >= len(target_latents)})
        if bad:
            raise ValueError(f"records reference targets {bad}, this learner has {len(target_latents)}")
    prompts = sorted({r.prompt for r in records})
    cond = policy.encode(prompts)
    rows, winners, losers = [], [], []
    for r in records:
        for w, lo in r.pairs:
            rows.append(prompts.index(r.prompt))
            winners.append(target_latents[r.target][None] if w == TARGET else r.states[w])
            losers.append(r.states[lo])
    if not rows:
        raise ValueError("the records hold no pairs (every group was a tie)")
    device, dtype = policy.device, policy.dtype
    return PairBatch(
        cond.index(torch.tensor(rows, device=device)),
        torch.stack(winners).to(device, dtype),
        torch.stack(losers).to(device, dtype),
    )


def check_record_fits(policy: DistilledPolicy, r: ExperienceRecord) -> None:
    """ValueError if the record was sampled with another schedule or latent size: it would be scored
    with the wrong transitions (or not fit the model at all)."""
    sampler = policy.sampler
    want_t = sampler.timesteps.float().tolist()
    want_std = sampler.stds.float()
    where = f"record from {r.actor_id} (policy version {r.policy_version})"
    if [round(t, 3) for t in r.timesteps] != [round(t, 3) for t in want_t]:
        raise ValueError(f"{where} was sampled at timesteps {r.timesteps}, this model samples at {want_t}")
    if not torch.allclose(r.stds.float(), want_std, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{where} has transition stds {r.stds.tolist()}, this model's are {want_std.tolist()}")
    if tuple(r.states.shape[2:]) != policy.latent_shape:
        raise ValueError(
            f"{where} holds latents of shape {tuple(r.states.shape[2:])}, this model's are {policy.latent_shape}"
        )
