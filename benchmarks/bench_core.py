"""Throughput of the core library on the tiny model (CPU unless --device says otherwise).

    python benchmarks/bench_core.py [--device cuda] [--threads 2]

Prints images/s for group sampling, pairs/s for an online PSO update (forward + backward of
policy and reference), and MB/s for the experience and weight codecs. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers.utils import logging as diffusers_logging

    from pso.codecs import decode_experience, decode_weights, encode_experience, encode_weights
    from pso.config.schema import LoraFinetune, ModelConfig, OnlinePSOLoss, PairingConfig
    from pso.experience import group_records
    from pso.objectives import PairBatch, compute_loss
    from pso.pairing import pairs_in_groups
    from pso.policy import DistilledPolicy
    from pso.sampling import sample_groups
    from pso.tiny.pipelines import build_tiny_pipeline

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "m", "sdxl")
        cfg = ModelConfig(family="sdxl-dmd2", pretrained=str(model), num_steps=4, device=args.device)
        policy = DistilledPolicy.from_config(cfg, LoraFinetune(rank=16))
    print(f"tiny SDXL-format model, sdxl-dmd2 recipe (4 steps), device {args.device}, {args.threads} threads")

    prompts = ["a red circle on a blue background"] * 8
    for batch in (4, 16, 32):
        sec = timed(lambda b=batch: sample_groups(policy, prompts, 4, 0, batch_size=b), args.repeat)
        print(f"sample 32 images (4 steps + decode), batch {batch:2}: {32 / sec:8.1f} images/s")

    traj = sample_groups(policy, prompts, 4, 0, batch_size=32)
    scores = torch.rand(32, generator=torch.Generator().manual_seed(0))
    pairs = pairs_in_groups(scores, 4, PairingConfig(strategy="all-pairs"))[:16]
    batch = PairBatch.from_trajectories(traj, pairs, policy.encode(prompts))

    def update():
        policy.backbone.zero_grad()
        compute_loss(policy, OnlinePSOLoss(), batch, torch.Generator()).loss.backward()

    sec = timed(update, args.repeat)
    print(f"online PSO update, 16 pairs x 3 transitions: {len(pairs) / sec:8.1f} pairs/s ({sec * 1e3:.0f} ms)")

    record = group_records(traj, scores, pairs, policy_version=0, actor_id="bench")[0]
    data = encode_experience(record)
    enc, dec = timed(lambda: encode_experience(record), 20), timed(lambda: decode_experience(data), 20)
    print(
        f"experience record ({len(data) / 1e6:.2f} MB): encode {len(data) / enc / 1e6:8.1f} MB/s, "
        f"decode {len(data) / dec / 1e6:8.1f} MB/s"
    )
    bundle = policy.export_weights(1)
    data = encode_weights(bundle)
    spec = policy.weight_spec()
    enc, dec = timed(lambda: encode_weights(bundle), 20), timed(lambda: decode_weights(data, spec), 20)
    print(
        f"LoRA weight bundle ({len(data) / 1e6:.2f} MB): encode {len(data) / enc / 1e6:8.1f} MB/s, "
        f"decode {len(data) / dec / 1e6:8.1f} MB/s"
    )


if __name__ == "__main__":
    main()
