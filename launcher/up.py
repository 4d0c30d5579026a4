"""`pso up`: Redis, the reward server, N actors and the learner on one machine, as separate processes.
With a `preferences` section (offline training on a preference data set) there are no actors: the learner
reads the pairs itself, and the reward server is there for the final evaluation.

    start Redis (or use $REDIS_URL / redis.url), then the reward server (wait until ready),
    the learner and the actors, each with its log under the run folder
    until the learner is done (learner.max_updates) or Ctrl-C: one progress line (the learner
    draws a sample grid of each weight version itself)
    then: base-versus-tuned evaluation through the reward server, the final weights exported as
    diffusers loads them, and everything stopped in order

The run folder holds config.yaml (what every process read), logs/, learner/ (the learner's run
folder: metrics, checkpoints, grids/ with one grid per version, its reward curve and export),
versions.png (a few grids stacked), reward_curve.png, before_after.png, lora/ (the final weights
with a model card that holds the evaluation) and summary.json.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from launcher.processes import Child, wait_until
from pso.codecs import decode_weights
from pso.config import dump_config
from pso.config.schema import PSOConfig
from pso.export import export_policy
from pso.images import save_grid
from pso.net import free_port
from pso.policy import DistilledPolicy
from pso.prompts import load_prompts, pick_prompts
from pso.report import read_metrics, run_curve, versions_sheet
from pso.sampling import sample_groups
from pso.transport.base import ExperienceQueue, WeightStore
from reward_server.client import RewardClient

log = logging.getLogger("pso.up")


def run_config(cfg: PSOConfig, run_dir: Path, redis_url: str) -> PSOConfig:
    """The config every process of this run reads: one Redis, one reward server on a free port, the
    learner's files in the run folder."""
    data = cfg.model_dump(mode="json")
    port = free_port()
    data["redis"]["url"] = redis_url
    data["reward_server"].update(host="127.0.0.1", port=port, workers=1)
    data["actor"]["reward_url"] = f"http://127.0.0.1:{port}"
    data["learner"]["run_dir"] = str(run_dir / "learner")
    if data["learner"]["tensorboard_dir"] is None and importlib.util.find_spec("tensorboard") is not None:
        data["learner"]["tensorboard_dir"] = str(run_dir / "tensorboard")  # installed: the run shows there too
    data["learner"]["metrics_file"] = str(run_dir / "learner" / "metrics.jsonl")
    data["learner"]["checkpoint_dir"] = str(run_dir / "learner" / "checkpoints")
    return PSOConfig.model_validate(data)


def run_up(cfg: PSOConfig) -> dict:
    from pso.redis_server import LocalRedis
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

    run_dir = cfg.up.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if cfg.model.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it found no GPU
    children: list[Child] = []
    with ExitStack() as stack:
        redis_url = cfg.redis.url or os.environ.get("REDIS_URL")
        if redis_url is None:
            redis = stack.enter_context(LocalRedis(run_dir / "redis"))
            redis_url = redis.url
            log.info("started Redis at %s", redis_url)
        cfg = run_config(cfg, run_dir, redis_url)
        if cfg.learner.tensorboard_dir is not None:
            log.info("TensorBoard (figures, grids, reward curve): tensorboard --logdir %s", cfg.learner.tensorboard_dir)
        config_path = run_dir / "config.yaml"
        config_path.write_text(dump_config(cfg))
        stack.callback(_stop_all, children)

        def start(name: str, module: str, *args: str) -> Child:
            child = Child(name, module, list(args), run_dir / "logs" / f"{name}.log", env)
            children.append(child)
            return child

        start("reward-server", "pso.cli", "reward-server", "-c", str(config_path))
        reward = RewardClient(cfg.actor.reward_url, retries=0)
        if not wait_until(reward.ready, 600, children=children):
            raise RuntimeError("the reward server did not get ready within 10 minutes")
        learner = start("learner", *_learner_command(cfg, config_path))
        if cfg.preferences is not None:  # offline: the learner reads its pairs from the data set itself
            log.info("offline training on %s: no actors", cfg.preferences.source)
        else:
            for i in range(cfg.up.actors):
                start(f"actor-{i}", "pso.cli", "actor", "-c", str(config_path), "--set", f"actor.id=actor-{i}")
        client = connect(cfg.redis)
        weights = RedisWeightStore(client, cfg.redis)
        _follow(cfg, learner, children)
        viewer = DistilledPolicy.from_config(cfg.model, cfg.finetune)  # evaluated, then exported
        for child in children:
            if child.name.startswith("actor"):
                child.stop()
        summary = evaluate(cfg, viewer, weights, RewardClient(cfg.actor.reward_url), run_dir)
        if cfg.preferences is None:
            summary["experience"] = experience_summary(RedisExperienceQueue(client, cfg.redis))
        else:
            summary["preferences"] = preferences_summary(cfg)
        if summary["version"]:  # the final weights (the viewer holds them now) as diffusers loads them, with a card
            summary["export"] = str(
                export_policy(viewer, summary["version"], cfg, run_dir / "lora", evaluation=summary)
            )
    rows = read_metrics(cfg.learner.metrics_file)
    if rows:
        run_curve(cfg, rows, run_dir / "reward_curve.png")
    versions_sheet(cfg.learner.run_dir / "grids", run_dir / "versions.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _learner_command(cfg: PSOConfig, config_path: Path) -> tuple[str, ...]:
    if cfg.up.learner_ranks == 1:
        return ("pso.cli", "learner", "-c", str(config_path))
    # several ranks under the learner's own launcher (learner/launch.py): its exit status says what happened
    ranks = ("--nproc-per-node", str(cfg.up.learner_ranks), "--master-port", str(free_port()))
    return ("pso.cli", "learner", "-c", str(config_path), *ranks)


def _follow(cfg: PSOConfig, learner: Child, children: list[Child]) -> None:
    """Until the learner exits: one progress line."""
    metrics_file = cfg.learner.metrics_file
    offline = cfg.preferences is not None
    desc = f"offline {cfg.loss.name}" if offline else "online PSO"
    bar = tqdm(total=cfg.learner.max_updates, desc=desc, unit="update")
    while learner.exit_code is None:
        for c in children:
            if c is not learner and c.exit_code is not None:
                raise RuntimeError(f"{c.name} exited with status {c.exit_code}:\n{c.tail()}")
        rows = read_metrics(metrics_file)
        if rows:
            last = rows[-1]
            bar.update(last["updates"] - bar.n)
            if offline:
                bar.set_postfix(
                    version=int(last["version"]),
                    loss=f"{np.mean([r['loss'] for r in rows[-10:]]):.4f}",
                    accuracy=f"{np.mean([r['accuracy'] for r in rows[-10:]]):.2f}",
                    epoch=int(last["epoch"]) + 1,
                    pairs_s=f"{last['pairs_per_s']:.1f}",
                )
            else:
                bar.set_postfix(
                    version=int(last["version"]),
                    reward=f"{np.mean([r['reward_mean'] for r in rows[-10:]]):.4f}",
                    pairs_s=f"{last['pairs_per_s']:.1f}",
                    backlog=int(last.get("backlog", 0)),
                )
        time.sleep(0.5)
    bar.close()
    if learner.exit_code != 0:
        raise RuntimeError(f"the learner exited with status {learner.exit_code}:\n{learner.tail()}")


def _prompts(cfg: PSOConfig, n: int) -> list[str]:
    return pick_prompts(load_prompts(cfg.actor.prompts, cfg.loop.prompts), n, cfg.up.eval_seed)


def evaluate(
    cfg: PSOConfig, policy: DistilledPolicy, weights: WeightStore, reward: RewardClient, run_dir: Path
) -> dict:
    """The newest weights against the base model on the same prompts and starting noise, scored by the
    run's reward server: per model, both means, the paired difference with its standard error, win rate."""
    prompts = _prompts(cfg, cfg.up.eval_prompts)
    version = weights.latest() or 0
    if version:
        policy.load_weights(decode_weights(weights.fetch(version), expected=policy.weight_spec()))
    base = sample_groups(policy, prompts, 1, cfg.up.eval_seed, reference=True).images
    tuned = sample_groups(policy, prompts, 1, cfg.up.eval_seed).images
    n_grid = min(len(prompts), cfg.learner.grid_prompts)
    save_grid([base[:n_grid], tuned[:n_grid]], run_dir / "before_after.png", labels=["base", f"version {version}"])
    before, after = reward.score(base, prompts), reward.score(tuned, prompts)
    summary: dict = {"version": version, "prompts": len(prompts), "models": {}}
    for name in before.per_model:
        b, a = torch.tensor(before.per_model[name]), torch.tensor(after.per_model[name])
        diff = a - b
        summary["models"][name] = {
            "base": float(b.mean()),
            "tuned": float(a.mean()),
            "gain": float(diff.mean()),
            "gain_stderr": float(diff.std() / len(diff) ** 0.5),
            "win_rate": float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()),
        }
    return summary


def experience_summary(queue: ExperienceQueue) -> dict:
    """What became of the records the actors produced, and the share wasted as stale (of those decided)."""
    counters, stats = queue.counters(), queue.stats()
    out = {k: counters.get(k, 0) for k in ("produced", "trained", "stale", "corrupt", "redelivered")}
    out["left"] = stats.backlog  # pushed after the learner's last update: sampled, never trained on
    out["stale_share"] = out["stale"] / max(out["trained"] + out["stale"] + out["corrupt"], 1)
    return out


def preferences_summary(cfg: PSOConfig) -> dict:
    """Offline: how much of the data the learner trained on (its last update's row: rank 0's shard)."""
    rows = read_metrics(cfg.learner.metrics_file)
    last = rows[-1] if rows else {}
    return {
        "source": cfg.preferences.source,
        "updates": int(last.get("updates", 0)),
        "pairs": int(sum(r["pairs"] for r in rows)) * cfg.up.learner_ranks,
        "epoch": int(last.get("epoch", 0)),
        "position": int(last.get("position", 0)),
        "ties": int(last.get("ties", 0)),
        "bad_rows": int(last.get("bad_rows", 0)),
    }


def _stop_all(children: list[Child]) -> None:
    """Actors first (they feed the learner), then the learner, then the reward server."""
    order = sorted(children, key=lambda c: (not c.name.startswith("actor"), c.name == "reward-server"))
    for child in order:
        code = child.stop()
        if code not in (0, -15, None):
            log.warning("%s exited with status %s (log: %s)", child.name, code, child.log_path)
