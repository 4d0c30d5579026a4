"""Between sampled trajectories, experience records (the actor -> learner contract) and pair batches."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from pso.codecs import ExperienceRecord
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
) -> list[ExperienceRecord]:
    """One record per prompt group; `pairs` hold global sample indices of `traj` (as pairs_in_groups gives)."""
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
                pairs=[(w - p * g, lo - p * g) for w, lo in pairs if w // g == p],
                policy_version=policy_version,
                actor_id=actor_id,
                created_at=now,
                seeds=traj.seeds[group],
                extra=dict(extra or {}),
            )
        )
    return records


def pair_batch_from_records(policy: DistilledPolicy, records: list[ExperienceRecord]) -> PairBatch:
    """Every pair of every record, with its prompt encoded by the policy's (frozen) text encoders."""
    prompts = sorted({r.prompt for r in records})
    cond = policy.encode(prompts)
    rows, winners, losers = [], [], []
    for r in records:
        for w, lo in r.pairs:
            rows.append(prompts.index(r.prompt))
            winners.append(r.states[w])
            losers.append(r.states[lo])
    if not rows:
        raise ValueError("the records hold no pairs (every group was a tie)")
    device = policy.device
    return PairBatch(
        cond.index(torch.tensor(rows, device=device)), torch.stack(winners).to(device), torch.stack(losers).to(device)
    )
