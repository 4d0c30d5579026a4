"""Every flow-matching family on its tiny random pipeline (`pso tiny random --arch`): the sampler reproduces the
family's own pipeline at noise level 0 and is the stated Gaussian above it; every loss trains; the learner
engine updates, the weights travel as a bundle and reload in an actor's policy, and the exported LoRA loads in
the family's pipeline (issue 14)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import: these tests run on CPU

from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from learner.engine import LearnerEngine  # noqa: E402
from pso.codecs import decode_weights, encode_weights  # noqa: E402
from pso.config.schema import (  # noqa: E402
    DiffusionDPOLoss,
    LoraFinetune,
    ModelConfig,
    OfflinePSOLoss,
    OnlinePSOLoss,
    OptimConfig,
    PSOConfig,
    SFTLoss,
)
from pso.config.services import LearnerConfig  # noqa: E402
from pso.export import DIFFUSERS_FILE, KOHYA_FILE, export_policy  # noqa: E402
from pso.families import get_family  # noqa: E402
from pso.objectives import PairBatch, compute_loss  # noqa: E402
from pso.policy import DistilledPolicy  # noqa: E402
from pso.samplers import FlowEulerSampler  # noqa: E402
from pso.sampling import sample_groups  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a green square"]
SIZE = 32  # the tiny pipelines' image side


@dataclass(frozen=True)
class FlowCase:
    family: str
    arch: str  # `pso tiny random --arch`
    steps: tuple[int, ...]  # step counts checked against the pipeline
    pipe_kwargs: dict = field(default_factory=dict)  # what the pipeline's __call__ needs for the family's recipe
    step_kwargs: dict = field(default_factory=dict)  # step count -> further __call__ kwargs at that count
    # call with each prompt repeated instead of num_images_per_prompt=2: the SANA-Sprint and Qwen-Image pipelines'
    # encode_prompt interleaves the prompt embeddings (p0 p0 p1 p1) but tiles their attention masks (p0 p1 p0 p1)
    repeat_prompts: bool = False

    def __str__(self):
        return self.family


FLOW_CASES = [
    FlowCase("flux-schnell", "flux", (1, 4), {"guidance_scale": 0.0, "max_sequence_length": 256}),
    FlowCase(
        "sana-sprint",
        "sana",
        (1, 2),
        {"guidance_scale": 4.5, "use_resolution_binning": False},
        step_kwargs={1: {"intermediate_timesteps": None}},  # the default 1.3 is allowed at 2 steps only
        repeat_prompts=True,
    ),
    FlowCase("sd35-turbo", "sd3", (1, 4), {"guidance_scale": 0.0, "max_sequence_length": 256}),
    FlowCase("z-image-turbo", "zimage", (1, 8), {"guidance_scale": 0.0, "max_sequence_length": 512}),
    FlowCase(
        "qwen-image-lightning",
        "qwenimage",
        (4, 8),
        {"true_cfg_scale": 1.0, "max_sequence_length": 512},
        repeat_prompts=True,
    ),
    FlowCase("tiny-flow", "flux", (1, 4), {"guidance_scale": 0.0, "max_sequence_length": 32}),
    FlowCase("flux2-klein", "flux2", (1, 4), {"guidance_scale": 1.0}),
]


def make(tiny_flow_models, case: FlowCase, num_steps: int | None = None, **model_kwargs) -> DistilledPolicy:
    cfg = ModelConfig(
        family=case.family, pretrained=str(tiny_flow_models(case.arch)), resolution=SIZE, num_steps=num_steps,
        **model_kwargs,
    )  # fmt: skip
    return DistilledPolicy.from_config(cfg, LoraFinetune(rank=4))


def training_steps(case: FlowCase) -> int:
    """The family's smallest step count with a stochastic transition before the last."""
    return min(n for n in get_family(case.family).steps if n >= 2)


def pair_batch(policy: DistilledPolicy, seed: int = 0) -> PairBatch:
    traj = sample_groups(policy, PROMPTS, 2, seed=seed, decode=False)
    return PairBatch.from_trajectories(traj, [(0, 1), (3, 2)], policy.encode(PROMPTS))


@pytest.mark.parametrize(
    "case,steps",
    [(c, n) for c in FLOW_CASES for n in c.steps],
    ids=lambda v: str(v) if isinstance(v, FlowCase) else f"{v}step",
)
def test_noise_level_zero_reproduces_the_pipeline(tiny_flow_models, case, steps):
    policy = make(tiny_flow_models, case, steps)
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=7, batch_size=4)
    assert traj.states.shape == (4, steps + 1, *policy.latent_shape)
    # SCM re-noises at any eta, with the pipeline's own draws from the same generators
    assert policy.sampler.kind == "scm" or not bool((traj.stds > 0).any())
    gens = [torch.Generator().manual_seed(s) for s in traj.seeds]
    per_prompt = 1 if case.repeat_prompts else 2
    images = policy.pipe(  # a copy: ZImagePipeline rewrites the prompt list it is given in place
        prompt=[p for p in PROMPTS for _ in range(2 // per_prompt)], num_images_per_prompt=per_prompt,
        generator=gens, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="pt", **case.pipe_kwargs,
        **case.step_kwargs.get(steps, {}),
    ).images  # fmt: skip
    # [:steps]: SCMScheduler's table ends with the final angle 0, which the pipeline's loop skips
    torch.testing.assert_close(policy.pipe.scheduler.timesteps[:steps], traj.timesteps)
    torch.testing.assert_close(traj.images, images, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(traj.images[0], traj.images[1])  # group members start from their own noise


@pytest.mark.parametrize("case", FLOW_CASES, ids=str)
def test_noisy_transitions_are_the_recorded_gaussians(tiny_flow_models, case):
    steps = training_steps(case)
    policy = make(tiny_flow_models, case, steps, eta=0.6)
    assert policy.sampler.stochastic and float(policy.sampler.stds[-1]) == 0
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=0, decode=False)
    step = torch.arange(4) % steps  # transitions from different steps of different trajectories in one batch
    x = traj.states[torch.arange(4), step]
    with torch.no_grad():
        mean = policy.sampler.step(
            x, policy.predict(x, step, policy.encode(PROMPTS).index(torch.tensor([0, 0, 1, 1]))), step
        ).mean
    torch.testing.assert_close(mean, traj.means[torch.arange(4), step], rtol=1e-4, atol=1e-4)


def test_flow_euler_noise_levels_span_the_ode_and_full_renoising():
    """eta 0 is the scheduler's Euler step; eta 1 its `stochastic_sampling` re-noising; any eta keeps the
    marginal: mean and std are those of (1 - s') x0_hat + s' (sqrt(1 - eta^2) eps_hat + eta z)."""
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    step = torch.tensor([0, 1, 2])
    for eta in (0.0, 0.4, 1.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=eta == 1.0)
        sampler = FlowEulerSampler(scheduler, 4, eta=eta)
        out = sampler.step(x, v, step)
        s, s_to = scheduler.sigmas[step].view(-1, 1, 1, 1), scheduler.sigmas[step + 1].view(-1, 1, 1, 1)
        x0, eps = x - s * v, x + (1 - s) * v
        torch.testing.assert_close(out.x0, x0)
        torch.testing.assert_close(out.mean, (1 - s_to) * x0 + s_to * (1 - eta**2) ** 0.5 * eps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std, eta * s_to)
        if eta not in (0.0, 1.0):
            continue
        for k in range(3):  # the scheduler itself, one sample at a time
            scheduler._step_index = None
            scheduler.set_begin_index(k)
            torch.manual_seed(k)
            want = scheduler.step(v[k : k + 1], scheduler.timesteps[k], x[k : k + 1]).prev_sample
            torch.manual_seed(k)
            noise = torch.randn_like(x[k : k + 1]) if eta == 1.0 else 0.0
            torch.testing.assert_close(out.mean[k : k + 1] + out.std[k] * noise, want, rtol=1e-5, atol=1e-5)


def test_scm_sampler_is_the_scheduler_step_in_units_of_sigma_data():
    """SCMSampler's state is the pipeline's latents / sigma_d: its Gaussian, with the scheduler's own noise, is
    SCMScheduler.step (X0 = cos(s) X - sin(s) F, X' = cos(t) X0 + sin(t) sigma_d z) divided by sigma_d; the last
    step lands on X0 / sigma_d without noise; eta changes nothing; forward_noise's target is the velocity that
    the step's x0 formula inverts, at angles drawn in (0, max_timesteps]."""
    from diffusers import SCMScheduler

    from pso.samplers import SCMSampler

    for steps, intermediate in ((1, None), (2, 1.3), (4, None)):
        scheduler = SCMScheduler(sigma_data=0.5)
        schedule = {"max_timesteps": 1.5708, "intermediate_timesteps": intermediate}
        sampler = SCMSampler(scheduler, steps, eta=0.6, schedule=schedule)
        assert len(sampler.timesteps) == steps and sampler.init_noise_sigma == 1.0
        assert float(sampler.stds[-1]) == 0 and sampler.stochastic == (steps > 1)
        x, v, step = torch.randn(steps, 4, 8, 8), torch.randn(steps, 4, 8, 8), torch.arange(steps)
        out = sampler.step(x, v, step)
        torch.testing.assert_close(out.mean[-1], out.x0[-1], rtol=0, atol=0)
        for k in range(steps):  # the scheduler itself, one sample at a time, on the pipeline's latents
            scheduler._step_index = None
            scheduler.set_begin_index(k)
            latents = sampler.model_input(x[k : k + 1], step[k : k + 1])
            gen = torch.Generator().manual_seed(k)
            prev, x0 = scheduler.step(v[k : k + 1], scheduler.timesteps[k], latents, generator=gen, return_dict=False)
            z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(k))
            torch.testing.assert_close(out.x0[k : k + 1] * 0.5, x0)
            torch.testing.assert_close((out.mean[k : k + 1] + out.std[k] * z) * 0.5, prev)
        t = sampler.random_timesteps(64, torch.Generator().manual_seed(0))
        assert bool((t > 0).all() and (t <= sampler.timesteps[0]).all())
        x0, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
        x_t, target = sampler.forward_noise(x0, noise, t)
        cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, 0.5 * (cos * x0 + sin * noise))
        torch.testing.assert_close((cos * x_t - sin * target) / 0.5, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "loss", [OnlinePSOLoss(), OfflinePSOLoss(), SFTLoss(), DiffusionDPOLoss()], ids=lambda x: x.name
)
@pytest.mark.parametrize("case", FLOW_CASES, ids=str)
def test_every_loss_trains_the_adapters(tiny_flow_models, case, loss):
    policy = make(tiny_flow_models, case, training_steps(case), eta=0.6)
    out = compute_loss(policy, loss, pair_batch(policy), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", FLOW_CASES, ids=str)
def test_learner_update_broadcast_reload_and_export(tiny_flow_models, case, tmp_path):
    steps = training_steps(case)
    learner_policy = make(tiny_flow_models, case, steps, eta=0.6)
    engine = LearnerEngine(learner_policy, OnlinePSOLoss(), OptimConfig(lr=1e-2, pairs_per_step=2), LearnerConfig())
    before = learner_policy.trainable_state_dict()
    metrics = engine.update(pair_batch(learner_policy), gen=torch.Generator().manual_seed(0))
    assert metrics["loss"] > 0
    bundle = engine.export_weights(1)
    assert any(not torch.equal(bundle.tensors[k], before[k]) for k in before)

    # the broadcast: bytes on the wire, checked against the actor's own model, loaded into its policy
    actor_policy = make(tiny_flow_models, case, steps, eta=0.6)
    actor_policy.load_weights(decode_weights(encode_weights(bundle), actor_policy.weight_spec()))
    x = torch.randn(2, *actor_policy.latent_shape)
    step, cond = torch.tensor([0, 1]), actor_policy.encode(PROMPTS)
    with torch.no_grad():
        tuned = actor_policy.predict(x, step, cond)
        torch.testing.assert_close(tuned, learner_policy.predict(x, step, cond), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tuned, actor_policy.predict(x, step, cond, reference=True))

    # the export, loaded by the family's own pipeline class
    cfg = PSOConfig(model=actor_policy.model_cfg, finetune=actor_policy.finetune)
    path = export_policy(actor_policy, 1, cfg, tmp_path / "lora")
    assert path.name == DIFFUSERS_FILE
    pipe = DiffusionPipeline.from_pretrained(str(tiny_flow_models(case.arch)), local_files_only=True)
    pipe.load_lora_weights(str(path.parent))
    plain = DistilledPolicy(type(actor_policy.denoiser)(pipe), actor_policy.sampler, actor_policy.model_cfg, None)
    with torch.no_grad():
        torch.testing.assert_close(plain.predict(x, step, cond), tuned, rtol=1e-4, atol=1e-5)
    kohya = load_file(export_policy(actor_policy, 1, cfg, tmp_path / "kohya", "kohya"))
    assert kohya and all(k.startswith("lora_transformer_") for k in kohya)
    assert (tmp_path / "kohya" / KOHYA_FILE).is_file()
