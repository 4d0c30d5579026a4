"""The built-in tiny world: offline tokenizer and tiny random pipelines."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from pso.tiny.pipelines import build_tiny_pipeline
from pso.tiny.tokenizer import TOKENIZER_WORDS, build_clip_tokenizer

VARIANTS = {"sd": ("sd", None), "sd-lcm": ("sd", 8), "sdxl": ("sdxl", None)}
PIPELINE_CLASS = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _run(pipe, prompt: str, output_type: str) -> np.ndarray:
    out = pipe([prompt], num_inference_steps=2, guidance_scale=0.0, output_type=output_type,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return np.asarray(out.images)


def test_tokenizer_words_are_single_tokens(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    ids = tok("a red circle on a blue background").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>",
        "<|endoftext|>",
    ]  # fmt: skip
    assert all(len(tok(w).input_ids) == 3 for w in TOKENIZER_WORDS)
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)


def test_tokenizer_handles_unknown_words_and_custom_lists(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "default")
    ids = tok("Zebra!").input_ids
    assert tok.unk_token_id not in ids[1:-1] and len(ids) > 3
    assert tok.decode(ids, skip_special_tokens=True) == "zebra !"
    custom = build_clip_tokenizer(tmp_path / "custom", words=["zebra", "zebu", "ze"])
    tokens = custom.convert_ids_to_tokens(custom("zebra zebu ze").input_ids[1:-1])
    assert tokens == ["zebra</w>", "zebu</w>", "ze</w>"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def built(request, tmp_path_factory):
    arch, time_cond_proj_dim = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    build_tiny_pipeline(path, arch, time_cond_proj_dim=time_cond_proj_dim)
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return arch, time_cond_proj_dim, path, pipe


def test_pipeline_reloads_and_generates(built):
    arch, time_cond_proj_dim, path, pipe = built
    assert isinstance(pipe, PIPELINE_CLASS[arch])
    assert pipe.unet.config.time_cond_proj_dim == time_cond_proj_dim
    assert isinstance(PIPELINE_CLASS[arch].from_pretrained(path, local_files_only=True), PIPELINE_CLASS[arch])
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 10 * 2**20
    image = _run(pipe, "a red circle", "np")
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_different_prompts_give_different_latents(built):
    pipe = built[3]
    red, blue = _run(pipe, "a red circle", "latent"), _run(pipe, "a blue square", "latent")
    assert red.shape == (1, 4, 8, 8)
    assert np.abs(red - blue).mean() > 0.05 * np.abs(red).mean()


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_same_seed_gives_identical_weights(tmp_path, arch):
    paths = [build_tiny_pipeline(tmp_path / str(i), arch, seed=seed) for i, seed in enumerate([0, 0, 1])]
    weights = [load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in paths]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["conv_in.weight"], weights[2]["conv_in.weight"])
    files = sorted(f.relative_to(paths[0]) for f in paths[0].rglob("*.safetensors"))
    assert all((paths[0] / f).read_bytes() == (paths[1] / f).read_bytes() for f in files)
