"""Trajectories -> experience records -> bytes -> records -> the same loss."""

import math

import pytest
import torch

from pso.codecs import decode_experience, encode_experience
from pso.config.schema import OnlinePSOLoss, PairingConfig
from pso.experience import group_records, pair_batch_from_records
from pso.objectives import PairBatch, compute_loss
from pso.pairing import pairs_in_groups
from pso.sampling import sample_groups


def test_records_carry_the_groups_and_reproduce_the_loss(make_policy):
    policy = make_policy("lcm", "sd-lcm")
    prompts = ["a red circle", "a blue square", "a red circle"]
    traj = sample_groups(policy, prompts, group_size=3, seed=1, decode=False)
    scores = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.2, 0.2, 0.9, 0.0, 0.4])
    pairs = pairs_in_groups(scores, 3, PairingConfig())
    assert pairs == [(1, 0), (6, 7)]  # the tied middle group forms no pair

    records = group_records(traj, scores, pairs, policy_version=5, actor_id="actor-0", extra={"family": "lcm"})
    decoded = [decode_experience(encode_experience(r)) for r in records]
    assert [r.pairs for r in decoded] == [[(1, 0)], [], [(0, 1)]]
    assert decoded[2].seeds == traj.seeds[6:9] and decoded[0].policy_version == 5
    assert torch.equal(decoded[1].states, traj.states[3:6])

    torch.manual_seed(0)
    for p in policy.trainable_parameters():  # away from the reference, so the loss is not just log 2
        p.data.add_(torch.randn_like(p) * 0.05)
    direct = PairBatch.from_trajectories(traj, pairs, policy.encode(prompts))
    from_records = pair_batch_from_records(policy, decoded)
    with torch.no_grad():
        a = compute_loss(policy, OnlinePSOLoss(), direct, torch.Generator())
        b = compute_loss(policy, OnlinePSOLoss(), from_records, torch.Generator())
    torch.testing.assert_close(a.loss, b.loss)
    assert abs(a.loss.item() - math.log(2)) > 1e-4


def test_records_from_another_schedule_are_refused(make_policy):
    four, two = make_policy("lcm", "sd-lcm"), make_policy("lcm", "sd-lcm", num_steps=2)
    traj = sample_groups(two, ["a red circle"], group_size=2, seed=0, decode=False)
    records = group_records(traj, torch.tensor([1.0, 0.0]), [(0, 1)], policy_version=0, actor_id="a")
    with pytest.raises(ValueError, match="sampled at timesteps \\[999.0, 499.0\\]"):
        pair_batch_from_records(four, records)
    with pytest.raises(ValueError, match="do not join two samples of one prompt group"):
        PairBatch.from_trajectories(traj, [(0, 2)], two.encode(["a red circle"]))
    with pytest.raises(ValueError, match="no pairs"):
        PairBatch.from_trajectories(traj, [], two.encode(["a red circle"]))
