"""The tiny world's data and its rewards: real data scores high, degenerate images low."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pso.tiny.rewards import REWARDS, crispness, fidelity, large
from pso.tiny.world import BORDER, COLOURS, all_scenes, draw_batch, parse_prompt, random_scenes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    scenes = random_scenes(rng, 256)
    return draw_batch(scenes, rng), [s.prompt for s in scenes]


def gaussian_blur(x, sigma):
    k = torch.exp(-(torch.arange(-3, 4).float() ** 2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(3, 1, 7, 1), groups=3)


def test_prompts_parse_and_bad_ones_say_why():
    assert parse_prompt("a red circle on a blue background").shape == "circle"
    assert len(all_scenes()) == 8 * 7 * 3
    for bad in ["a red circle", "a red circle on a red background", "a pink circle on a blue background"]:
        with pytest.raises(ValueError, match="not a tiny-world prompt"):
            parse_prompt(bad)


def test_drawn_images_show_exactly_the_prompt(data):
    images, prompts = data
    for img, prompt in zip(images[:32], prompts[:32]):
        scene = parse_prompt(prompt)
        fg, bg = (torch.tensor(COLOURS[c]).float().view(3, 1, 1) / 255 for c in (scene.fg, scene.bg))
        is_fg, is_bg = (img - fg).abs().sum(0) < 1e-6, (img - bg).abs().sum(0) < 1e-6
        assert bool((is_fg | is_bg).all())
        assert bool(is_bg[:BORDER].all() and is_bg[-BORDER:].all() and is_bg[:, :BORDER].all())
        assert int(is_fg.sum()) >= 50


def test_drawing_is_seeded():
    a = draw_batch(random_scenes(np.random.default_rng(5), 8), np.random.default_rng(6))
    b = draw_batch(random_scenes(np.random.default_rng(5), 8), np.random.default_rng(6))
    assert torch.equal(a, b)


def test_rewards_rank_data_above_degenerate_images(data):
    images, prompts = data
    degenerate = {
        "noise": torch.rand_like(images),
        "blur": gaussian_blur(images, 1.0),
        "flat": images[:, :, :1, :1].expand_as(images).clone(),
        "grey": torch.full_like(images, 0.5),
        "shifted prompt": images,  # right images, prompts of other images
    }
    fid = fidelity(images, prompts)
    assert fid.mean() > 0.95 and (fid > 0.5).all()
    for name, bad in degenerate.items():
        bad_prompts = prompts[1:] + prompts[:1] if name == "shifted prompt" else prompts
        assert fidelity(bad, bad_prompts).mean() < 0.5 * fid.mean(), name
        assert large(bad, bad_prompts).mean() < 0.6 * large(images, prompts).mean(), name
    assert crispness(images).min() == 1.0
    assert crispness(degenerate["noise"]).mean() < 0.2 and crispness(degenerate["blur"]).mean() < 0.95


def test_large_prefers_bigger_shapes():
    rng = np.random.default_rng(1)
    from pso.tiny.world import draw

    scene = parse_prompt("a yellow square on a purple background")
    small, big = (torch.from_numpy(draw(scene, rng, half=h)).permute(2, 0, 1)[None].float() / 255 for h in (5, 10))
    assert large(big, [scene.prompt]) > 2 * large(small, [scene.prompt])
    assert fidelity(big, [scene.prompt]) > 0.9 and fidelity(small, [scene.prompt]) > 0.9


def test_rewards_refuse_bad_input(data):
    images, prompts = data
    with pytest.raises(ValueError, match="got 1 prompts for 256 images"):
        fidelity(images, prompts[:1])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        large(images[:, :1], prompts)
    assert set(REWARDS) == {
        "fidelity",
        "large",
        "crispness",
        "sepia",
        "style_fidelity",
        "style_crispness",
        "subject",
    }
