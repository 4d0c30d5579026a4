"""The CLIP-family reward back-ends on tiny random models built offline, and the full-size layouts (slow).

Parity is shown against independent computations: transformers' own CLIPModel + CLIPProcessor
for the HF-format models, and a plain-torch open_clip forward over the raw open_clip state dict
for HPSv2 (so the key converter is not checked against itself).
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from pso.config.reward_server import AestheticSpec, ClipScoreSpec, HPSv2Spec, PickScoreSpec
from reward_server.backends.base import RewardInputError, load_state_dict
from reward_server.backends.clip_convert import openclip_shapes, openclip_to_transformers
from reward_server.backends.clip_preprocess import CLIP_STD, ImageTransform
from reward_server.backends.clip_rewards import CLIP_BACKENDS, VIT_H14, VIT_L14, AestheticHead, build_random

HPSV2_FILE, AESTHETIC_FILE = HPSv2Spec().checkpoint_file, AestheticSpec().head_file

KINDS = ("pickscore", "hpsv2", "clip-score", "aesthetic")
PROMPTS = ["a red circle", "a blue square on a white background", "photo of a small green star"]
# Shortest side 32, the tiny models' input size: no resizing, so the long-way comparisons see the
# same pixels and test the models alone (the resize is compared with PIL's separately).
SHAPES = [(32, 45), (51, 32), (32, 32)]


def spec_for(kind: str, folder, **fields):
    """A spec loading the tiny model in `folder` through its public fields, as a real local model would."""
    src = str(folder)
    return {
        "pickscore": lambda: PickScoreSpec(model=src, processor=src, **fields),
        "hpsv2": lambda: HPSv2Spec(checkpoint=src, processor=src, **fields),
        "clip-score": lambda: ClipScoreSpec(model=src, **fields),
        "aesthetic": lambda: AestheticSpec(model=src, head=src, **fields),
    }[kind]()


def random_images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in shapes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-clip")
    return {kind: build_random(kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def backends(tiny):
    return {kind: CLIP_BACKENDS[kind](spec_for(kind, tiny[kind]), torch.device("cpu")) for kind in KINDS}


# --- preprocessing ---------------------------------------------------------------------------

# Measured against transformers 5.23 / Pillow 13 on these images: at most 2 grey levels apart
# (0.0292 after normalising; 1 level is 1/255/std = 0.0146-0.0150), mean 1.2e-4, about 0.8% of
# values differ at all. Resizing in float instead of uint8 gave up to 21 levels; torch's default
# pass order instead of Pillow's up to 14.
MAX_LEVELS = 2
MEAN_ABS_TOL = 3e-4
PREPROCESS_SHAPES = [(300, 451), (180, 97), (999, 333), (900, 300), (50, 64), (224, 301), (512, 512), (1000, 500)]


@pytest.mark.parametrize("source", ["defaults", "tiny folder"])
def test_preprocess_matches_transformers_pil_processor(source, tiny):
    # v5's `CLIPImageProcessor` is the torchvision ("fast") backend; the PIL path is CLIPImageProcessorPil.
    if source == "defaults":
        ours, theirs = ImageTransform(), CLIPImageProcessorPil()
    else:
        ours = ImageTransform.from_source(str(tiny["pickscore"]))
        theirs = CLIPImageProcessorPil.from_pretrained(tiny["pickscore"])
        assert ours.size == 32 and ours.mean != ImageTransform().mean
    level = 1 / 255 / min(theirs.image_std)
    for image in random_images(PREPROCESS_SHAPES):
        expected = torch.from_numpy(theirs(images=image.numpy(), return_tensors="np")["pixel_values"][0])
        got = ours(image)
        assert got.shape == expected.shape == (3, *ours.crop_size)
        diff = (got - expected).abs()
        assert diff.max() <= MAX_LEVELS * level + 1e-6, (tuple(image.shape), diff.max())
        assert diff.mean() < MEAN_ABS_TOL


def test_preprocess_defaults_and_input_errors(tmp_path):
    assert ImageTransform.from_source(str(tmp_path)) == ImageTransform()  # a folder without the config
    assert ImageTransform().std == CLIP_STD
    transform = ImageTransform(size=32, crop_size=(32, 32))
    for shape in [(15, 300, 3), (300, 15, 3), (1, 1, 3)]:  # tiny images and aspect ratios up to 20 work
        assert transform(torch.zeros(shape, dtype=torch.uint8)).shape == (3, 32, 32)
    with pytest.raises(RewardInputError, match="more than 20 times"):
        transform(torch.zeros(1, 10**6, 3, dtype=torch.uint8))
    for bad in [torch.zeros(32, 32, 3), torch.zeros(32, 32, 4, dtype=torch.uint8), torch.zeros(0, 5, 3).byte()]:
        with pytest.raises(RewardInputError, match="uint8"):
            transform(bad)
    with pytest.raises(ValueError, match="larger"):
        ImageTransform(size=32, crop_size=(40, 32))


# --- parity with independent computations ------------------------------------------------------


def reference_pixels(folder, images, round_crop: bool) -> torch.Tensor:
    """transformers' PIL processor; with `round_crop`, its resize followed by torchvision's CenterCrop
    (offsets rounded, not truncated), as HPSv2 and the aesthetic predictor were published."""
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    if not round_crop:
        return processor(images=[im.numpy() for im in images], return_tensors="pt").pixel_values
    h, w = processor.crop_size["height"], processor.crop_size["width"]
    crops = []
    for im in images:
        x = processor(images=im.numpy(), do_center_crop=False, return_tensors="pt").pixel_values[0]
        top, left = int(round((x.shape[1] - h) / 2)), int(round((x.shape[2] - w) / 2))
        crops.append(x[:, top : top + h, left : left + w])
    return torch.stack(crops)


@pytest.mark.parametrize("kind", ["pickscore", "clip-score", "aesthetic"])
def test_scores_match_transformers_clipmodel_and_processor(kind, tiny, backends):
    folder = tiny[kind]
    model = CLIPModel.from_pretrained(folder).eval()
    images = random_images(SHAPES)
    text = CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")
    pixels = reference_pixels(folder, images, round_crop=kind == "aesthetic")
    with torch.inference_mode():
        out = model(**text, pixel_values=pixels)
        cosine = (out.image_embeds * out.text_embeds).sum(-1)
        if kind == "pickscore":
            expected = out.logits_per_image.diagonal()
        elif kind == "clip-score":
            expected = (100 * cosine).clamp(min=0)
        else:
            head = nn.Sequential(
                nn.Linear(model.config.projection_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            ).eval()  # fmt: skip
            state = torch.load(folder / AESTHETIC_FILE, weights_only=True)
            head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
            expected = head(out.image_embeds).squeeze(-1)
        got = backends[kind].score(images, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def openclip_reference(state, config: CLIPConfig, pixels, prompts, tokenizer):
    """open_clip's CLIP forward (ViT towers, exact GELU, argmax pooling, zero padding) on its own
    state dict, written from open_clip's model.py / transformer.py; returns image-text cosines."""
    s = {k: v.float() for k, v in state.items()}

    def blocks(x, prefix, layers, heads, mask=None):
        width = x.shape[-1]
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            attn = nn.MultiheadAttention(width, heads, batch_first=True)
            attn.load_state_dict({k: s[p + "attn." + k] for k in attn.state_dict()})
            h = F.layer_norm(x, (width,), s[p + "ln_1.weight"], s[p + "ln_1.bias"])
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (width,), s[p + "ln_2.weight"], s[p + "ln_2.bias"])
            h = F.gelu(F.linear(h, s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"])
        return x

    vision, text = config.vision_config, config.text_config
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=vision.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (vision.hidden_size,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    x = blocks(x, "visual.", vision.num_hidden_layers, vision.num_attention_heads)
    x = F.layer_norm(x, (vision.hidden_size,), s["visual.ln_post.weight"], s["visual.ln_post.bias"])
    image = x[:, 0] @ s["visual.proj"]

    # open_clip's tokenizer: [sot] + tokens + [eot], cut to the context with eot kept last, zero-padded
    n = s["positional_embedding"].shape[0]
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False), tokenizer.eos_token_id]
        tokens = tokens[:n]
        tokens[-1] = tokenizer.eos_token_id
        ids[row, : len(tokens)] = torch.tensor(tokens)
    mask = torch.full((n, n), float("-inf")).triu(1)
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    x = blocks(x, "", text.num_hidden_layers, text.num_attention_heads, mask)
    x = F.layer_norm(x, (text.hidden_size,), s["ln_final.weight"], s["ln_final.bias"])
    text_features = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ s["text_projection"]
    return F.cosine_similarity(image, text_features, dim=-1)


def test_hpsv2_matches_an_open_clip_forward_on_the_raw_checkpoint(tiny, backends):
    folder = tiny["hpsv2"]
    state = load_state_dict(folder / HPSV2_FILE)
    assert set(state) == set(openclip_shapes(CLIPConfig.from_pretrained(folder)))
    images = random_images(SHAPES)
    pixels = reference_pixels(folder, images, round_crop=True)
    prompts = [*PROMPTS[:2], " ".join(["a red circle on a blue background"] * 20)]  # the last is cut at 77 tokens
    with torch.inference_mode():
        config, tokenizer = CLIPConfig.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
        expected = openclip_reference(state, config, pixels, prompts, tokenizer)
        got = backends["hpsv2"].score(images, prompts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eos_token_id", ["tokenizer's", 2])
def test_text_pooling_finds_the_end_token_whatever_the_padding(eos_token_id, backends):
    """open_clip pads with 0 and pools at the argmax id; HF tokenizers pad with <|endoftext|> and
    transformers pools at the first end token (or at the argmax id when a legacy config says eos=2)."""
    tower = backends["hpsv2"].tower
    model = tower.model
    eos = tower.tokenizer.eos_token_id
    ids = tower.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.max() == eos and (ids == eos).any(dim=1).all()
    zero_padded = ids.clone()
    for row in zero_padded:
        row[(row == eos).int().argmax() + 1 :] = 0
    saved = model.text_model.eos_token_id
    model.text_model.eos_token_id = eos if eos_token_id == "tokenizer's" else eos_token_id
    try:
        with torch.inference_mode():
            a = model.get_text_features(input_ids=ids).pooler_output
            b = model.get_text_features(input_ids=zero_padded).pooler_output
            c = model.get_text_features(input_ids=ids[:, : int((ids != eos).sum(1).max()) + 1]).pooler_output
    finally:
        model.text_model.eos_token_id = saved
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# --- behaviour ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_single_and_non_square_images(kind, backends):
    backend = backends[kind]
    images = random_images([(48, 70), (90, 33), (32, 32), (17, 200)], seed=1)
    prompts = [*PROMPTS, "a heart"]
    pixels = [backend.preprocess(im) for im in images]
    assert {tuple(p.shape) for p in pixels} == {(3, 32, 32)}
    with torch.inference_mode():
        batch = backend.score_batch(torch.stack(pixels), prompts)
        single = torch.cat([backend.score_batch(p[None], [q]) for p, q in zip(pixels, prompts)])
    assert batch.dtype == torch.float32 and batch.shape == (4,) and batch.isfinite().all()
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    if kind == "aesthetic":  # the prompt is ignored
        torch.testing.assert_close(backend.score(images, ["x"] * 4), backend.score(images, prompts))


@pytest.mark.parametrize("kind", ["pickscore", "hpsv2", "clip-score"])
def test_long_prompts_are_cut_to_77_tokens(kind, backends):
    long = " ".join(["a small red circle next to a large blue square"] * 30)
    images = random_images([(32, 32)]) * 2
    scores = backends[kind].score(images, [long, long + " on a green background"])
    assert scores[0] == scores[1]


def test_local_files_load_like_folders(tiny, backends):
    images = random_images(SHAPES)
    for kind, spec in [
        ("hpsv2", HPSv2Spec(checkpoint=str(tiny["hpsv2"] / HPSV2_FILE), processor=str(tiny["hpsv2"]))),
        ("aesthetic", AestheticSpec(model=str(tiny["aesthetic"]), head=str(tiny["aesthetic"] / AESTHETIC_FILE))),
    ]:
        backend = CLIP_BACKENDS[kind](spec, torch.device("cpu"))
        assert backend.info.version.split("@")[1] == backends[kind].info.version.split("@")[1]
        torch.testing.assert_close(backend.score(images, PROMPTS), backends[kind].score(images, PROMPTS))


def test_missing_sources_are_clear_errors(tiny, tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub repo id"):
        CLIP_BACKENDS["pickscore"](PickScoreSpec(model=str(tmp_path / "nowhere")), cpu)
    with pytest.raises(FileNotFoundError, match="nor a hub repo id"):
        CLIP_BACKENDS["clip-score"](ClipScoreSpec(model=str(tiny["clip-score"]), processor="./no/such/folder"), cpu)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        CLIP_BACKENDS["hpsv2"](HPSv2Spec(checkpoint=str(tmp_path / "nowhere.pt"), processor=str(tiny["hpsv2"])), cpu)
    with pytest.raises(FileNotFoundError, match=re.escape(f"has no {AESTHETIC_FILE}")):
        CLIP_BACKENDS["aesthetic"](AestheticSpec(model=str(tiny["aesthetic"]), head=str(tiny["pickscore"])), cpu)


def test_open_clip_checkpoint_of_another_layout_is_rejected(tiny):
    state = load_state_dict(tiny["hpsv2"] / HPSV2_FILE)
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        openclip_to_transformers({**state, "visual.attn_pool.query": torch.zeros(1)})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu(dtype, tiny, backends):
    images = random_images(SHAPES)
    for kind in ("pickscore", "hpsv2"):
        backend = CLIP_BACKENDS[kind](spec_for(kind, tiny[kind], dtype=dtype), torch.device("cpu"))
        assert backend.tower.model.dtype == getattr(torch, dtype)
        got = backend.score(images, PROMPTS)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, backends[kind].score(images, PROMPTS), rtol=3e-2, atol=3e-3)


def test_info_and_specs(tiny, backends):
    for kind, backend in backends.items():
        info = backend.info
        assert (info.name, info.kind, info.weight, info.higher_is_better) == (kind, kind, 1.0, True)
        source, digest = info.version.rsplit("@", 1)
        assert str(tiny[kind]) in source and len(digest) == 12
        assert any(ch.isdigit() for ch in info.scale)
    named = CLIP_BACKENDS["clip-score"](spec_for("clip-score", tiny["clip-score"], name="clip", weight=0.5), "cpu")
    assert (named.info.name, named.info.weight) == ("clip", 0.5)
    # the same seed gives the same weights
    assert named.info.version.rsplit("@")[1] == backends["clip-score"].info.version.rsplit("@")[1]
    assert PickScoreSpec().model == "yuvalkirstain/PickScore_v1"
    assert HPSv2Spec().checkpoint_file == "HPS_v2.1_compressed.pt"
    with pytest.raises(ValidationError):
        PickScoreSpec(modle="typo")
    with pytest.raises(ValueError, match="unknown kind"):
        build_random("imagereward", "unused")


# --- full-size layouts (meta tensors, no weights) ----------------------------------------------


def published_openclip_layout(vision_width, vision_layers, text_width, text_layers, embed, patch=14, grid=16):
    """open_clip's CLIP state dict as its VisionTransformer, TextTransformer and ResidualAttentionBlock
    (open_clip_torch 3.3.0, transformer.py / model.py) define it: mlp_ratio 4, 77-token context, vocab 49408."""
    layout = {
        "visual.conv1.weight": (vision_width, 3, patch, patch),  # bias=False
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.ln_pre.weight": (vision_width,), "visual.ln_pre.bias": (vision_width,),
        "visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,),
        "visual.proj": (vision_width, embed),
        "token_embedding.weight": (49408, text_width),
        "positional_embedding": (77, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed),
        "logit_scale": (),
    }  # fmt: skip
    for prefix, d, layers in (("visual.", vision_width, vision_layers), ("", text_width, text_layers)):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            layout |= {
                b + "ln_1.weight": (d,), b + "ln_1.bias": (d,),
                b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
                b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,),
                b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
                b + "mlp.c_fc.weight": (4 * d, d), b + "mlp.c_fc.bias": (4 * d,),
                b + "mlp.c_proj.weight": (d, 4 * d), b + "mlp.c_proj.bias": (d,),
            }  # fmt: skip
    return layout


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, layout",
    [
        (VIT_H14, published_openclip_layout(1280, 32, 1024, 24, 1024)),  # HPSv2.1 (and PickScore's base)
        (VIT_L14, published_openclip_layout(1024, 24, 768, 12, 768)),  # OpenAI's ViT-L/14 in open_clip's naming
    ],
    ids=["ViT-H-14", "ViT-L-14"],
)
def test_full_size_open_clip_layout_converts_onto_clipmodel(arch, layout):
    config = CLIPConfig(text_config=arch["text"], vision_config=arch["vision"], projection_dim=arch["projection_dim"])
    assert openclip_shapes(config) == layout
    with torch.device("meta"):
        hf = CLIPModel(config).state_dict()
        converted = openclip_to_transformers({k: torch.empty(shape) for k, shape in layout.items()})
    # HF-only buffers, not weights (transformers 5 already keeps them out of the state dict)
    expected = {k: tuple(v.shape) for k, v in hf.items() if not k.endswith(".position_ids")}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.slow
def test_full_size_aesthetic_head_layout():
    published = {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    with torch.device("meta"):
        head = AestheticHead()
        clip = CLIPModel(CLIPConfig(text_config=VIT_L14["text"], vision_config=VIT_L14["vision"], projection_dim=768))
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == published
    assert clip.visual_projection.out_features == published["layers.0.weight"][1]
    assert math.prod(head(torch.empty(2, 768, device="meta")).shape) == 2
