"""Target images against online references (style transfer, customization): pairs and the local loop."""

import json
import os
import threading

import pytest
import torch
from PIL import Image

from pso.config.schema import PSOConfig, TargetsConfig
from pso.loop import run_local_loop
from pso.objectives import EncodedTargets, PairBatch
from pso.policy import DistilledPolicy
from pso.sampling import sample_groups

CAPTIONS = ["a red circle on a blue background", "a green square on a yellow background"]


def config(loss: dict, rounds: int = 12) -> PSOConfig:
    return PSOConfig.model_validate(
        {
            "model": {"family": "tiny", "pretrained": "builtin:tiny", "num_steps": 4},
            "finetune": {"mode": "lora", "rank": 4},
            "sampling": {"group_size": 2, "batch_size": 16, "seed": 0},
            "loss": loss,
            "optim": {"lr": 1e-3, "pairs_per_step": 8},
            "loop": {"rounds": rounds, "prompts_per_round": 2, "prompts": CAPTIONS},
        }
    )


def distance_to_targets(policy: DistilledPolicy, targets: EncodedTargets) -> float:
    traj = sample_groups(policy, targets.captions, 4, seed=7, decode=False)
    want = targets.latents.repeat_interleave(4, 0)
    return float(((traj.latents - want) ** 2).mean())


def test_every_reference_is_paired_with_its_prompts_target():
    cfg = config({"name": "target-vs-reference"})
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    traj = sample_groups(policy, CAPTIONS, 3, seed=0, decode=False)
    targets = torch.randn(2, *policy.latent_shape)
    batch = PairBatch.from_targets(targets, traj, policy.encode(CAPTIONS))
    assert len(batch) == 6 and batch.winner_states.shape == (6, 1, *policy.latent_shape)
    assert torch.equal(batch.winner_states[:3, 0], targets[[0, 0, 0]])
    assert torch.equal(batch.winner_states[3:, 0], targets[[1, 1, 1]])
    assert torch.equal(batch.loser_states, traj.states)
    with pytest.raises(ValueError, match="1 targets for 2 prompts"):
        PairBatch.from_targets(targets[:1], traj, policy.encode(CAPTIONS))


def test_targets_need_a_target_loss():
    with pytest.raises(ValueError, match="target-vs-reference or customization .* not online-pso"):
        PSOConfig.model_validate({"targets": {"source": "data/style"}})
    assert PSOConfig.model_validate({"targets": {"source": "d"}, "loss": {"name": "sft"}}).targets.source == "d"


def test_target_vs_reference_pulls_the_few_step_samples_toward_the_targets():
    """Targets the base model can draw (its own samples from other noise): training against fresh references
    moves the 4-step samples of the same captions toward them, with no reward at all."""
    cfg = config({"name": "target-vs-reference", "beta": 50.0})
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    own = sample_groups(policy, CAPTIONS, 1, seed=123, decode=False).latents
    targets = EncodedTargets(CAPTIONS, own)
    before = distance_to_targets(policy, targets)
    results = run_local_loop(policy, cfg, None, progress=False, targets=targets)
    assert [r.pairs for r in results] == [4] * cfg.loop.rounds  # 2 captions x 2 references each round
    assert all(r.reward_mean != r.reward_mean for r in results)  # no reward function: nothing reported (NaN)
    assert distance_to_targets(policy, targets) < 0.9 * before


def test_reward_pairing_needs_a_reward():
    cfg = config({"name": "online-pso"})
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    with pytest.raises(ValueError, match="give a reward function"):
        run_local_loop(policy, cfg, None, progress=False)


def test_an_actor_samples_references_for_the_targets_and_the_learner_pairs_them_with_the_targets(tmp_path):
    """The service path on a real Redis: an actor in target mode (no reward server: scoring is off) pushes one
    record per target caption with (TARGET, reference) pairs; the learner's engine loads and encodes the target
    images (cached on disk) and trains each reference against its target."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.actor import Actor
    from learner.engine import LearnerEngine
    from pso.codecs import TARGET, decode_experience
    from pso.config.services import LearnerConfig
    from pso.experience import pair_batch_from_records
    from pso.redis_server import LocalRedis
    from pso.targets import load_target_latents, load_target_set
    from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
    from reward_server.client import RewardClient

    folder = tmp_path / "targets"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, (caption, colour) in enumerate(zip(CAPTIONS, [(255, 0, 0), (0, 255, 0)])):
            Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    with LocalRedis(tmp_path / "redis", start_timeout_s=60) as redis:
        cfg = config({"name": "target-vs-reference"})
        cfg = cfg.model_copy(update={"targets": TargetsConfig(source=str(folder))})
        cfg.redis.url = redis.url
        cfg.actor.prompts_per_batch = 3
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        captions = load_target_set(cfg.targets, policy.image_size).captions
        queue = RedisExperienceQueue(connect(cfg.redis), cfg.redis)
        unused = RewardClient("http://127.0.0.1:9")  # nothing listens: scoring is off, it must not be called
        actor = Actor(cfg, policy, captions, queue, RedisWeightStore(connect(cfg.redis), cfg.redis), unused, "a")
        assert actor.step(threading.Event()) == 3
        records = [decode_experience(d.data) for d in queue.read("learner-0", 10, 1.0)]
        assert len(records) == 3
        for r in records:
            assert r.prompt == CAPTIONS[r.target] and r.pairs == [(TARGET, 0), (TARGET, 1)] and r.scores.eq(0).all()

        learner_policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        latents, images = load_target_latents(cfg.targets, learner_policy, tmp_path / "cache")
        assert images == 2 and latents.shape == (2, *learner_policy.latent_shape)
        assert any((tmp_path / "cache").iterdir())
        red = learner_policy.decode(latents[:1])[0]
        assert red[0].mean() > 0.8 and red[1:].mean() < 0.2  # the red target decodes red
        batch = pair_batch_from_records(learner_policy, records, latents)
        assert len(batch) == 6 and batch.winner_states.shape == (6, 1, *learner_policy.latent_shape)
        for k, r in enumerate(records):
            assert torch.equal(batch.winner_states[2 * k, 0], latents[r.target])
        engine = LearnerEngine(learner_policy, cfg.loss, cfg.optim, LearnerConfig())
        before = learner_policy.trainable_state_dict()
        assert engine.update(batch, gen=torch.Generator().manual_seed(0))["loss"] > 0
        after = engine.export_weights(1).tensors
        assert any(not torch.equal(after[k], before[k]) for k in before)
        with pytest.raises(ValueError, match="records reference target images, but this learner has none"):
            pair_batch_from_records(learner_policy, records)


def test_prior_preservation_adds_the_base_models_own_class_samples_as_weighted_targets(tmp_path):
    from pso.targets import is_prior, load_target_latents, load_target_set, target_captions

    folder = tmp_path / "subject"
    folder.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "0.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": CAPTIONS[0]}) + "\n")
    targets = TargetsConfig(source=str(folder), class_prompts=CAPTIONS, class_samples=2, prior_weight=0.5)
    cfg = config({"name": "target-vs-reference"})
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    captions = target_captions(targets)
    assert captions[:1] == load_target_set(targets, policy.image_size).captions
    assert captions == [CAPTIONS[0], CAPTIONS[0], CAPTIONS[0], CAPTIONS[1], CAPTIONS[1]]
    latents, images = load_target_latents(targets, policy, tmp_path / "cache")
    assert images == 1 and latents.shape == (5, *policy.latent_shape)
    assert [is_prior(targets, images, t) for t in range(5)] == [False, True, True, True, True]
    base = sample_groups(policy, CAPTIONS, 2, seed=2**31 - 1, decode=False, reference=True).latents
    torch.testing.assert_close(latents[1:], base)  # the base model's own samples, the same in every process
    again, _ = load_target_latents(targets, policy, tmp_path / "cache")
    assert torch.equal(again, latents)


def test_the_subject_evaluation_prompts_name_the_identifier_in_colours_the_targets_never_show():
    from pso.prompts import load_prompts
    from pso.tiny.tasks import subject_targets

    prompts = load_prompts("builtin:tiny-subject")
    trained = {caption for caption, _ in subject_targets()}
    assert len(prompts) == len(set(prompts)) >= 50 and all(" pixel " in p for p in prompts)
    assert not trained & set(prompts)


def test_the_customization_loss_is_a_hinge_on_the_error_gap_plus_the_samples_own_loss():
    """The paper's customization form: no reference model; the hinge stops once the target is fitted 1/beta
    better than the sample, and the sample's own error is added at sample_weight."""
    from pso.losses import customization_loss
    from pso.objectives import compute_loss

    err_t, err_s = torch.tensor([0.5, 0.5]), torch.tensor([0.6, 1.0])
    torch.testing.assert_close(customization_loss(err_t, err_s, 5.0, 0.5), torch.tensor([0.5 + 0.3, 0.0 + 0.5]))
    cfg = config({"name": "customization"})
    assert PSOConfig.model_validate({"targets": {"source": "d"}, "loss": {"name": "customization"}}).loss.beta == 5.0
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    traj = sample_groups(policy, CAPTIONS, 2, seed=0, decode=False)
    batch = PairBatch.from_targets(torch.randn(2, *policy.latent_shape), traj, policy.encode(CAPTIONS))
    out = compute_loss(policy, cfg.loss, batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.item() > 0 and {"error_target", "accuracy", "margin"} <= out.metrics.keys()
    assert sum(float(p.grad.abs().sum()) for p in policy.trainable_parameters()) > 0
