"""Every supported family recipe: exact timesteps, and trajectories that reproduce the pipeline."""

import pytest
import torch

from pso.config.schema import ModelConfig
from pso.families import FAMILIES, UnsupportedFamilyError, get_family
from pso.sampling import sample_groups

PROMPTS = ["a red circle on a blue background", "a green square"]

# (family, tiny model, steps, overrides) -> timesteps from the family table in docs/families.md
CASES = [
    ("sd-turbo", "sd", 1, {}, [999]),
    ("sd-turbo", "sd", 4, {}, [999, 749, 499, 249]),
    ("sd-turbo", "sd", 4, {"sampler": "euler_ancestral"}, [999, 749, 499, 249]),
    ("sdxl-turbo", "sdxl", 1, {}, [999]),
    ("sdxl-turbo", "sdxl", 4, {}, [999, 749, 499, 249]),
    ("lcm", "sd-lcm", 4, {}, [999, 759, 499, 259]),
    ("lcm-lora", "sd", 4, {}, [999, 759, 499, 259]),
    ("lcm-lora", "sd", 4, {"guidance_scale": 1.5}, [999, 759, 499, 259]),
    ("tcd", "sd", 4, {}, [999, 759, 499, 259]),
    ("tcd", "sdxl", 4, {"eta": 1.0}, [999, 759, 499, 259]),
    ("sdxl-dmd2", "sdxl", 4, {}, [999, 749, 499, 249]),
    ("sdxl-dmd2", "sdxl", 1, {}, [399]),
    ("sdxl-lightning", "sdxl", 2, {}, [999, 499]),
    ("sdxl-lightning", "sdxl", 4, {}, [999, 749, 499, 249]),
    ("sdxl-lightning", "sdxl", 1, {}, [999]),
    ("hyper-sd", "sd", 4, {}, [999, 749, 499, 249]),
    ("hyper-sd", "sd", 4, {"eta": 0.5}, [999, 749, 499, 249]),
    ("hyper-sd-1step", "sdxl", 1, {}, [800]),
    ("tiny", "sd", 1, {}, [999]),
    ("tiny", "sd", 2, {}, [999, 499]),
    ("tiny", "sd", 4, {}, [999, 749, 499, 249]),
]


def test_every_family_has_a_case():
    from tests.test_flow_families import FLOW_CASES

    assert {c[0] for c in CASES} | {c.family for c in FLOW_CASES} == set(FAMILIES)


@pytest.mark.parametrize(
    "family,model,steps,overrides,expected",
    CASES,
    ids=[f"{c[0]}-{c[2]}step-{'-'.join(map(str, c[3].values())) or 'default'}" for c in CASES],
)
def test_trajectory_reproduces_pipeline(make_policy, family, model, steps, overrides, expected):
    policy = make_policy(family, model, num_steps=steps, **overrides)
    traj = sample_groups(policy, PROMPTS, group_size=3, seed=7, batch_size=6)  # one UNet batch, as the pipeline

    assert traj.timesteps.round().long().tolist() == expected
    b, n = len(PROMPTS) * 3, len(expected)
    assert traj.states.shape == (b, n + 1, *policy.latent_shape)
    assert traj.means.shape == (b, n, *policy.latent_shape)
    assert traj.images.shape == (b, 3, policy.image_size, policy.image_size)
    assert len(set(traj.seeds)) == b

    recipe = get_family(family)
    gens = [torch.Generator().manual_seed(s) for s in traj.seeds]
    custom = recipe.custom_timesteps.get(steps)
    reference = policy.pipe(
        PROMPTS,
        num_images_per_prompt=3,
        generator=gens,
        output_type="latent",
        guidance_scale=policy.guidance_scale,
        eta=policy.sampler.eta,
        **({"timesteps": list(custom)} if custom else {"num_inference_steps": steps}),
    ).images
    torch.testing.assert_close(traj.latents, reference, rtol=1e-5, atol=1e-5)
    # the group members start from independent noise and differ
    assert not torch.allclose(traj.states[0, 0], traj.states[1, 0])


def test_sampling_is_seeded_and_independent_of_batching(make_policy):
    policy = make_policy("lcm", "sd-lcm")
    a = sample_groups(policy, PROMPTS, group_size=2, seed=3, batch_size=1, decode=False)
    b = sample_groups(policy, PROMPTS, group_size=2, seed=3, batch_size=4, decode=False)
    again = sample_groups(policy, PROMPTS, group_size=2, seed=3, batch_size=4, decode=False)
    other = sample_groups(policy, PROMPTS, group_size=2, seed=4, batch_size=4, decode=False)
    assert torch.equal(b.states, again.states)
    # batch size only changes float rounding inside the UNet (which a random tiny net amplifies a little)
    torch.testing.assert_close(a.states, b.states, rtol=1e-3, atol=1e-2)
    assert (a.states - other.states).abs().amax() > 1.0


def test_means_recomputed_at_mixed_steps_equal_the_recorded_ones(make_policy):
    """The learner evaluates transitions from different steps of different trajectories in one batch."""
    policy = make_policy("tcd", "sdxl", eta=0.5)
    traj = sample_groups(policy, PROMPTS, group_size=2, seed=0, decode=False, batch_size=4)
    step = torch.tensor([0, 1, 2, 3])
    x = traj.states[torch.arange(4), step]
    cond = policy.encode(PROMPTS).index(torch.tensor([0, 0, 1, 1]))
    with torch.no_grad():
        mean = policy.sampler.step(x, policy.predict(x, step, cond), step).mean
    torch.testing.assert_close(mean, traj.means[torch.arange(4), step], rtol=1e-4, atol=1e-4)
    assert traj.stds[-1] == 0 and bool((traj.stds[:-1] > 0).all())


def test_unknown_families_are_refused():
    with pytest.raises(UnsupportedFamilyError, match="unknown model family 'sd-9'.*supported families: sd-turbo"):
        get_family("sd-9")
    with pytest.raises(ValueError, match="unknown model family 'sd-9'.*supported families: sd-turbo"):
        ModelConfig(family="sd-9")


def test_sampler_overrides_must_keep_the_family_timesteps(make_policy):
    with pytest.raises(ValueError, match="own timestep grid .* only the lcm sampler"):
        make_policy("sdxl-dmd2", "sdxl", sampler="euler_ancestral")
    with pytest.raises(ValueError, match="not the family's \\[999, 759, 499, 259\\]"):
        make_policy("lcm", "sd-lcm", sampler="euler_ancestral")
    assert make_policy("sd-turbo", "sd", num_steps=4, sampler="ddim").sampler.kind == "ddim"


def test_unknown_or_missing_devices_are_clear_errors(make_policy):
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        make_policy("sd-turbo", "sd", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            make_policy("sd-turbo", "sd", device="cuda")


def test_wrong_step_count_and_architecture_are_refused(make_policy):
    with pytest.raises(ValueError, match="distilled for \\[1, 4\\] steps, not 2"):
        make_policy("sdxl-dmd2", "sdxl", num_steps=2)
    with pytest.raises(ValueError, match="expects a sdxl pipeline"):
        make_policy("sdxl-turbo", "sd")
