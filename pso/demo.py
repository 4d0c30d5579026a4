"""`pso demo`: a minute of online PSO on CPU, end to end, with nothing to download.

A tiny random text-to-image model in SDXL format (the SDXL-DMD2 recipe: 4-step LCM sampler)
is built on the spot, then online PSO pushes it toward brighter images: sample groups, score,
pair, update. The trained LoRA weights go through the same weight codec the learner uses to
broadcast to actors, and a fresh copy of the model that loads them is what gets evaluated.
The built-in tiny world with meaningful rewards replaces the brightness objective later.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from pso.codecs import decode_weights, encode_weights
from pso.config.schema import PSOConfig
from pso.images import save_grid
from pso.loop import evaluate, run_local_loop
from pso.policy import DistilledPolicy
from pso.tiny.pipelines import build_tiny_pipeline

log = logging.getLogger(__name__)


def brightness(images: Tensor, prompts: list[str]) -> Tensor:
    """Mean luma in [0, 1] per image (Rec. 601 weights); the prompt is ignored."""
    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * luma).sum(1).mean((1, 2))


def demo_config(model_dir: Path) -> PSOConfig:
    return PSOConfig.model_validate(
        {
            "model": {"family": "sdxl-dmd2", "pretrained": str(model_dir), "num_steps": 4, "local_files_only": True},
            "finetune": {"mode": "lora", "rank": 8},
            "sampling": {"group_size": 4, "batch_size": 16, "seed": 0},
            "loss": {"name": "online-pso", "beta": 50.0, "clip_eps": 0.1},
            "optim": {"lr": 3e-4, "pairs_per_step": 4},
            "loop": {"rounds": 40, "prompts_per_round": 4, "eval_prompts": 8},
        }
    )


def run_demo(out_dir: Path, rounds: int | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_pipeline(out_dir / "model", "sdxl", seed=0)
    cfg = demo_config(model_dir)
    if rounds is not None:
        cfg.loop.rounds = rounds
    learner = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    before, before_images = evaluate(learner, cfg, brightness)
    results = run_local_loop(learner, cfg, brightness)

    weights_path = out_dir / "weights.psow"
    weights_path.write_bytes(encode_weights(learner.export_weights(version=cfg.loop.rounds)))
    actor = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    actor.load_weights(decode_weights(weights_path.read_bytes(), expected=actor.weight_spec()))
    after, after_images = evaluate(actor, cfg, brightness)

    grid = save_grid([before_images, after_images], out_dir / "before_after.png", ["before", "after PSO"])
    summary = {
        "brightness_before": float(before.mean()),
        "brightness_after": float(after.mean()),
        "win_rate": float((after > before).float().mean()),
        "rounds": [{"round": r.round, "reward": r.reward_mean, "pairs": r.pairs, **r.metrics} for r in results],
        "grid": str(grid),
        "weights": str(weights_path),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
