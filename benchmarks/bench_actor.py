"""Actor overhead: pairs/s of the actor (sample, score on the reward server over HTTP, pair, encode,
push to Redis) against the bare sampler (sample, score in-process, pair) on the same model and
batch sizes, in the same run.

    python benchmarks/bench_actor.py [--config configs/tiny.yaml] [--batches 12] [--threads 1]

A local Redis and `pso reward-server` (its own process) are started for the run. Figures, not
assertions; the goal is an overhead under 15%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--batches", type=int, default=12, help="measured batches per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from actors.actor import Actor
    from launcher.processes import Child, wait_until
    from pso.config import dump_config, load_config
    from pso.config.schema import PSOConfig
    from pso.loop import round_seed
    from pso.net import free_port
    from pso.pairing import pairs_in_groups
    from pso.policy import DistilledPolicy
    from pso.prompts import load_prompts
    from pso.redis_server import LocalRedis
    from pso.sampling import sample_groups
    from pso.tiny.rewards import REWARDS
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
    from reward_server.client import RewardClient

    port = free_port()
    overrides = [
        f"reward_server.port={port}",
        "reward_server.models=[{kind: tiny, reward: large}]",
        f"actor.reward_url=http://127.0.0.1:{port}",
        "actor.max_backlog=100000",
    ]
    cfg = load_config(PSOConfig, args.config, overrides=overrides)
    prompts = load_prompts(cfg.actor.prompts, cfg.loop.prompts)
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    g, n = cfg.sampling.group_size, cfg.actor.prompts_per_batch
    rng = np.random.default_rng(0)
    batches = [[prompts[i] for i in rng.integers(len(prompts), size=n)] for _ in range(args.batches + 1)]

    def bare(b: int) -> int:
        traj = sample_groups(policy, batches[b], g, round_seed(0, b), batch_size=cfg.sampling.batch_size)
        scores = REWARDS["large"](traj.images, [p for p in batches[b] for _ in range(g)])
        return len(pairs_in_groups(scores, g, cfg.pairing))

    bare(0)
    start, pairs = time.perf_counter(), 0
    for b in range(1, args.batches + 1):
        pairs += bare(b)
    bare_rate = pairs / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp, LocalRedis() as redis:
        cfg = load_config(PSOConfig, args.config, overrides=[*overrides, f"redis.url={redis.url}"])
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(dump_config(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = Child("reward-server", "pso.cli", ["reward-server", "-c", str(config_path)], Path(tmp) / "rs.log",
                       env)  # fmt: skip
        try:
            reward = RewardClient(cfg.actor.reward_url)
            wait_until(reward.ready, 120, children=[server])
            client = connect(cfg.redis)
            actor = Actor(cfg, policy, prompts, RedisExperienceQueue(client, cfg.redis),
                          RedisWeightStore(client, cfg.redis), reward, actor_id="bench")  # fmt: skip
            stop = threading.Event()
            actor.step(stop)  # warm-up
            before = actor.stats.pairs
            start = time.perf_counter()
            for _ in range(args.batches):
                actor.step(stop)
            actor_rate = (actor.stats.pairs - before) / (time.perf_counter() - start)
        finally:
            server.stop()

    shape = f"{n} prompts x {g} samples, {cfg.model.num_steps} steps"
    print(f"\n{args.batches} batches of {shape}, {args.threads} torch thread(s)\n")
    print("| loop | pairs/s | overhead |")
    print("|---|---:|---:|")
    print(f"| bare sampler (in-process reward) | {bare_rate:.1f} | |")
    print(f"| actor (reward server, Redis) | {actor_rate:.1f} | {bare_rate / actor_rate - 1:+.1%} |")


if __name__ == "__main__":
    main()
