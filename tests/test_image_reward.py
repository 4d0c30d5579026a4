"""ImageReward back-end: offline tiny random models, parity with the `image-reward` package's own model code
(tests/image_reward_reference.py), torchvision/PIL-equivalent preprocessing, and the full-size key layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reward_server.backends.base import RewardInputError
from reward_server.backends.clip_preprocess import CLIP_MEAN, CLIP_STD, ImageTransform
from reward_server.backends.image_reward import (
    CHECKPOINT_FILE,
    IGNORED_KEYS,
    MED_CONFIG_FILE,
    PUBLISHED_MED_CONFIG,
    VISION_CONFIG_FILE,
    ImageRewardBackend,
    ImageRewardSpec,
    build_random,
    convert_checkpoint,
    full_size_model,
    randomize_,
    to_official,
)

PROMPTS = ["a cat on a red chair", "a dog", "blue sky over the sea at night", "zebra xylophone quartz!"]


def images(n, shape=(40, 56), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=g) for _ in range(n)]


def spec(folder, **kw):
    return ImageRewardSpec(checkpoint=str(folder), tokenizer=str(folder), **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_random(tmp_path_factory.mktemp("image-reward"), seed=0)


@pytest.fixture(scope="module")
def backend(tiny):
    return ImageRewardBackend(spec(tiny), "cpu")


def test_loads_from_folder_offline(tiny, backend):
    info = backend.info
    assert (info.name, info.kind, info.weight) == ("image-reward", "image-reward", 1.0)
    assert info.version.startswith(f"{tiny}@") and len(info.version.rsplit("@", 1)[1]) == 12
    assert "standardised" in info.scale and info.higher_is_better
    assert backend.image_size == json.loads((tiny / VISION_CONFIG_FILE).read_text())["image_size"]
    renamed = ImageRewardBackend(spec(tiny, name="ir", weight=0.5), "cpu").info
    assert (renamed.name, renamed.weight, renamed.version) == ("ir", 0.5, info.version)


def test_version_tells_weights_apart(tmp_path, backend):
    other = ImageRewardBackend(spec(build_random(tmp_path, seed=1)), "cpu")
    assert other.info.version.rsplit("@", 1)[1] != backend.info.version.rsplit("@", 1)[1]


def test_loads_from_file_path_with_explicit_configs(tiny, backend):
    file_spec = ImageRewardSpec(
        checkpoint=str(tiny / CHECKPOINT_FILE),
        med_config=str(tiny / MED_CONFIG_FILE),
        vision_config=str(tiny / VISION_CONFIG_FILE),
        tokenizer=str(tiny),
    )
    ims = images(2)
    assert torch.equal(ImageRewardBackend(file_spec, "cpu").score(ims, PROMPTS[:2]), backend.score(ims, PROMPTS[:2]))


def test_missing_files_are_clear_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="neither a local file or folder"):
        ImageRewardBackend(spec(tmp_path / "nowhere" / "ImageReward.pt"), "cpu")
    with pytest.raises(FileNotFoundError, match=f"has no {CHECKPOINT_FILE}"):
        ImageRewardBackend(spec(tmp_path), "cpu")
    with pytest.raises(FileNotFoundError, match="no config file"):
        ImageRewardBackend(spec(tiny, med_config=str(tmp_path / "med.json")), "cpu")


def test_scores_are_finite_deterministic_and_discriminate(backend):
    ims = images(4)
    scores = backend.score(ims, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (4,) and torch.isfinite(scores).all()
    assert torch.equal(scores, backend.score(ims, PROMPTS))
    # the tiny model tells images and prompts apart, so the comparisons in these tests can fail
    assert scores.std() > 0.1
    assert (backend.score(ims, PROMPTS[::-1]) - scores).abs().max() > 0.05
    assert (backend.score(ims[::-1], PROMPTS) - scores).abs().max() > 0.05


def test_batch_equals_one_at_a_time(backend):
    ims = images(3, seed=1)
    together = backend.score(ims, PROMPTS[:3])
    alone = torch.cat([backend.score([im], [p]) for im, p in zip(ims, PROMPTS)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_long_prompt_is_truncated_to_35_tokens(backend):
    long = " ".join(["a red house by the sea"] * 20)
    assert backend.tokenize([long])["input_ids"].shape == (1, 35)
    ims = images(1)
    score = backend.score(ims, [long])
    assert torch.isfinite(score).all()
    assert torch.equal(score, backend.score(ims, [long + " and a dog"]))  # past token 35: not read


def test_preprocess_non_square_and_bad_input(backend):
    size = backend.image_size
    for shape in [(40, 90), (90, 40), (size, size), (7, 5)]:
        out = backend.preprocess(torch.zeros(*shape, 3, dtype=torch.uint8))
        assert out.shape == (3, size, size) and out.dtype == torch.uint8  # normalised on the device
    scores = backend.score(images(2, shape=(30, 100)) + images(1, shape=(100, 30)), PROMPTS[:3])
    assert torch.isfinite(scores).all()
    for bad in [torch.zeros(8, 8, 3), torch.zeros(8, 8, 4, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)]:
        with pytest.raises(RewardInputError, match="uint8"):
            backend.preprocess(bad)
    assert backend.preprocess(torch.zeros(2, 40, 3, dtype=torch.uint8)).shape == (3, size, size)
    with pytest.raises(RewardInputError, match="more than 20 times"):
        backend.preprocess(torch.zeros(1, 10_000, 3, dtype=torch.uint8))  # would be resized to 32 x 320000


def pil_transform(array: np.ndarray, size: int) -> torch.Tensor:
    """The package's transform as torchvision runs it on a PIL image: Resize(size, BICUBIC) (the short
    side to `size`, the long side int(size * long / short), skipped when already that size), CenterCrop
    (offsets int(round((d - size) / 2))), ToTensor, Normalize."""
    im = Image.fromarray(array)
    w, h = im.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    x = torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("shape", [(512, 768), (883, 230), (192, 243), (100, 150), (24, 444), (224, 224)])
def test_preprocess_matches_pil_bicubic(shape):
    transform = ImageTransform(224, (224, 224), round_crop=True)
    """Measured over 80 random sizes (10 to 1000 px, noise and smooth images): at most 2 8-bit levels apart
    (3 values in all), at most 2.2% of the values 1 level apart, usually under 0.5%; Pillow rounds with
    22-bit fixed-point weights. Tolerance: 2 levels, 5% of values."""
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([127 + 120 * np.sin(xx / 17 + c) * np.cos(yy / 23) for c in range(3)], -1).round()
    for array in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), smooth.astype(np.uint8)):
        ours, ref = transform(torch.from_numpy(array)), pil_transform(array, 224)
        levels = ((ours - ref) * torch.tensor(CLIP_STD).view(3, 1, 1) * 255).abs()
        assert levels.max() < 2.001 and (levels > 0.5).float().mean() < 0.05


@pytest.mark.parametrize("dtype, atol", [("float16", 0.05), ("bfloat16", 0.1)])
def test_low_precision_runs_on_cpu(tiny, backend, dtype, atol):
    """Measured on the tiny model against float32: float16 0.0024, bfloat16 0.011 at most."""
    ims = images(4, seed=2)
    low = ImageRewardBackend(spec(tiny, dtype=dtype), "cpu")
    assert low.model.vision.embeddings.patch_embedding.weight.dtype == getattr(torch, dtype)
    scores = low.score(ims, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, backend.score(ims, PROMPTS), atol=atol, rtol=0)


def test_converter_names_every_key(backend):
    state = backend.model.state_dict()
    official = to_official(state)
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")) for k in official)
    with_ignored = {**official, **{k: torch.zeros(1) for k in IGNORED_KEYS}}
    assert convert_checkpoint(with_ignored).keys() == state.keys()
    with pytest.raises(ValueError, match="blip.itm_head.weight"):
        convert_checkpoint({**official, "blip.itm_head.weight": torch.zeros(1)})


def reference_module():
    import image_reward_reference

    try:
        image_reward_reference.load()
    except ImportError as e:
        pytest.fail(f"{e} (the parity tests run the original package's model code)")
    return image_reward_reference


def test_matches_the_package_model_code(tmp_path, tiny):
    """The package's own ImageReward (BLIP ViT, BLIP's BERT with cross-attention, MLP, normalisation) with
    random weights, saved as ImageReward.pt exactly as its state_dict is, scores as this back-end does."""
    ref = reference_module()
    vision = json.loads((tiny / VISION_CONFIG_FILE).read_text())
    original = randomize_(ref.build(tiny / MED_CONFIG_FILE, tiny, vision=vision), seed=3)
    folder = tmp_path / "original"
    shutil.copytree(tiny, folder)
    torch.save(original.state_dict(), folder / CHECKPOINT_FILE)
    assert IGNORED_KEYS <= original.state_dict().keys()

    ours = ImageRewardBackend(spec(folder), "cpu")
    prompts = PROMPTS + [" ".join(["a red house by the sea"] * 10), ""]
    ims = images(3, shape=(50, 70), seed=4) + images(3, shape=(90, 40), seed=5)
    pixels = torch.stack([ours.preprocess(im) for im in ims])
    tokens = original.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert torch.equal(ours.tokenize(prompts)["input_ids"], tokens.input_ids)
    assert torch.equal(ours.tokenize(prompts)["attention_mask"], tokens.attention_mask)
    with torch.inference_mode():
        expected = original.score_gard(tokens.input_ids, tokens.attention_mask, ours.transform.normalize(pixels))
        expected = expected.squeeze(-1)
        got = ours.score_batch(pixels, prompts)
    assert expected.std() > 0.1  # the weights make scores differ, so a wrong port shows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_full_size_shapes_match_the_package(tmp_path, tiny):
    """The package's full-size ImageReward (ViT-L/16 at 224 px, BERT-base with 1024-wide cross-attention,
    MLP(768)) and this port, both built on the meta device: the converter maps the official keys onto
    exactly this model's keys and shapes, dropping only IGNORED_KEYS."""
    ref = reference_module()
    med = tmp_path / MED_CONFIG_FILE  # the package overrides its encoder_width with the ViT's width
    med.write_text(json.dumps(PUBLISHED_MED_CONFIG))
    original = ref.build(med, tiny, device="meta").state_dict()
    converted = {k: tuple(v.shape) for k, v in convert_checkpoint(original).items()}
    ours = {k: tuple(v.shape) for k, v in full_size_model().state_dict().items()}
    assert converted == ours
    assert original.keys() - set(to_official(full_size_model().state_dict())) == IGNORED_KEYS
    assert ours["vision.embeddings.position_embedding"] == (1, 197, 1024)
    assert ours["text.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert ours["text.embeddings.word_embeddings.weight"] == (30524, 768)
