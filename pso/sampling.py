"""Sample groups of few-step trajectories from the current policy, keeping every state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm import tqdm

from pso.policy import DistilledPolicy


@dataclass
class Trajectories:
    """P prompts x G samples (B = P * G, prompt-major: sample b belongs to prompt b // G).

    states[:, k] is the state the sampler was in at timesteps[k]; states[:, N] is the final latent.
    Transition k (states[:, k] -> states[:, k+1]) is N(means[:, k], stds[k]^2).
    """

    prompts: list[str]
    group_size: int
    seeds: list[int]
    timesteps: Tensor  # (N,)
    states: Tensor  # (B, N+1, C, H, W)
    means: Tensor  # (B, N, C, H, W)
    stds: Tensor  # (N,)
    images: Tensor | None  # (B, 3, H, W) in [0, 1]

    @property
    def latents(self) -> Tensor:
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def group(self, p: int) -> slice:
        return slice(p * self.group_size, (p + 1) * self.group_size)


def sample_seeds(seed: int, count: int) -> list[int]:
    """Independent per-sample seeds derived from one run seed (numpy SeedSequence)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64) >> np.uint64(1)]


@torch.no_grad()
def sample_groups(
    policy: DistilledPolicy,
    prompts: list[str],
    group_size: int,
    seed: int,
    *,
    batch_size: int = 8,
    decode: bool = True,
    seeds: list[int] | None = None,
    reference: bool = False,
    progress: bool = False,
) -> Trajectories:
    """Sample `group_size` images per prompt, each from its own seeded starting noise.

    `reference=True` samples the frozen reference model instead of the policy (for comparisons).
    Each sample has its own torch.Generator, so a trajectory depends only on its seed and the
    weights (up to float rounding), never on batching; the pipeline's __call__ with the same
    generators gives the same final latents. `progress` shows a bar over the batches on stderr (for
    commands; off inside services, where it would clutter the logs).
    """
    n = len(prompts) * group_size
    seeds = seeds if seeds is not None else sample_seeds(seed, n)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} samples")
    cond_all = policy.encode(prompts).index(torch.arange(len(prompts)).repeat_interleave(group_size))
    sampler, device, dtype = policy.sampler, policy.device, policy.dtype
    states, means, images = [], [], []
    desc = "sampling (reference model)" if reference else "sampling"
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        idx = slice(start, min(start + batch_size, n))
        gens = [torch.Generator(device).manual_seed(s) for s in seeds[idx]]
        cond = cond_all.index(idx)
        x = randn_tensor((len(gens), *policy.latent_shape), generator=gens, device=device, dtype=dtype)
        x = x * sampler.init_noise_sigma
        chunk_states, chunk_means = [x], []
        for k in range(sampler.num_steps):
            step = torch.full((len(gens),), k, device=device, dtype=torch.long)
            out = sampler.step(x, policy.predict(x, step, cond, reference=reference), step)
            x = out.mean
            if float(sampler.stds[k]) > 0:
                noise = randn_tensor(x.shape, generator=gens, device=device, dtype=out.mean.dtype)
                x = x + noise * out.std
            x = x.to(dtype)
            chunk_states.append(x)
            chunk_means.append(out.mean.to(dtype))
        states.append(torch.stack(chunk_states, 1))
        means.append(torch.stack(chunk_means, 1))
        if decode:
            images.append(policy.decode(x))
    return Trajectories(
        list(prompts),
        group_size,
        list(seeds),
        sampler.timesteps.clone(),
        torch.cat(states),
        torch.cat(means),
        sampler.stds,
        torch.cat(images) if decode else None,
    )
