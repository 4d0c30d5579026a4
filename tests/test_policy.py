"""The policy/reference pair: log-ratios, LoRA and full fine-tuning, weight export, losses on a model."""

import math

import pytest
import torch
from diffusers import DiffusionPipeline

from pso.codecs import decode_weights, encode_weights
from pso.config.schema import (
    DiffusionDPOLoss,
    OfflinePSOLoss,
    OnlinePSOLoss,
    SFTLoss,
    TargetVsReferenceLoss,
)
from pso.objectives import PairBatch, compute_loss
from pso.sampling import sample_groups

PROMPTS = ["a red circle on a blue background", "a yellow triangle"]


def perturb_trainable(policy, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def unet_probe(policy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    step = torch.tensor([0, 1])
    return x, step, policy.encode(PROMPTS)


def online_batch(policy, seed=0):
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=seed, decode=False)
    cond = policy.encode(PROMPTS)
    return traj, PairBatch.from_trajectories(traj, [(0, 1), (3, 2)], cond)


def test_log_ratios_are_zero_and_loss_is_log2_at_initialisation(make_policy):
    policy = make_policy("lcm", "sd-lcm")
    traj, batch = online_batch(policy)
    x, x_next = traj.states[:, 0], traj.states[:, 1]
    step = torch.zeros(len(x), dtype=torch.long)
    cond = policy.encode(PROMPTS).index(torch.tensor([0, 0, 1, 1]))
    assert torch.equal(policy.transition_log_ratio(x, x_next, step, cond), torch.zeros(4))
    out = compute_loss(policy, OnlinePSOLoss(), batch, torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["margin"] == 0.0


def test_online_gradient_raises_winner_likelihood_relative_to_loser(make_policy):
    policy = make_policy("sdxl-turbo", "sdxl", num_steps=4)
    traj, batch = online_batch(policy)
    cfg = OnlinePSOLoss(beta=50.0, clip_eps=0.1)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-5)
    out = compute_loss(policy, cfg, batch, torch.Generator())
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    opt.step()
    with torch.no_grad():
        after = compute_loss(policy, cfg, batch, torch.Generator())
    assert after.metrics["margin"] > 0
    assert after.loss.item() < math.log(2)


@pytest.mark.parametrize(
    "family,model,overrides",
    [
        ("lcm", "sd-lcm", {}),
        ("tcd", "sdxl", {"eta": 0.5}),
        ("hyper-sd", "sd", {"eta": 0.7}),
        ("sdxl-turbo", "sdxl", {}),
    ],
)
def test_log_ratio_is_the_gaussian_log_likelihood_ratio(make_policy, family, model, overrides):
    policy = make_policy(family, model, num_steps=4, **overrides)
    perturb_trainable(policy, scale=0.02)
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=2, decode=False)
    step = torch.tensor([0, 1, 2, 1])
    x, x_next = traj.states[torch.arange(4), step], traj.states[torch.arange(4), step + 1]
    cond = policy.encode(PROMPTS).index(torch.tensor([0, 0, 1, 1]))
    with torch.no_grad():
        mean = policy.sampler.step(x, policy.predict(x, step, cond), step).mean
        mean_ref = policy.sampler.step(x, policy.predict(x, step, cond, reference=True), step).mean
        got_sum = policy.transition_log_ratio(x, x_next, step, cond, reduction="sum")
        got_mean = policy.transition_log_ratio(x, x_next, step, cond, reduction="mean")
    std = policy.sampler.stds[step].view(-1, 1, 1, 1).double()
    logp = torch.distributions.Normal(mean.double(), std).log_prob(x_next.double()).sum((1, 2, 3))
    logp_ref = torch.distributions.Normal(mean_ref.double(), std).log_prob(x_next.double()).sum((1, 2, 3))
    torch.testing.assert_close(got_sum.double(), logp - logp_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_mean * x[0].numel(), got_sum, rtol=1e-4, atol=1e-4)
    assert got_sum.abs().max() > 1e-3  # the perturbation moved the policy away from the reference


def grad_norm(policy, batch):
    policy.backbone.zero_grad()
    compute_loss(policy, OnlinePSOLoss(), batch, torch.Generator()).loss.backward()
    return float(torch.stack([p.grad.norm() for p in policy.trainable_parameters() if p.grad is not None]).norm())


def test_a_tie_gives_no_gradient(make_policy):
    """Tied scores form no pair (test_pairing); a pair of one trajectory with itself has a margin of
    exactly zero, so only float noise from the batched UNet remains in its gradient."""
    policy = make_policy("lcm", "sd-lcm")
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=0, decode=False)
    cond = policy.encode(PROMPTS)
    perturb_trainable(policy)  # away from the reference, so log-ratios are not all zero
    real = grad_norm(policy, PairBatch.from_trajectories(traj, [(0, 1)], cond))
    tie = grad_norm(policy, PairBatch.from_trajectories(traj, [(0, 0)], cond))
    assert tie < 1e-3 * real


def test_one_step_and_deterministic_samplers_are_refused_by_the_online_loss(make_policy):
    one_step = make_policy("sd-turbo", "sd", num_steps=1)
    _, batch = online_batch(one_step)
    with pytest.raises(ValueError, match="no stochastic transition.*offline-pso"):
        compute_loss(one_step, OnlinePSOLoss(), batch, torch.Generator())
    euler = make_policy("sd-turbo", "sd", num_steps=4)
    _, batch = online_batch(euler)
    with pytest.raises(ValueError, match="deterministic under sampler 'euler'"):
        compute_loss(euler, OnlinePSOLoss(), batch, torch.Generator())


@pytest.mark.parametrize("cfg", [OfflinePSOLoss(), DiffusionDPOLoss(), TargetVsReferenceLoss()], ids=lambda c: c.name)
def test_pairwise_forms_start_at_log2(make_policy, cfg):
    policy = make_policy("lcm", "sd-lcm")
    _, batch = online_batch(policy)
    out = compute_loss(policy, cfg, batch, torch.Generator().manual_seed(1))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_offline_gradient_favours_the_winner(make_policy):
    policy = make_policy("sdxl-dmd2", "sdxl", num_steps=1)
    _, batch = online_batch(policy)
    cfg = OfflinePSOLoss(beta=5000.0)
    compute_loss(policy, cfg, batch, torch.Generator().manual_seed(3)).loss.backward()
    torch.optim.SGD(policy.trainable_parameters(), lr=1e-6).step()
    with torch.no_grad():
        after = compute_loss(policy, cfg, batch, torch.Generator().manual_seed(3))
    assert after.metrics["margin"] > 0 and after.loss.item() < math.log(2)


def test_sft_matches_the_plain_diffusion_loss(make_policy):
    policy = make_policy("lcm", "sd-lcm")
    traj, batch = online_batch(policy)
    gen = torch.Generator().manual_seed(5)
    out = compute_loss(policy, SFTLoss(), batch, gen)
    # redo by hand: same draws from the same generator seed
    gen = torch.Generator().manual_seed(5)
    ts = policy.sampler.timesteps.long()
    t = ts[torch.randint(len(ts), (2,), generator=gen)]
    noise = torch.randn(batch.winner_states[:, -1].shape, generator=gen)
    abar = policy.sampler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = batch.winner_states[:, -1]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        pred = policy.backbone(
            x_t,
            t,
            encoder_hidden_states=batch.cond.batched["encoder_hidden_states"],
            timestep_cond=batch.cond.batched["timestep_cond"],
        ).sample
    assert out.loss.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)


def test_lora_disabled_is_exactly_the_base_model(make_policy, tiny_models):
    policy = make_policy("sdxl-turbo", "sdxl", num_steps=4)
    base = DiffusionPipeline.from_pretrained(str(tiny_models["sdxl"]), local_files_only=True)
    x, step, cond = unet_probe(policy)
    perturb_trainable(policy)
    t = policy.sampler.timesteps[step]
    model_in = policy.sampler.model_input(x, step)
    with torch.no_grad():
        expected = base.unet(model_in, t, **cond.batched).sample
        trained = policy.predict(x, step, cond)
    assert torch.equal(policy.predict(x, step, cond, reference=True), expected)
    assert not torch.allclose(trained, expected)  # the adapters do change the policy


def test_lora_export_and_load_round_trip_bit_exactly(make_policy):
    source, target = make_policy("lcm", "sd-lcm"), make_policy("lcm", "sd-lcm")
    perturb_trainable(source, seed=4)
    data = encode_weights(source.export_weights(version=3))
    bundle = decode_weights(data, expected=target.weight_spec())
    assert bundle.version == 3 and bundle.kind == "lora"
    assert all("lora_" in name for name in bundle.tensors)
    target.load_weights(bundle)
    for name, tensor in source.trainable_state_dict().items():
        assert torch.equal(target.trainable_state_dict()[name], tensor)
    x, step, cond = unet_probe(source)
    with torch.no_grad():
        assert torch.equal(source.predict(x, step, cond), target.predict(x, step, cond))


def test_loading_weights_of_another_shape_is_refused(make_policy):
    policy = make_policy("lcm", "sd-lcm")
    tensors = policy.trainable_state_dict()
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"{name}: got torch.float32 \\(3, 3\\)"):
        policy.load_trainable_state_dict(tensors)
    with pytest.raises(ValueError, match="missing"):
        policy.load_trainable_state_dict({})


def test_full_finetune_keeps_the_reference_frozen(make_policy):
    policy = make_policy("lcm", "sd-lcm", mode="full")
    reference_before = {n: p.clone() for n, p in policy._reference_backbone.named_parameters()}
    assert not any(p.requires_grad for p in policy._reference_backbone.parameters())
    assert len(policy.trainable_parameters()) == len(list(policy.backbone.parameters()))
    _, batch = online_batch(policy)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-2)
    compute_loss(policy, OfflinePSOLoss(), batch, torch.Generator().manual_seed(0)).loss.backward()
    opt.step()
    for name, p in policy._reference_backbone.named_parameters():
        assert torch.equal(p, reference_before[name]), name
    x, step, cond = unet_probe(policy)
    with torch.no_grad():
        assert not torch.equal(policy.predict(x, step, cond), policy.predict(x, step, cond, reference=True))
    bundle = decode_weights(encode_weights(policy.export_weights(1)), expected=policy.weight_spec())
    assert bundle.kind == "full" and len(bundle.tensors) == len(policy.trainable_parameters())
