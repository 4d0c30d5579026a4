"""Score a model (optionally with trained weights) on a prompt set against its base, same seeds.

`pso eval` writes eval.json, eval.md and grid.png into the run folder: per reward the mean and
spread over prompts, the base model's, and the win rate (share of prompts where the tuned
model's image, from the same starting noise, scores higher than the base's; ties count half).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pso.images import save_grid
from pso.loop import RewardFn
from pso.policy import DistilledPolicy
from pso.sampling import sample_groups


@torch.no_grad()
def score_model(
    policy: DistilledPolicy,
    prompts: list[str],
    rewards: dict[str, RewardFn],
    seed: int,
    batch_size: int = 64,
    reference: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """One image per prompt from fixed per-prompt seeds; returns scores per reward and the images.
    `reference=True` scores the base (reference) model instead of the tuned policy; `progress` shows a
    bar over the sampling batches on stderr."""
    traj = sample_groups(policy, prompts, 1, seed, batch_size=batch_size, reference=reference, progress=progress)
    return {name: fn(traj.images, prompts).float() for name, fn in rewards.items()}, traj.images


def win_rate(tuned: Tensor, base: Tensor) -> float:
    """Share of paired samples where tuned beats base; ties count half."""
    return float(((tuned > base).float() + 0.5 * (tuned == base).float()).mean())


def compare(tuned: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, t in tuned.items():
        b = base[name]
        out[name] = {
            "mean": float(t.mean()),
            "std": float(t.std()) if len(t) > 1 else 0.0,
            "base_mean": float(b.mean()),
            "base_std": float(b.std()) if len(b) > 1 else 0.0,
            "win_rate": win_rate(t, b),
        }
    return out


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| reward | model | base | win rate vs base |", "|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['mean']:.4f} ± {s['std']:.4f} | {s['base_mean']:.4f} ± {s['base_std']:.4f} "
            f"| {s['win_rate']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def run_eval(
    tuned: DistilledPolicy,
    prompts: list[str],
    rewards: dict[str, RewardFn],
    seed: int,
    out_dir: Path,
    grid_count: int = 16,
    progress: bool = False,
) -> dict:
    """The policy against its own reference model (adapters off, or the frozen copy), same seeds;
    `progress`: a bar for each of the two (for the `pso eval` command)."""
    tuned_scores, tuned_images = score_model(tuned, prompts, rewards, seed, progress=progress)
    base_scores, base_images = score_model(tuned, prompts, rewards, seed, reference=True, progress=progress)
    summary = compare(tuned_scores, base_scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "prompts": len(prompts),
        "seed": seed,
        "num_steps": tuned.sampler.num_steps,
        "rewards": summary,
        "per_prompt": {name: s.tolist() for name, s in tuned_scores.items()},
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "eval.md").write_text(
        f"# Evaluation: {len(prompts)} prompts, {tuned.sampler.num_steps} step(s), seed {seed}\n\n"
        + markdown_table(summary)
    )
    save_grid([base_images[:grid_count], tuned_images[:grid_count]], out_dir / "grid.png", ["base", "tuned"])
    return result
