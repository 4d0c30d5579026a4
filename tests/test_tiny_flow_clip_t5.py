"""Tiny random FLUX.1-schnell and SD3.5 pipelines (CLIP + T5 text encoders)."""

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from pso.tiny.flow.clip_t5 import BUILDERS, build_t5_tokenizer

PIPELINE_CLASS = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
GUIDANCE = {"flux": 0.0, "sd3": 3.5}  # schnell is guidance-distilled; SD3.5 uses classifier-free guidance
SCHEDULER = {"flux": (1.0, 0.3611, 0.1159), "sd3": (3.0, 1.5305, 0.0609)}  # shift, VAE scaling and shift factors


def _run(pipe, arch: str, prompt: str, output_type: str = "pt") -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=2, guidance_scale=GUIDANCE[arch], height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type=output_type, max_sequence_length=32)  # fmt: skip
    return out.images


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request, tmp_path_factory):
    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    pipe = PIPELINE_CLASS[request.param].from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return request.param, path, pipe


def test_t5_tokenizer_pads_to_max_length(tmp_path):
    tok = build_t5_tokenizer(tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red circle", padding="max_length", max_length=512, truncation=True).input_ids
    assert tok.convert_ids_to_tokens(ids[:4]) == ["▁a", "▁red", "▁circle", "</s>"]
    assert len(ids) == 512 and set(ids[4:]) == {0}
    assert tok.decode(tok("Zebra!").input_ids, skip_special_tokens=True) == "Zebra!"


def test_pipeline_reloads_and_generates(built):
    arch, path, pipe = built
    assert isinstance(DiffusionPipeline.from_pretrained(path, local_files_only=True), PIPELINE_CLASS[arch])
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 5 * 2**20
    shift, scaling_factor, shift_factor = SCHEDULER[arch]
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (shift, False)
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor) == (16, scaling_factor)
    assert pipe.vae.config.shift_factor == shift_factor
    image = _run(pipe, arch, "a red circle")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all() and image.std() > 0.01


def test_different_prompts_give_different_latents(built):
    arch, _, pipe = built
    red, blue = _run(pipe, arch, "a red circle", "latent"), _run(pipe, arch, "a blue square", "latent")
    assert red.shape == ((1, 16, 64) if arch == "flux" else (1, 16, 8, 8))  # FLUX returns packed latents
    assert (red - blue).abs().mean() > 0.05 * red.abs().mean()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_same_seed_gives_identical_weights(tmp_path, arch):
    paths = [BUILDERS[arch](tmp_path / str(i), seed=seed) for i, seed in enumerate([0, 0, 1])]
    files = sorted(f.relative_to(paths[0]) for f in paths[0].rglob("*.safetensors"))
    assert len(files) == (4 if arch == "flux" else 5)
    assert all((paths[0] / f).read_bytes() == (paths[1] / f).read_bytes() for f in files)
    for f in files:
        same, other = load_file(paths[0] / f), load_file(paths[2] / f)
        assert any(not torch.equal(same[k], other[k]) for k in same)
