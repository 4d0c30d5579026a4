"""Learner overhead: pairs/s of `LearnerEngine.update` (DeepSpeed) against the bare PyTorch loop.

    python benchmarks/bench_learner.py [--device cuda] [--threads 2] [--stages 0 1 2 3] [--bf16]

The bare loop is `pso.loop.update_on_pairs` (torch AdamW, compute_loss, backward, clip, step per
micro-batch) on a model of the same dtype; every loop updates on the same batch in the same run, one
process, world size 1.
Timings alternate between the loops and report the median, which shrugs off a busy machine.
Prints a markdown table; figures, not assertions (the goal is an overhead under 10%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages to time")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 (a bfloat16 model) at each stage")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per update")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="timed updates per loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device.startswith("cuda") else "cpu")

    from diffusers.utils import logging as diffusers_logging

    from learner.engine import LearnerEngine
    from pso.config.schema import LoraFinetune, ModelConfig, OnlinePSOLoss, OptimConfig, PSOConfig
    from pso.config.services import LearnerConfig
    from pso.loop import make_optimizer, update_on_pairs
    from pso.objectives import PairBatch
    from pso.policy import DistilledPolicy
    from pso.sampling import sample_groups
    from pso.tiny.pipelines import build_tiny_pipeline

    diffusers_logging.set_verbosity_error()
    cfg = PSOConfig(loss=OnlinePSOLoss(), optim=OptimConfig(pairs_per_step=args.pairs_per_step))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "m", "sdxl")

        def policy(dtype: str = "float32") -> DistilledPolicy:
            model_cfg = ModelConfig(
                family="sdxl-dmd2", pretrained=str(model), num_steps=4, device=args.device, dtype=dtype
            )
            return DistilledPolicy.from_config(model_cfg, LoraFinetune(rank=16))

        def make_batch(pol: DistilledPolicy) -> PairBatch:
            prompts = [f"prompt {i}" for i in range(args.pairs)]
            traj = sample_groups(pol, prompts, 2, 0, batch_size=32, decode=False)
            return PairBatch.from_trajectories(
                traj, [(2 * i, 2 * i + 1) for i in range(args.pairs)], pol.encode(prompts)
            )

        loops = {}  # name -> (the bare loop it is compared with, one update)
        for precision in ["fp32"] + (["bf16"] if args.bf16 else []):
            dtype = "bfloat16" if precision == "bf16" else "float32"
            bare = policy(dtype)
            batch = make_batch(bare)
            optimizer = make_optimizer(bare, cfg)
            base = f"bare PyTorch, {precision} model"
            loops[base] = (base, lambda gen, p=bare, o=optimizer, b=batch: update_on_pairs(p, o, b, cfg, gen))
            for stage in args.stages:
                engine = LearnerEngine(
                    policy(dtype), cfg.loss, cfg.optim, LearnerConfig(zero_stage=stage, precision=precision)
                )
                loops[f"LearnerEngine ZeRO-{stage} {precision}"] = (
                    base,
                    lambda gen, e=engine, b=batch: e.update(b, gen=gen),
                )

        times: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(args.repeat + 1):  # round 0 warms up
            for name, (_, run) in loops.items():
                start = time.perf_counter()
                run(torch.Generator().manual_seed(r))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if r:
                    times[name].append(time.perf_counter() - start)

    print(
        f"\ntiny SDXL-format model, sdxl-dmd2 recipe (4 steps), LoRA rank 16, online-pso, {args.pairs} pairs/update "
        f"in micro-batches of {args.pairs_per_step}, device {args.device}, {args.threads} threads, "
        f"median of {args.repeat}\n"
    )
    print("| loop | pairs/s | time / bare | overhead |")
    print("|---|---:|---:|---:|")
    for name, (base, _) in loops.items():
        ratio = statistics.median(times[name]) / statistics.median(times[base])
        print(
            f"| {name} | {args.pairs / statistics.median(times[name]):.1f} | {ratio:.3f} | {100 * (ratio - 1):+.1f}% |"
        )


if __name__ == "__main__":
    main()
