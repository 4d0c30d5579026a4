"""Data and measures for the tasks beyond the base tiny world (pso/tiny/tasks.py): style, subject, offline."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

from pso.config.schema import ModelConfig
from pso.evaluation import score_model
from pso.policy import DistilledPolicy
from pso.tiny.rewards import (
    FILL_RATIO,
    FILL_TEMPERATURE,
    MIN_SHAPE_PIXELS,
    SHAPE_CLASSES,
    crispness,
    fidelity,
    large,
    sepia,
    shape_probs,
    style_crispness,
    style_fidelity,
    subject,
)
from pso.tiny.tasks import (
    PREFERENCE_COLUMNS,
    SUBJECT_COLOURS,
    build_task_data,
    decode,
    preference_pairs,
    read_imagefolder,
    style_targets,
    subject_class_prompts,
    subject_eval_prompts,
    subject_targets,
    write_imagefolder,
    write_preference_parquet,
)
from pso.tiny.world import (
    BORDER,
    COLOURS,
    CROSS_MIN_HALF,
    IDENTIFIER,
    MAX_HALF,
    MIN_HALF,
    NEW_SHAPE,
    SEPIA,
    SEPIA_MIX,
    SHAPES,
    Scene,
    all_scenes,
    draw,
    in_sepia,
    parse_any_prompt,
    random_scenes,
    shape_mask,
)

ASSETS = "pso/tiny/assets"


def gaussian_blur(x, sigma):
    k = torch.exp(-(torch.arange(-3, 4).float() ** 2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(3, 1, 7, 1), groups=3)


def to_batch(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def scenes():
    return random_scenes(np.random.default_rng(0), 192)


def fg_masks(images, scenes):
    fg = torch.tensor([COLOURS[s.fg] for s in scenes]).float()[:, :, None, None] / 255
    return (images - fg).abs().sum(1) < 1e-6


def drawn(scenes, style="filled", shape=None, seed=1):
    rng = np.random.default_rng(seed)
    return to_batch([draw(Scene(s.fg, shape or s.shape, s.bg), rng, style=style) for s in scenes])


# ----- the base world is unchanged -----


def reference_fidelity(images, prompts):
    """pso.tiny.rewards.fidelity as shipped before the tasks (its fill-ratio shape decision spelt out)."""
    from pso.tiny.world import parse_prompt

    scenes = [parse_prompt(p) for p in prompts]
    fg = torch.tensor([COLOURS[s.fg] for s in scenes]).float() / 255
    bg = torch.tensor([COLOURS[s.bg] for s in scenes]).float() / 255
    is_fg = (images - fg[:, :, None, None]).norm(dim=1) < 0.15
    is_bg = (images - bg[:, :, None, None]).norm(dim=1) < 0.15
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = (is_bg & ring).flatten(1).sum(1) / ring.sum()
    area = is_fg.flatten(1).sum(1).float()
    clean = (is_fg | is_bg).flatten(1).float().mean(1)
    shape = torch.zeros(len(images))
    ratios = torch.tensor(list(FILL_RATIO.values()))
    for i in range(len(images)):
        ys, xs = torch.nonzero(is_fg[i], as_tuple=True)
        if len(ys) >= MIN_SHAPE_PIXELS:
            fill = area[i] / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            probs = torch.softmax(-((fill - ratios) ** 2) / FILL_TEMPERATURE, 0)
            shape[i] = probs[list(FILL_RATIO).index(scenes[i].shape)]
    return border * (area / MIN_SHAPE_PIXELS).clamp(max=1) * shape * clean**4, is_fg


def test_base_world_and_its_rewards_are_unchanged(scenes):
    images = drawn(scenes)
    prompts = [s.prompt for s in scenes]
    assert len(all_scenes()) == 8 * 7 * 3 and SHAPES == ("circle", "square", "triangle")
    rng = np.random.default_rng(3)
    a = draw(scenes[0], rng)
    assert np.array_equal(a, draw(scenes[0], np.random.default_rng(3), style="filled"))
    for batch in (images, gaussian_blur(images, 1.0), torch.rand_like(images)):
        ref, _ = reference_fidelity(batch, prompts)
        assert torch.equal(fidelity(batch, prompts), ref)
    assert fidelity(images, prompts).min() > 0.99 and crispness(images).min() == 1.0
    # style_fidelity is fidelity on plain drawings
    assert torch.equal(style_fidelity(images, prompts), fidelity(images, prompts))
    assert torch.equal(style_fidelity(images, prompts), reference_fidelity(images, prompts)[0])


# ----- style -----


def test_sepia_is_the_filled_scene_tinted_toward_its_brown(scenes):
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    for scene in scenes[:16]:  # the same layout as the plain drawing, every colour mixed toward SEPIA
        plain, toned = draw(scene, rng_a), draw(scene, rng_b, style="sepia")
        expected = np.rint((1 - SEPIA_MIX) * plain + SEPIA_MIX * np.array(SEPIA))
        assert np.array_equal(toned, expected.astype(np.uint8)) and np.array_equal(in_sepia(plain), toned)
    with pytest.raises(ValueError, match="unknown style"):
        draw(scenes[0], rng_a, style="twin")


def test_sepia_measure_reads_the_tint_and_nothing_else(scenes):
    prompts = [s.prompt for s in scenes]
    plain, toned = drawn(scenes), drawn(scenes, style="sepia")
    assert sepia(toned, prompts).min() > 0.99 and sepia(plain, prompts).max() == 0.0
    half = (plain + toned) / 2  # halfway to the style (SEPIA_MIX / 2 of the way to the brown)
    assert sepia(half, prompts).mean() == pytest.approx(0.5, abs=0.02)
    brown = torch.tensor(SEPIA).float()[None, :, None, None].expand_as(plain) / 255
    assert sepia(brown, prompts).max() == 0.0  # a flat brown image has no scene
    assert sepia(torch.rand_like(plain), prompts).max() < 0.05
    assert sepia(toned, prompts[1:] + prompts[:1]).mean() < 0.3  # other scenes' colours


def test_style_aware_fidelity_and_crispness(scenes):
    """style_fidelity and style_crispness read a prompt colour anywhere between plain and sepia: equal to
    fidelity and crispness on plain scenes, 1 on sepia ones, and failing blur, noise and wrong prompts."""
    prompts = [s.prompt for s in scenes]
    plain, toned = drawn(scenes), drawn(scenes, style="sepia")
    assert torch.equal(style_fidelity(plain, prompts), fidelity(plain, prompts))
    assert fidelity(toned, prompts).max() < 0.01 and crispness(toned).mean() < 0.3  # plain measures miss the style
    assert style_fidelity(toned, prompts).min() > 0.99 and style_crispness(toned).min() == 1.0
    assert style_crispness(plain).min() == 1.0
    shifted = prompts[1:] + prompts[:1]  # other scenes' colours and shapes
    assert style_fidelity(toned, shifted).mean() < 0.3
    wrong_shape = [Scene(s.fg, SHAPES[(SHAPES.index(s.shape) + 1) % 3], s.bg).prompt for s in scenes]
    assert style_fidelity(toned, wrong_shape).mean() < 0.2
    # blur fails it in either palette alike; softer than fidelity (0.43 at sigma 1), as its colour test is wider
    blurred_toned, blurred_plain = (style_fidelity(gaussian_blur(x, 1.0), prompts).mean() for x in (toned, plain))
    assert blurred_toned < 0.7 and abs(blurred_toned - blurred_plain) < 0.05
    noise = torch.rand_like(toned)
    assert style_fidelity(noise, prompts).max() < 0.01 and style_crispness(noise).mean() < 0.5


def test_style_targets():
    items = style_targets(48, seed=0)
    assert len(items) == 48 and len({c for c, _ in items}) > 30
    images = to_batch([im for _, im in items])
    captions = [c for c, _ in items]
    assert all(im.dtype == np.uint8 and im.shape == (32, 32, 3) for _, im in items)
    assert all(parse_any_prompt(c).shape in SHAPES for c in captions)  # ordinary captions
    assert sepia(images, captions).min() > 0.99 and style_fidelity(images, captions).min() > 0.99


# ----- subject -----


def test_new_shape_is_told_apart_and_old_shapes_keep_their_scores(scenes):
    assert NEW_SHAPE not in SHAPES and SHAPE_CLASSES == ("square", "circle", "triangle", NEW_SHAPE)
    masks = [shape_mask(sh, 15, 16, h) for sh in SHAPES for h in range(MIN_HALF, MAX_HALF + 1)]
    masks += [shape_mask(NEW_SHAPE, 15, 16, h) for h in range(CROSS_MIN_HALF, MAX_HALF + 1)]  # drawn sizes
    probs = shape_probs(torch.from_numpy(np.stack(masks)))
    n = MAX_HALF - MIN_HALF + 1
    assert torch.equal(probs[3 * n :, 3], torch.ones(MAX_HALF - CROSS_MIN_HALF + 1))  # every drawn cross is one
    assert probs[: 3 * n, 3].max() == 0.0  # no old shape is
    for k, shape in enumerate(SHAPES):
        assert probs[k * n : (k + 1) * n].argmax(1).tolist() == [SHAPE_CLASSES.index(shape)] * n
    # the old shapes' scores are exactly fidelity's shape decision on data
    images = drawn(scenes)
    prompts = [s.prompt for s in scenes]
    _, is_fg = reference_fidelity(images, prompts)
    old = shape_probs(is_fg)
    assert old[:, 3].max() == 0.0
    ref = fidelity(images, prompts)  # shape term is the only one below 1 on data
    asked = old[torch.arange(len(scenes)), [SHAPE_CLASSES.index(s.shape) for s in scenes]]
    assert torch.equal(asked, ref)
    # fill ratio alone would call a cross an old shape (mostly a triangle); the subject measure does not
    crosses = drawn(scenes, shape=NEW_SHAPE)
    as_triangle = [Scene(s.fg, "triangle", s.bg).prompt for s in scenes]
    as_old = torch.stack([fidelity(crosses, [Scene(s.fg, sh, s.bg).prompt for s in scenes]) for sh in SHAPES])
    assert as_old.max(0).values.min() > 0.7 and fidelity(crosses, as_triangle).mean() > 0.7
    ident = [f"a {s.fg} {IDENTIFIER} on a {s.bg} background" for s in scenes]
    assert subject(crosses, ident).min() == 1.0
    assert subject(images, prompts).max() == 0.0 and subject(drawn(scenes, style="sepia"), prompts).max() == 0.0
    assert subject(crosses, prompts[1:] + prompts[:1]).mean() < 0.3  # wrong colours
    blurred = subject(gaussian_blur(crosses, 1.0), ident)
    # softer on blur than fidelity by design (clean^0.5 and nearest-colour shape: the VAE's edges must pass)
    assert blurred.max() < 1.0 and blurred.mean() > fidelity(gaussian_blur(crosses, 1.0), as_triangle).mean()
    assert subject(torch.rand_like(crosses), ident).max() < 0.05


def test_subject_targets_and_eval_prompts():
    items = subject_targets(8, seed=0)
    assert len(items) == 8
    with pytest.raises(ValueError, match="from 1 to 8 images"):
        subject_targets(9)
    captions = [c for c, _ in items]
    train_pairs = {(parse_any_prompt(c).fg, parse_any_prompt(c).bg) for c in captions}
    assert train_pairs == set(SUBJECT_COLOURS) and all(f" {IDENTIFIER} " in c for c in captions)
    assert subject(to_batch([im for _, im in items]), captions).min() == 1.0
    ev = subject_eval_prompts(64, seed=0)
    assert len(ev["subject"]) == 64 and len(ev["ordinary"]) == 64
    for p in ev["subject"]:
        s = parse_any_prompt(p)
        assert f" {IDENTIFIER} " in p and s.shape == NEW_SHAPE and (s.fg, s.bg) not in train_pairs
    assert len({p for p in ev["subject"]}) == 8 * 7 - len(SUBJECT_COLOURS)  # every unseen pair
    assert all(IDENTIFIER not in p and parse_any_prompt(p).shape in SHAPES for p in ev["ordinary"])
    assert ev["ordinary"][:9] == subject_class_prompts()
    assert {(parse_any_prompt(p).fg, parse_any_prompt(p).bg) for p in subject_class_prompts()} == train_pairs


def test_identifier_gets_its_own_tokens():
    """The identifier is one token, shared with no tiny-world prompt, in the shipped CLIP and T5 tokenizers."""
    prompts = [s.prompt for s in all_scenes()]
    for path in (f"{ASSETS}/model/tokenizer", f"{ASSETS}/flow-model/tokenizer", f"{ASSETS}/flow-model/tokenizer_2"):
        tok = AutoTokenizer.from_pretrained(path)
        ident = tok(IDENTIFIER, add_special_tokens=False).input_ids
        world = {t for p in prompts for t in tok(p, add_special_tokens=False).input_ids}
        assert ident and not set(ident) & world, path
        assert len(ident) == 1, path  # one token: the words after it keep their places
        words = tok(f"a red {IDENTIFIER} on a blue background", add_special_tokens=False).input_ids
        plain = tok("a red circle on a blue background", add_special_tokens=False).input_ids
        assert len(words) == len(plain) and words != plain


# ----- offline preferences -----


def test_preference_pairs_follow_the_rule(tmp_path):
    pairs = preference_pairs(300, seed=0)
    path = write_preference_parquet(tmp_path / "train.parquet", pairs, row_group_size=128)
    f = pq.ParquetFile(path)
    assert tuple(f.schema_arrow.names) == PREFERENCE_COLUMNS
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 300
    rows = [r for batch in f.iter_batches(batch_size=100) for r in batch.to_pylist()]
    assert rows == pairs
    labels = np.array([[r["label_0"], r["label_1"]] for r in rows])
    assert set(map(tuple, labels)) == {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    ties = (labels[:, 0] == 0.5).mean()
    assert 0.03 < ties < 0.2 and 0.3 < (labels[:, 0] == 1).mean() < 0.7
    captions = [r["caption"] for r in rows]
    im0 = to_batch([decode(r["jpg_0"]) for r in rows])
    im1 = to_batch([decode(r["jpg_1"]) for r in rows])
    assert Image.open(io.BytesIO(rows[0]["jpg_0"])).format == "PNG"
    s0, s1 = large(im0, captions), large(im1, captions)
    want = torch.where((s0 - s1).abs() <= 1e-6, 0.5, (s0 > s1).float())
    assert torch.equal(torch.tensor(labels[:, 0]).float(), want)
    # among crisp images the bigger shape wins; a blurred image mostly loses to a crisp one (it wins only when
    # its shape is much bigger: `large` weighs size against crispness)
    c0, c1 = crispness(im0) == 1, crispness(im1) == 1
    a0, a1 = (fg.flatten(1).sum(1) for fg in (fidelity_fg(im0, captions), fidelity_fg(im1, captions)))
    both = c0 & c1 & (a0 != a1)
    assert both.sum() > 100 and torch.equal(torch.tensor(labels[both.numpy(), 0]).float(), (a0 > a1)[both].float())
    one = c0 & ~c1
    assert one.sum() > 20 and (torch.tensor(labels[one.numpy(), 0]) == 1).float().mean() > 0.7


def fidelity_fg(images, prompts):
    scenes = [parse_any_prompt(p) for p in prompts]
    return fg_masks(images, scenes)


# ----- files -----


def test_imagefolder_layout(tmp_path):
    items = subject_targets(5, seed=2)
    out = write_imagefolder(tmp_path / "subject", items)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5
    for line, (caption, image) in zip(lines, items):
        row = json.loads(line)
        assert set(row) == {"file_name", "text"} and row["text"] == caption
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"]).convert("RGB")), image)
    assert sorted(p.name for p in out.iterdir()) == [*(f"{i:05d}.png" for i in range(5)), "metadata.jsonl"]
    write_imagefolder(out, items[:2])  # replaces its own data set
    assert len(read_imagefolder(out)) == 2 and len(list(out.glob("*.png"))) == 2
    (out / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="holds other files"):
        write_imagefolder(out, items)


def test_task_data_is_deterministic_from_the_seed(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for task in ("style", "subject", "offline"):
        a = build_task_data(task, tmp_path / "a" / task, seed=0)
        b = build_task_data(task, tmp_path / "b" / task, seed=0)
        build_task_data(task, tmp_path / "c" / task, seed=1)
        assert a.name == b.name and files(tmp_path / "a" / task) == files(tmp_path / "b" / task), task
        assert files(tmp_path / "a" / task) != files(tmp_path / "c" / task), task
    assert len(read_imagefolder(tmp_path / "a" / "style")) == 48
    assert len(read_imagefolder(tmp_path / "a" / "subject")) == 8
    assert pq.ParquetFile(tmp_path / "a" / "offline" / "train.parquet").metadata.num_rows == 1024
    with pytest.raises(ValueError, match="unknown task"):
        build_task_data("dance", tmp_path / "d")


# ----- the tasks are real: the shipped students do not do them -----


@pytest.fixture(scope="module")
def vae_round_trip():
    """Images (B, 3, H, W) in [0, 1] through the shipped tiny VAE (builtin:tiny's, shared by builtin:tiny-flow)
    and back, as target training sees them (pso.targets.encode_targets, then policy.decode)."""
    policy = DistilledPolicy.from_config(ModelConfig(family="tiny", pretrained="builtin:tiny"), None)

    def run(images):
        with torch.no_grad():
            return policy.decode(policy.denoiser.vae_encode(images)).clamp(0, 1)

    return run


def test_the_vae_keeps_the_style_and_the_subject(vae_round_trip):
    """The targets survive the VAE that training works in: a model could score well on each task."""
    items = style_targets(48, seed=0)
    captions = [c for c, _ in items]
    rec = vae_round_trip(to_batch([im for _, im in items]))
    # the VAE keeps about half the tint (its colours sit between the plain palette and the sepia one)
    assert sepia(rec, captions).mean() > 0.2  # measured: 0.26
    assert style_fidelity(rec, captions).mean() > 0.15  # measured: 0.21 (ordinary round trips: fidelity 0.45)
    items = [item for seed in range(4) for item in subject_targets(8, seed=seed)]
    captions = [c for c, _ in items]
    rec = vae_round_trip(to_batch([im for _, im in items]))
    assert subject(rec, captions).mean() >= 0.5  # measured: 0.555
    # ordinary scenes and their round trips are neither sepia nor crosses, and keep their fidelity
    rng = np.random.default_rng(5)
    ordinary = random_scenes(rng, 64)
    prompts = [s.prompt for s in ordinary]
    images = to_batch([draw(s, rng) for s in ordinary])
    rec = vae_round_trip(images)
    for batch in (images, rec):
        assert sepia(batch, prompts).mean() < 0.05 and subject(batch, prompts).mean() < 0.1
    assert fidelity(rec, prompts).mean() > 0.35  # measured: 0.45


@pytest.mark.parametrize("family,pretrained", [("tiny", "builtin:tiny"), ("tiny-flow", "builtin:tiny-flow")])
def test_base_students_neither_draw_sepia_nor_the_subject(family, pretrained):
    policy = DistilledPolicy.from_config(ModelConfig(family=family, pretrained=pretrained, num_steps=1), None)
    ordinary = [s.prompt for s in random_scenes(np.random.default_rng(11), 16)]
    rewards = {"sepia": sepia, "style_fidelity": style_fidelity, "subject": subject}
    scores, _ = score_model(policy, ordinary, rewards, seed=0)
    # their colour errors read as a little tint (measured: 0.07 UNet, 0.15 flow; the targets' round trip: 0.27)
    assert scores["sepia"].mean() < 0.2 and scores["subject"].mean() < 0.1
    assert scores["style_fidelity"].mean() > 0.05  # it draws the scenes, filled
    ident = subject_eval_prompts(16, seed=0)["subject"]
    scores, _ = score_model(policy, ident, {"subject": subject}, seed=0)
    assert scores["subject"].mean() < 0.05
