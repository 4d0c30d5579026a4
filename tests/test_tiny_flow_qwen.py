"""Tiny random FLUX.2 [klein], Z-Image-Turbo and Qwen-Image pipelines with Qwen text encoders."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, QwenImagePipeline, ZImagePipeline

from pso.tiny.flow.qwen import BUILDERS, QWEN_WORDS, build_qwen_tokenizer

PIPELINE_CLASS = {"flux2": Flux2KleinPipeline, "zimage": ZImagePipeline, "qwenimage": QwenImagePipeline}
# Qwen-Image's prompt template up to the prompt: the pipeline drops its first 34 tokens
QWEN_IMAGE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


def _weights(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.safetensors"))}


def test_tokenizer_matches_qwen_on_templates():
    tok = build_qwen_tokenizer()
    assert len(tok(QWEN_IMAGE_PREFIX).input_ids) == 34
    assert all(len(tok(w).input_ids) == 1 for w in QWEN_WORDS)
    assert tok.convert_ids_to_tokens(tok("a red circle").input_ids) == ["a", "Ġred", "Ġcircle"]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    messages = [{"role": "user", "content": "a red circle"}]
    chat = "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True) == chat
    no_think = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == chat + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_pipeline_reloads_and_generates(arch, tmp_path):
    path = BUILDERS[arch](tmp_path / arch)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 5 * 2**20
    pipe = PIPELINE_CLASS[arch].from_pretrained(path, local_files_only=True)
    assert isinstance(pipe, PIPELINE_CLASS[arch])
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt="a red circle on a blue background", height=32, width=32, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all() and images.std() > 0


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_seed_fixes_weights(arch, tmp_path):
    rng = torch.get_rng_state()
    first, again, other = (_weights(BUILDERS[arch](tmp_path / name, seed=seed)) for name, seed in
                           (("first", 0), ("again", 0), ("other", 1)))  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == again
    assert first.keys() == other.keys() and all(first[k] != other[k] for k in first)
