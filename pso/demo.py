"""`pso demo`: online PSO on the built-in tiny model, on CPU, in a few minutes, nothing to download.

The shipped tiny student (a genuinely distilled 1-4 step model of "a {colour} {shape} on a
{colour} background" scenes) is tuned with online PSO toward the `large` reward (bigger shapes),
using the same core functions the services use: sample groups, score, pair, update. The trained
LoRA goes through the weight codec the learner broadcasts with, and the evaluation compares the
tuned model with the base on fixed prompts and starting noise at 1 step and at 4 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pso.codecs import encode_weights
from pso.config.schema import PSOConfig
from pso.evaluation import compare, score_model
from pso.images import save_grid
from pso.loop import run_local_loop
from pso.policy import DistilledPolicy
from pso.tiny.rewards import REWARDS, crispness, fidelity, large
from pso.tiny.world import all_scenes, random_scenes

TARGET = "large"
MEASURES = {"large": large, "fidelity": fidelity, "crispness": crispness}


def demo_config(rounds: int) -> PSOConfig:
    return PSOConfig.model_validate(
        {
            "model": {"family": "tiny", "pretrained": "builtin:tiny", "num_steps": 4},
            "finetune": {"mode": "lora", "rank": 8},
            "sampling": {"group_size": 4, "batch_size": 64, "seed": 0},
            "loss": {"name": "online-pso", "beta": 50.0, "clip_eps": 0.1},
            "optim": {"lr": 1e-3, "pairs_per_step": 8},
            "loop": {"rounds": rounds, "prompts_per_round": 8, "prompts": [s.prompt for s in all_scenes()]},
        }
    )


def run_demo(out_dir: Path, rounds: int = 120, eval_prompts: int = 64) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(rounds)
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    prompts = [s.prompt for s in random_scenes(np.random.default_rng(7), eval_prompts)]

    results = run_local_loop(policy, cfg, REWARDS[TARGET])
    weights = out_dir / "weights.psow"
    weights.write_bytes(encode_weights(policy.export_weights(version=rounds)))

    summary: dict = {"target": TARGET, "rounds": rounds, "weights": str(weights), "steps": {}}
    grid_rows, labels = [], []
    for steps in (1, 4):
        policy.set_num_steps(steps)
        tuned, tuned_images = score_model(policy, prompts, MEASURES, seed=7)
        base, base_images = score_model(policy, prompts, MEASURES, seed=7, reference=True)
        summary["steps"][steps] = compare(tuned, base)
        grid_rows += [base_images[:16], tuned_images[:16]]
        labels += [f"base, {steps} step", f"PSO, {steps} step"]
    summary["grid"] = str(save_grid(grid_rows, out_dir / "before_after.png", labels, cell=64))
    summary["log"] = [{"round": r.round, "reward": r.reward_mean, "pairs": r.pairs, **r.metrics} for r in results]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
