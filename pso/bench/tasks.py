"""`pso bench quality --task style|subject|offline`: PSO's other uses on the built-in tiny model.

- style: the 48 sepia drawings of `builtin:tiny-style` are the targets; every method trains on the same rounds
  of fresh references for their captions. Scored on ordinary tiny-world prompts: `sepia` (the style shows),
  `style_fidelity` (the prompt still holds) and `style_crispness` (in either palette).
- subject: the 8 crosses of `builtin:tiny-subject`, named by the identifier, with prior preservation (the base
  model's own sample of each ordinary shape in the targets' colours is a target too). Scored on identifier
  prompts in colour pairs the targets never show (`subject`), and on ordinary prompts, which should not change
  (`fidelity`, and `subject` there measures the cross leaking in).
- offline: the preference pairs of `builtin:tiny-offline` (labelled by `large`), offline PSO against Diffusion-DPO
  on the same pairs in the same order. Scored like `pso bench quality`: `large`, `fidelity`, `crispness`.

Each method runs from the same starting weights for several seeds; each is scored at 1 step and at the model's
native step count on fixed prompts and noise, next to the base model and (style, subject) next to the targets
themselves after the VAE round trip, the most a method can reach through that VAE. Writes results.md, results.json and
grid.png (the first seed's 1-step samples, below the targets' round trips) into the run folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from pso.bench.quality import cell
from pso.config import StrictModel
from pso.config.schema import PSOConfig, TargetsConfig
from pso.evaluation import score_model
from pso.images import save_grid
from pso.loop import RewardFn, run_local_loop
from pso.objectives import EncodedTargets
from pso.offline import open_stream, run_offline_loop
from pso.policy import DistilledPolicy
from pso.targets import load_target_latents, target_captions
from pso.tiny.rewards import crispness, fidelity, large, sepia, style_crispness, style_fidelity, subject
from pso.tiny.tasks import subject_class_prompts, subject_eval_prompts
from pso.tiny.world import IDENTIFIER, random_scenes

log = logging.getLogger(__name__)

TARGET_METHODS = {
    "target-vs-reference": {"name": "target-vs-reference", "beta": 50.0, "clip_eps": 0.1},
    "customization": {"name": "customization", "beta": 5.0, "sample_weight": 0.5},
    "sft": {"name": "sft"},
}
OFFLINE_METHODS = {
    "offline-pso": {"name": "offline-pso", "beta": 2000.0},
    "diffusion-dpo": {"name": "diffusion-dpo", "beta": 2000.0},
}
# prompt set -> measures scored on it, per task
MEASURES: dict[str, dict[str, dict[str, RewardFn]]] = {
    "style": {"ordinary": {"sepia": sepia, "style_fidelity": style_fidelity, "style_crispness": style_crispness}},
    "subject": {
        "identifier": {"subject": subject, "crispness": crispness},
        "ordinary": {"fidelity": fidelity, "subject": subject},
    },
    "offline": {"ordinary": {"large": large, "fidelity": fidelity, "crispness": crispness}},
}
SOURCES = {"style": "builtin:tiny-style", "subject": "builtin:tiny-subject", "offline": "builtin:tiny-offline"}


class TaskBenchConfig(StrictModel):
    task: str = Field(description="style, subject or offline")
    model: str = "builtin:tiny"
    family: str = "tiny"
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    rounds: int = Field(60, ge=1, description="online rounds (style, subject) or optimiser steps (offline)")
    prompts_per_round: int = 8
    group_size: int = 2
    train_steps: int = 4
    eval_steps: list[int] = Field(default_factory=lambda: [1, 4])
    eval_prompts: int = 64
    lora_rank: int = 8
    lora_targets: list[str] | None = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        description="the tiny UNet keeps most of its weights in its ResNet convolutions: with attention-only "
        "adapters not even sft learns the subject",
    )
    lr: float = 1e-3
    methods: dict[str, dict] | None = Field(None, description="default: the task's (TARGET_METHODS, OFFLINE_METHODS)")
    prior_samples: int = Field(
        1, ge=0, description="subject: the base model's samples of each class prompt added as targets (0: none)"
    )

    def prior(self) -> dict:
        """The subject's prior preservation (configs/tiny-subject.yaml's): the old shapes in the targets' colours."""
        if self.task != "subject" or not self.prior_samples:
            return {}
        return {"class_prompts": subject_class_prompts(), "class_samples": self.prior_samples}

    def method_config(self, loss: dict, seed: int) -> PSOConfig:
        data = {"preferences": {"source": SOURCES["offline"]}} if self.task == "offline" else {}
        lora = {"mode": "lora", "rank": self.lora_rank, "init_seed": seed, "target_modules": self.lora_targets}
        cfg = PSOConfig.model_validate(
            {
                "model": {"family": self.family, "pretrained": self.model, "num_steps": self.train_steps},
                "finetune": lora,
                "sampling": {"group_size": self.group_size, "batch_size": 64, "seed": seed},
                "loss": loss,
                "optim": {"lr": self.lr, "pairs_per_step": self.prompts_per_round},
                "loop": {"rounds": self.rounds, "prompts_per_round": self.prompts_per_round},
                **data,
            }
        )  # fmt: skip
        return cfg


def eval_prompts(task: str, n: int) -> dict[str, list[str]]:
    if task == "subject":
        sets = subject_eval_prompts(n)
        return {"identifier": sets["subject"], "ordinary": sets["ordinary"]}
    return {"ordinary": [s.prompt for s in random_scenes(np.random.default_rng(2024), n)]}


def measure(policy: DistilledPolicy, bench: TaskBenchConfig, reference: bool = False):
    """{"SET measure@steps": mean score} and the first prompt set's 1-step images."""
    scores, images = {}, None
    for name, prompts in eval_prompts(bench.task, bench.eval_prompts).items():
        for n in bench.eval_steps:
            policy.set_num_steps(n)
            s, imgs = score_model(policy, prompts, MEASURES[bench.task][name], seed=2024, reference=reference)
            scores.update({f"{name} {m}@{n}": float(v.mean()) for m, v in s.items()})
            images = imgs if images is None else images
    policy.set_num_steps(bench.train_steps)
    return scores, images


def measure_targets(policy: DistilledPolicy, bench: TaskBenchConfig, targets: EncodedTargets):
    """The targets' own scores after the VAE round trip (their cached latents decoded), on their own captions:
    identifier captions for the "identifier" measures, the others for "ordinary", and those images. The same
    figure stands under every step count: the VAE caps what any method can reach, whatever it samples with."""
    with torch.no_grad():
        images = policy.decode(targets.latents)
    scores = {}
    for name, measures in MEASURES[bench.task].items():
        keep = [i for i, c in enumerate(targets.captions) if (IDENTIFIER in c.split()) == (name == "identifier")]
        if keep:
            for m, fn in measures.items():
                value = float(fn(images[keep], [targets.captions[i] for i in keep]).mean())
                scores.update({f"{name} {m}@{n}": value for n in bench.eval_steps})
    return scores, images


def train(policy: DistilledPolicy, cfg: PSOConfig, bench: TaskBenchConfig, targets: EncodedTargets | None) -> None:
    if bench.task == "offline":
        stream = open_stream(cfg.preferences, rank=0, world_size=1, image_size=policy.image_size)
        run_offline_loop(policy, cfg, stream, steps=bench.rounds, progress=False)
    else:
        run_local_loop(policy, cfg, None, progress=False, targets=targets)


def run_task_bench(out_dir: Path, bench: TaskBenchConfig) -> dict:
    if bench.task not in SOURCES:
        raise ValueError(f"unknown task {bench.task!r}; tasks: {', '.join(SOURCES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = bench.methods or (OFFLINE_METHODS if bench.task == "offline" else TARGET_METHODS)
    base = DistilledPolicy.from_config(bench.method_config(next(iter(methods.values())), 0).model, finetune=None)
    targets = None
    if bench.task != "offline":  # as the learner loads them, prior preservation's class samples included
        spec = TargetsConfig(source=SOURCES[bench.task], **bench.prior())
        latents, _ = load_target_latents(spec, base, out_dir / "target-latents")
        targets = EncodedTargets(target_captions(spec), latents.cpu())
    base_scores, base_images = measure(base, bench)
    rows: dict[str, dict[str, list[float]]] = {"base": {k: [v] for k, v in base_scores.items()}}
    grid_rows, grid_labels = [base_images[:12]], ["base"]
    if targets is not None:
        target_scores, target_images = measure_targets(base, bench, targets)
        rows["targets (VAE round trip)"] = {k: [v] for k, v in target_scores.items()}
        grid_rows.append(target_images[:12])
        grid_labels.append("targets")
    for method, loss in methods.items():
        rows[method] = {}
        for seed in tqdm(bench.seeds, desc=f"{bench.task}: {method}"):
            cfg = bench.method_config(loss, seed)
            policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
            start = time.perf_counter()
            train(policy, cfg, bench, targets)
            log.info("%s seed %d: %d rounds in %.0f s", method, seed, bench.rounds, time.perf_counter() - start)
            scores, images = measure(policy, bench)
            for k, v in scores.items():
                rows[method].setdefault(k, []).append(v)
            if seed == bench.seeds[0]:
                grid_rows.append(images[:12])
                grid_labels.append(method)
    columns = list(base_scores)
    table = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {name} | " + " | ".join(cell(row.get(c, [])) for c in columns) + " |" for name, row in rows.items()]
    markdown = "\n".join(table) + "\n"
    grid = save_grid(grid_rows, out_dir / "grid.png", grid_labels, cell=64)
    result = {"config": bench.model_dump(mode="json"), "rows": rows, "grid": str(grid)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(markdown)
    return result | {"markdown": markdown}
