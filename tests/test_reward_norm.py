"""Per-model reward normalisation (pso/reward_norm.py) and the actor that pairs on it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pso.reward_norm import RewardNormalizer, RunningMoments


def test_running_moments_equal_the_moments_of_everything_seen():
    rng = np.random.default_rng(0)
    moments, seen = RunningMoments(), []
    assert (moments.count, moments.mean, moments.std) == (0, 0.0, 0.0)
    for size in (1, 7, 1, 300, 2, 50):
        batch = (rng.normal(21.0, 0.8, size) * rng.choice([1, 1e3])).tolist()
        moments.update(batch)
        seen += batch
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert moments.std == pytest.approx(np.std(seen), rel=1e-9)
    moments.update([])
    assert moments.count == len(seen)


def test_normalised_models_weigh_as_their_weights_say_whatever_their_scales():
    """PickScore-like scores (around 21, spread 1) and HPSv2-like ones (around 0.27, spread 0.01) at weights 1
    and 1: the raw sum is the first model alone; the normalised sum has both in equal part."""
    rng = np.random.default_rng(1)
    norm = RewardNormalizer({"pick": 1.0, "hps": 1.0})
    for _ in range(20):
        batch = {"pick": rng.normal(21, 1, 64).tolist(), "hps": rng.normal(0.27, 0.01, 64).tolist()}
        total = norm.total(batch)
    raw = torch.tensor(batch["pick"]) + torch.tensor(batch["hps"])
    pick, hps = (torch.tensor(batch[k]) for k in ("pick", "hps"))
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    assert corr(raw, hps) < 0.2 < 0.6 < corr(total, hps) and corr(total, pick) > 0.6
    state = norm.state()
    assert state["hps"]["count"] == 20 * 64 and state["hps"]["std"] == pytest.approx(0.01, rel=0.1)
    assert state["pick"]["mean"] == pytest.approx(21, abs=0.1)
    with pytest.raises(ValueError, match=r"scores lack the models \['hps'\]"):
        norm.total({"pick": [1.0]})
    with pytest.raises(ValueError, match="at least one model"):
        RewardNormalizer({})


def test_an_actor_pairs_on_normalised_scores_and_keeps_the_raw_total(tmp_path):
    """A real reward server (two tiny rewards on different scales, the second weighted 0.5) and a real Redis: the
    actor's pairs follow the normalised total computed independently from each record's per-model scores, its
    records keep the server's raw total, and its metrics report each model's running moments."""
    from actors.actor import Actor
    from actors.metrics import ActorCollector
    from pso.codecs import decode_experience
    from pso.config import load_config
    from pso.config.reward_server import RewardServerConfig, TinySpec
    from pso.config.schema import PSOConfig
    from pso.pairing import pairs_in_group
    from pso.policy import DistilledPolicy
    from pso.redis_server import LocalRedis
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
    from reward_server.app import create_app
    from reward_server.client import RewardClient
    from reward_server.main import serve_in_background

    served = RewardServerConfig(models=[TinySpec(reward="large"), TinySpec(reward="fidelity", weight=0.5)])
    with LocalRedis(tmp_path / "redis", start_timeout_s=60) as redis, serve_in_background(create_app(served)) as url:
        RewardClient(url).wait_ready(120)
        cfg = load_config(PSOConfig, Path(__file__).parents[1] / "configs" / "tiny.yaml")
        cfg.redis.url = redis.url
        cfg.actor.reward_normalization = "running"
        cfg.actor.prompts_per_batch = 6
        cfg.sampling.group_size = 3
        cfg.pairing.strategy = "best-vs-worst"
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        queue = RedisExperienceQueue(connect(cfg.redis), cfg.redis)
        prompts = [f"a red {shape} on a blue background" for shape in ("circle", "square", "triangle")]
        weights = RedisWeightStore(connect(cfg.redis), cfg.redis)
        actor = Actor(cfg, policy, prompts, queue, weights, RewardClient(url), "norm")
        for _ in range(2):
            actor.step(threading.Event())
        records = [decode_experience(d.data) for d in queue.read("learner-0", 100, 1.0)]

    state = actor.normalizer.state()
    assert actor.normalizer.weights == {"tiny-large": 1.0, "tiny-fidelity": 0.5}
    assert state["tiny-large"]["count"] == state["tiny-fidelity"]["count"] == 2 * 6 * 3
    assert records, "every group tied"
    for r in records:
        large, fidelity = (
            torch.tensor(r.reward_details[k], dtype=torch.float64) for k in ("tiny-large", "tiny-fidelity")
        )
        assert torch.allclose(r.scores, (large + 0.5 * fidelity).float(), atol=1e-6)  # the raw total, as served
    last = records[-1]  # from the second batch: paired with the moments of both
    large, fidelity = (
        torch.tensor(last.reward_details[k], dtype=torch.float64) for k in ("tiny-large", "tiny-fidelity")
    )
    z = (large - state["tiny-large"]["mean"]) / state["tiny-large"]["std"]
    z += 0.5 * (fidelity - state["tiny-fidelity"]["mean"]) / state["tiny-fidelity"]["std"]
    assert last.pairs == pairs_in_group(z, cfg.pairing)
    # and it matters: some group's pair on the normalised total is not the pair on the raw one
    assert any(r.pairs != pairs_in_group(r.scores, cfg.pairing) for r in records)
    metrics = {m.name: m for m in ActorCollector(actor).collect()}
    assert {s.labels["model"]: s.value for s in metrics["pso_actor_model_score_std"].samples} == {
        name: s["std"] for name, s in state.items()
    }
