"""Pairwise judges: the round-robin's rules (pso/judging.py), the tiny world's judge, and /v1/compare with a judge."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from reward_helpers import error_of, png_b64, scene_batch

from pso.config.reward_server import LimitsConfig, RewardServerConfig, TinyJudgeSpec, TinySpec
from pso.judging import decide, round_robin
from pso.tiny.rewards import large
from pso.tiny.world import Scene, draw
from reward_server.app import create_app
from reward_server.backends import build_backend
from reward_server.client import RewardClient
from reward_server.main import serve_in_background


def test_a_round_robin_asks_both_orders_of_every_two():
    assert round_robin(2) == [(0, 1), (1, 0)]
    assert len(round_robin(4)) == 12 and set(round_robin(4)) == {(i, j) for i in range(4) for j in range(4) if i != j}
    with pytest.raises(ValueError, match="at least 2 candidates"):
        round_robin(1)


def test_only_judgements_that_agree_in_both_orders_make_pairs():
    # orders of 3: (0,1) (0,2) (1,0) (1,2) (2,0) (2,1); preference for the first shown
    t = decide(3, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # 0 beats 1 and 2, 1 beats 2, in both orders each
    assert t.decided == [(0, 1), (0, 2), (1, 2)] and (t.ties, t.inconsistent) == (0, 0)
    assert t.net_wins == [2, 0, -2] and t.scores.tolist() == [1.0, 0.0, -1.0]
    assert decide(3, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], "best-vs-worst").pairs == [(0, 2)]
    position = decide(2, [1.0, 1.0])  # whichever is shown first wins: a position bias, not a preference
    assert position.decided == [] and (position.ties, position.inconsistent) == (0, 1)
    assert decide(2, [0.0, 0.0]).inconsistent == 1  # the second shown wins both times
    assert decide(2, [0.5, 0.0]).ties == 1 and decide(2, [0.5, 0.5]).ties == 1
    assert decide(2, [0.9, 0.2]).decided == [(0, 1)]  # probabilities count by their side of 0.5
    with pytest.raises(ValueError, match="3 candidates need 6 judgements, got 2"):
        decide(3, [1.0, 0.0])


def test_the_tiny_judge_prefers_the_higher_reward_and_can_be_biased_by_position():
    images, prompts = scene_batch(6, seed=1)
    judge = build_backend(TinyJudgeSpec(reward="large"))
    assert judge.pairwise and judge.info.pairwise and judge.info.name == "tiny-judge-large"
    x = torch.stack(judge.preprocess_batch(images))
    r = large(x, prompts)
    first, second = x[:3], x[3:]
    # the prompts of the first three: the judge reads each pair against one prompt
    prefs = judge.compare_batch(first, second, prompts[:3])
    expected = [
        1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(large(first, prompts[:3]), large(second, prompts[:3]))
    ]
    assert prefs.tolist() == expected
    assert judge.compare_batch(first, first, prompts[:3]).tolist() == [0.5] * 3  # the same image: a tie
    biased = build_backend(TinyJudgeSpec(reward="large", first_bias=10.0))
    assert biased.compare_batch(first, second, prompts[:3]).tolist() == [1.0] * 3
    assert r.shape == (6,)


def test_compare_with_a_judge_reports_every_judgement_pair_tie_and_inconsistency():
    config = RewardServerConfig(
        models=[TinySpec(), TinyJudgeSpec(), TinyJudgeSpec(name="biased", first_bias=0.05)],
        limits=LimitsConfig(max_judgements=12),
    )
    scene, rng = Scene("red", "circle", "blue"), np.random.default_rng(0)
    images = torch.from_numpy(np.stack([draw(scene, rng) for _ in range(4)]))  # large: 0.31, 0.11, 0.079, 0.31
    prompt, prompts = scene.prompt, [scene.prompt] * 4
    body = {"prompt": prompt, "images": [png_b64(i) for i in images]}
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        judged = httpx.post(f"{url}/v1/compare", json={**body, "judge": "tiny-judge-large"}).json()
        assert [(j["first"], j["second"]) for j in judged["judgements"]] == round_robin(4)
        rewards = large(images.permute(0, 3, 1, 2).float() / 255, [prompt] * 4).tolist()
        for j in judged["judgements"]:
            a, b = rewards[j["first"]], rewards[j["second"]]
            assert j["preference"] == (1.0 if a > b else 0.0 if a < b else 0.5)
        assert (judged["inconsistent"], judged["ties"], len(judged["pairs"])) == (0, 1, 5)  # 0.31 = 0.31: a tie
        assert all(rewards[w] > rewards[lo] for w, lo in judged["pairs"])
        assert rewards[judged["winner"]] == max(rewards)
        biased = httpx.post(f"{url}/v1/compare", json={**body, "judge": "biased"}).json()
        # the bias decides the close calls by position, which both orders reveal; clear ones still pair
        assert biased["inconsistent"] == sum(abs(a - b) < 0.05 for a, b in _pairs(rewards)) == 2
        assert len(biased["pairs"]) == 4 and biased["ties"] == 0
        models = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert models["biased"]["pairwise"] and not models["tiny-large"]["pairwise"]

        scored = httpx.post(f"{url}/v1/score", json={"prompts": prompts, "images": body["images"]}).json()
        assert set(scored["scores"]) == {"tiny-large"}  # judges are not scorers
        as_scorer = httpx.post(
            f"{url}/v1/score", json={"prompts": prompts, "images": body["images"], "models": ["biased"]}
        )
        assert as_scorer.status_code == 422 and error_of(as_scorer) == "pairwise_judge"
        not_judge = httpx.post(f"{url}/v1/compare", json={**body, "judge": "tiny-large"})
        assert not_judge.status_code == 422 and error_of(not_judge) == "not_a_judge"
        both = httpx.post(f"{url}/v1/compare", json={**body, "judge": "biased", "models": ["tiny-large"]})
        assert both.status_code == 422 and "not both" in both.text
        five = httpx.post(
            f"{url}/v1/compare", json={**body, "images": body["images"] + body["images"][:1], "judge": "biased"}
        )
        assert five.status_code == 413 and "5 images need 20 judgements; at most 12" in five.text
        plain = httpx.post(f"{url}/v1/compare", json=body).json()  # without a judge: the scalar comparison
        assert plain["winner"] == rewards.index(max(rewards))


def _pairs(values):
    return [(values[i], values[j]) for i in range(len(values)) for j in range(i + 1, len(values))]


def test_an_actor_pairs_its_groups_by_the_judges_agreed_verdicts(tmp_path):
    """A real reward server (the tiny judge with a position bias, and the scalar reward for the curve) and a real
    Redis: every record's pair is what the round-robin of the judge's verdicts decides, recomputed here from the
    scalar rewards the judge compares; the judgements, ties and inconsistencies are counted."""
    import threading
    from pathlib import Path

    from actors.actor import Actor
    from actors.metrics import ActorCollector
    from pso.codecs import decode_experience
    from pso.config import load_config
    from pso.config.schema import PSOConfig
    from pso.policy import DistilledPolicy
    from pso.redis_server import LocalRedis
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect

    bias = 0.01
    cfg = load_config(PSOConfig, Path(__file__).parents[1] / "configs" / "tiny-pairwise.yaml")
    assert cfg.actor.judge == "tiny-judge-large" and cfg.reward_server.models[0].first_bias == bias
    with (
        LocalRedis(tmp_path / "redis", start_timeout_s=60) as redis,
        serve_in_background(create_app(cfg.reward_server)) as url,
    ):
        RewardClient(url).wait_ready(120)
        cfg.redis.url = redis.url
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        queue = RedisExperienceQueue(connect(cfg.redis), cfg.redis)
        prompts = [f"a {c} square on a black background" for c in ("red", "white", "green")]
        weights = RedisWeightStore(connect(cfg.redis), cfg.redis)
        actor = Actor(cfg, policy, prompts, queue, weights, RewardClient(url), "judged")
        actor.step(threading.Event())
        records = [decode_experience(d.data) for d in queue.read("learner-0", 100, 1.0)]

    g = cfg.sampling.group_size
    groups = cfg.actor.prompts_per_batch
    assert actor.stats.judgements == groups * g * (g - 1)
    ties = inconsistent = 0
    for r in records:  # the judge prefers the first shown when its `large` plus the bias beats the second's
        rewards = r.reward_details["tiny-large"]
        prefs = []
        for i, j in round_robin(g):
            lead = rewards[i] + bias - rewards[j]
            prefs.append(1.0 if lead > 0 else 0.0 if lead < 0 else 0.5)
        expected = decide(g, prefs, cfg.pairing.strategy)
        assert r.pairs == expected.pairs and r.pairs
        assert torch.allclose(r.scores, torch.tensor(rewards))  # the scalar reward, for the curve
        ties, inconsistent = ties + expected.ties, inconsistent + expected.inconsistent
    # groups left without a pair push no record: their ties and inconsistencies are counted, not recomputable here
    assert (
        len(records) <= groups and actor.stats.judged_ties >= ties and actor.stats.judged_inconsistent >= inconsistent
    )
    counters = {m.name: m.samples[0].value for m in ActorCollector(actor).collect()}
    assert counters["pso_actor_judgements"] == actor.stats.judgements


def test_an_actor_refuses_at_start_a_judge_that_is_not_one_or_cannot_judge_its_groups():
    from actors.actor import check_judge

    config = RewardServerConfig(models=[TinySpec(), TinyJudgeSpec()])
    with serve_in_background(create_app(config)) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        check_judge(client, "tiny-judge-large", 8)  # 56 judgements: the limit exactly
        with pytest.raises(SystemExit, match=r"'tiny-large' is no judge of the reward server; its judges: \['tiny"):
            check_judge(client, "tiny-large", 4)
        with pytest.raises(SystemExit, match=r"a group of 9 needs 72 judgements, over .*max_judgements \(56\)"):
            check_judge(client, "tiny-judge-large", 9)
