"""The tiny random SANA-Sprint pipeline: Gemma tokenizer, offline build, reload and generation."""

import pytest
import torch
from diffusers import SanaSprintPipeline
from safetensors.torch import load_file

from pso.tiny.flow.gemma import BUILDERS, build_gemma_tokenizer, build_sana, instruction_words
from pso.tiny.tokenizer import TOKENIZER_WORDS

PARTS = ("transformer", "vae", "text_encoder")


def _generate(pipe, prompt: str, output_type: str = "pt", steps: int = 2, **kwargs) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=steps, height=32, width=32, use_resolution_binning=False,
               output_type=output_type, generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    return out.images


def _weights(path) -> dict[str, dict[str, torch.Tensor]]:
    return {part: load_file(next((path / part).glob("*.safetensors"))) for part in PARTS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("sana")
    assert build_sana(path) == path
    pipe = SanaSprintPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


def test_tokenizer_is_gemma_like():
    tok = build_gemma_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    tokens = tok.convert_ids_to_tokens(tok("a red circle on a blue background").input_ids)
    assert tokens == ["<bos>", "a", "▁red", "▁circle", "▁on", "▁a", "▁blue", "▁background"]
    assert all(len(tok(w).input_ids) == 2 for w in [*TOKENIZER_WORDS, *instruction_words()])
    ids = tok("Zebra é!").input_ids  # unknown words split into letters, other characters into bytes
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == "Zebra é!"


def test_pipeline_reloads_and_generates(built):
    path, pipe = built
    assert BUILDERS == {"sana": build_sana}
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.config.qk_norm == "rms_norm_across_heads"
    assert pipe.vae_scale_factor == 4 and type(pipe.text_encoder).__name__ == "Gemma2Model"
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 5 * 2**20
    for kwargs in ({}, {"complex_human_instruction": None}):  # with the default instruction and without
        image = _generate(pipe, "a red circle", **kwargs)
        assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all() and image.std() > 0.01
    assert _generate(pipe, "a red circle", steps=1, intermediate_timesteps=None).shape == (1, 3, 32, 32)


def test_different_prompts_give_different_latents(built):
    pipe = built[1]
    red, blue = _generate(pipe, "a red circle", "latent"), _generate(pipe, "a blue square", "latent")
    assert red.shape == (1, 8, 8, 8)
    assert (red - blue).abs().mean() > 0.05 * red.abs().mean()


def test_same_seed_gives_identical_weights(tmp_path):
    rng = torch.random.get_rng_state()
    paths = [build_sana(tmp_path / str(i), seed=seed) for i, seed in enumerate([0, 0, 1])]
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    files = sorted(f.relative_to(paths[0]) for f in paths[0].rglob("*") if f.is_file())
    assert all((paths[0] / f).read_bytes() == (paths[1] / f).read_bytes() for f in files)
    same, other = _weights(paths[0]), _weights(paths[2])
    for part in PARTS:
        assert same[part].keys() == other[part].keys()
        assert any(not torch.equal(same[part][k], other[part][k]) for k in same[part]), part
