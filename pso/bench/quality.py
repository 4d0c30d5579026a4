"""`pso bench quality`: does PSO move a few-step model toward a reward without losing few-step quality?

On the built-in tiny student (`--flow`: the built-in flow-matching student), every method gets the same
online rounds (same prompts, same sampling seeds, same reward `large`: bigger shapes) from the same
starting weights, for several seeds. Each is then scored at 1 step and at the model's native step
count on fixed evaluation prompts and noise: the target reward, prompt fidelity and crispness (a blur
measure), next to the base model and the real data. Writes results.md, results.json and grid.png into the run folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from pso.config import StrictModel
from pso.config.schema import PSOConfig
from pso.evaluation import score_model, win_rate
from pso.images import save_grid
from pso.loop import run_local_loop
from pso.policy import DistilledPolicy
from pso.tiny.rewards import REWARDS, crispness, fidelity, large
from pso.tiny.world import all_scenes, draw_batch, parse_prompt, random_scenes

log = logging.getLogger(__name__)
MEASURES = {"large": large, "fidelity": fidelity, "crispness": crispness}


class QualityBenchConfig(StrictModel):
    model: str = "builtin:tiny"
    family: str = "tiny"
    train_eta: float | None = Field(
        None, description="the sampler's noise level while training (default: the family's)"
    )
    eval_eta: float | None = Field(None, description="the noise level of the evaluation (default: the family's)")
    target: str = Field("large", description="the built-in reward every method optimises")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rounds: int = Field(40, ge=1)
    prompts_per_round: int = 8
    group_size: int = 4
    train_steps: int = Field(4, description="sampling steps while training (online PSO needs >= 2)")
    eval_steps: list[int] = Field(default_factory=lambda: [1, 4])
    eval_prompts: int = 128
    lora_rank: int = 8
    lr: float = 1e-3

    @classmethod
    def flow(cls, **kw) -> QualityBenchConfig:
        """The built-in flow-matching model: trained on samples at noise level 0.7, evaluated with the
        pipeline's own deterministic sampler (noise level 0), as it would be deployed."""
        return cls(model="builtin:tiny-flow", family="tiny-flow", train_eta=0.7, eval_eta=0.0, **kw)

    methods: dict[str, dict] = Field(
        default_factory=lambda: {
            "online-pso": {"name": "online-pso", "beta": 50.0, "clip_eps": 0.1},
            "offline-pso": {"name": "offline-pso", "beta": 2000.0},
            "diffusion-dpo": {"name": "diffusion-dpo", "beta": 2000.0},
            "sft": {"name": "sft"},
        }
    )


def method_config(bench: QualityBenchConfig, loss: dict, seed: int) -> PSOConfig:
    return PSOConfig.model_validate(
        {
            "model": {
                "family": bench.family,
                "pretrained": bench.model,
                "num_steps": bench.train_steps,
                "eta": bench.train_eta,
            },
            "finetune": {"mode": "lora", "rank": bench.lora_rank, "init_seed": seed},
            "sampling": {"group_size": bench.group_size, "batch_size": 64, "seed": seed},
            "loss": loss,
            "optim": {"lr": bench.lr, "pairs_per_step": bench.prompts_per_round},
            "loop": {
                "rounds": bench.rounds,
                "prompts_per_round": bench.prompts_per_round,
                "prompts": [s.prompt for s in all_scenes()],
            },
        }
    )


def _measure(policy: DistilledPolicy, prompts: list[str], steps: list[int], eta: float | None):
    """{steps: {measure: (P,) scores}} and the 1-step images, on the evaluation prompts and seed."""
    scores, images = {}, None
    for n in steps:
        policy.set_num_steps(n, eta)
        s, imgs = score_model(policy, prompts, MEASURES, seed=2024)
        scores[n] = s
        images = imgs if images is None else images
    return scores, images


def cell(values: list[float]) -> str:
    """A table cell: the mean ± the standard deviation over seeds (the value alone for one seed, a dash for none)."""
    if not values:
        return "–"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def run_quality_bench(out_dir: Path, bench: QualityBenchConfig) -> dict:
    if bench.target not in REWARDS:
        raise ValueError(f"unknown target reward {bench.target!r}; built-in rewards: {', '.join(REWARDS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    prompts = [s.prompt for s in random_scenes(rng, bench.eval_prompts)]
    data_images = draw_batch([parse_prompt(p) for p in prompts], rng)
    rows: dict[str, dict[str, list[float]]] = {"data": {}, "base": {}}
    for name, fn in MEASURES.items():
        for n in bench.eval_steps:
            rows["data"][f"{name}@{n}"] = [float(fn(data_images, prompts).mean())]
    base = DistilledPolicy.from_config(method_config(bench, {"name": "sft"}, 0).model, finetune=None)
    base_scores, base_images = _measure(base, prompts, bench.eval_steps, bench.eval_eta)
    for n, s in base_scores.items():
        for name, v in s.items():
            rows["base"][f"{name}@{n}"] = [float(v.mean())]
    grid_rows, grid_labels = [data_images[:12], base_images[:12]], ["data", "base"]
    win_rates: dict[str, list[float]] = {}
    for method, loss in bench.methods.items():
        rows[method] = {}
        for seed in tqdm(bench.seeds, desc=method):
            cfg = method_config(bench, loss, seed)
            policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
            start = time.perf_counter()
            policy.set_num_steps(bench.train_steps)
            run_local_loop(policy, cfg, REWARDS[bench.target], progress=False)
            log.info("%s seed %d: %d rounds in %.0f s", method, seed, bench.rounds, time.perf_counter() - start)
            scores, images = _measure(policy, prompts, bench.eval_steps, bench.eval_eta)
            for n, s in scores.items():
                for name, v in s.items():
                    rows[method].setdefault(f"{name}@{n}", []).append(float(v.mean()))
                win_rates.setdefault(f"{method}@{n}", []).append(
                    win_rate(s[bench.target], base_scores[n][bench.target])
                )
            if seed == bench.seeds[0]:
                grid_rows.append(images[:12])
                grid_labels.append(method)
    columns = [f"{m}@{n}" for n in bench.eval_steps for m in MEASURES]
    table = [
        "| | " + " | ".join(columns) + " | win rate vs base (" + bench.target + ") |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for name, row in rows.items():
        wins = " / ".join(
            f"{n} step: {cell(win_rates[f'{name}@{n}'])}" for n in bench.eval_steps if f"{name}@{n}" in win_rates
        )
        table.append(f"| {name} | " + " | ".join(cell(row[c]) for c in columns) + f" | {wins} |")
    markdown = "\n".join(table) + "\n"
    grid = save_grid(grid_rows, out_dir / "grid.png", grid_labels, cell=64)
    result = {"config": bench.model_dump(mode="json"), "rows": rows, "win_rates": win_rates, "grid": str(grid)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(markdown)
    return result | {"markdown": markdown}
