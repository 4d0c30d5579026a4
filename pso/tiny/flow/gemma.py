"""A tiny, randomly initialised SANA-Sprint pipeline (SanaSprintPipeline) in diffusers format.

Its parts are configured like Sana-Sprint's (a SanaTransformer2DModel with guidance embeddings and
RMS qk norm across heads, a DC-AE, a Gemma-2 text encoder, the SCM scheduler) but tiny: a 3-level
DC-AE (4x, not 32x, compression) turns 8x8x8 latents into 32x32 px images, the smallest size the
pipeline accepts. Call it with `use_resolution_binning=False`: the default binning generates at
SANA's 1024 px buckets and resizes down (it works, but takes about a second more).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from pso.tiny.pipelines import _seeded, save_pipeline, sharpen_attention
from pso.tiny.tokenizer import TOKENIZER_WORDS, merges_joining

TEXT_DIM = 32
LATENT_CHANNELS = 8
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0-4
SPACE = "▁"  # SentencePiece's word boundary, which Gemma's normalizer puts for each space


def instruction_words() -> list[str]:
    """The words of the pipeline's default complex human instruction, which it prepends to prompts."""
    lines = inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"].default
    return list(dict.fromkeys(re.findall(r"[A-Za-z]+", " ".join(lines))))


def build_gemma_tokenizer(words: Sequence[str] | None = None) -> GemmaTokenizer:
    """A Gemma BPE tokenizer in which each of `words`, alone or after a space, is one token.

    Its vocabulary is Gemma's special tokens, the 256 byte-fallback tokens, printable ASCII and "▁",
    then one token per merge; any text tokenizes. It adds <bos> like Gemma's. By default the words
    are the tiny world's and the pipeline's instruction's, so that the instruction stays short.
    """
    words = [*TOKENIZER_WORDS, *instruction_words()] if words is None else words
    merges = merges_joining(list(form) for word in words for form in (word, SPACE + word))
    alphabet = [SPACE, *map(chr, range(ord("!"), ord("~") + 1))]
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *alphabet, *map("".join, merges)]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, add_bos_token=True)


def _text_encoder(tokenizer: GemmaTokenizer) -> Gemma2Model:
    """A 2-layer Gemma-2 (one sliding-window and one global layer, grouped-query attention)."""
    encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    )
    # Gemma's embeddings (std 0.02, times sqrt(width)) are small beside its normalised attention
    # outputs, so each token's output would mostly echo the long shared instruction before it;
    # unit-std embeddings keep the prompt's tokens distinct.
    torch.nn.init.normal_(encoder.embed_tokens.weight)
    return encoder


def _vae() -> AutoencoderDC:
    """DC-AE as SANA's (ResBlocks, then EfficientViT blocks; conv down, interpolating up), 3 levels."""
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 16, 32),
        decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _transformer() -> SanaTransformer2DModel:
    """Sana-Sprint's transformer settings (guidance embedding, qk norm, patch 1) at width 16, 2 layers."""
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,  # the pipeline's resolution binning requires Sana-Sprint's 32
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        guidance_embeds=True,
        guidance_embeds_scale=0.1,
        qk_norm="rms_norm_across_heads",
    )
    return sharpen_attention(transformer)


def build_sana(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SANA-Sprint pipeline to `out_dir`; the same seed gives identical weights."""
    out_dir = Path(out_dir)
    tokenizer = build_gemma_tokenizer()
    pipe = SanaSprintPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed, lambda: _text_encoder(tokenizer)),
        vae=_seeded(seed, _vae),
        transformer=_seeded(seed, _transformer),
        scheduler=SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5),
    )
    return save_pipeline(pipe, out_dir)


BUILDERS = {"sana": build_sana}
