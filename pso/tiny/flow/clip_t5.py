"""Tiny random FLUX.1-schnell and SD3.5 pipelines: flow-matching transformers conditioned on CLIP and T5.

Both make 32x32 px images from 16x8x8 latents (a VAE with scale factor 4), and the transformers see
4x4 = 16 image tokens: FLUX packs 2x2 latent patches, SD3 embeds them with patch size 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from pso.random_arch import FLUX_SCHNELL_SCHEDULER, FLUX_VAE_SCALE
from pso.tiny.pipelines import TEXT_DIM, _seeded, save_pipeline, sharpen_attention, text_config
from pso.tiny.tokenizer import TOKENIZER_WORDS, build_clip_tokenizer

T5_DIM = 2 * TEXT_DIM  # SD3 pads the two CLIPs' concatenated hidden states to the T5 width
LATENT_CHANNELS = 16
LATENT_SIDE = 8
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
TINY_T5 = dict(d_model=T5_DIM, d_kv=16, d_ff=96, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32)  # fmt: skip


def build_t5_tokenizer(out_dir: str | Path) -> T5TokenizerFast:
    """Write a Unigram T5 tokenizer to `out_dir` and load it: `<pad>`=0, `</s>`=1, `<unk>`=2, then one
    piece per tiny-world word and single characters for any other text."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -3.0) for word in TOKENIZER_WORDS]
    vocab += [(c, -10.0) for c in T5_CHARS]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)


def t5_encoder(tokenizer: T5TokenizerFast, widths: dict | None = None, num_layers: int = 2) -> T5EncoderModel:
    """A T5 v1.1-style (gated-GELU) encoder over `tokenizer`'s vocabulary: `widths` (d_model, d_kv, d_ff,
    num_heads, relative-attention buckets; default TINY_T5) and `num_layers` layers."""
    config = T5Config(
        vocab_size=len(tokenizer),
        **(TINY_T5 if widths is None else widths),
        num_layers=num_layers,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def vae16(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 16-latent-channel VAE with scale factor 4 and no quant convs, as FLUX's and SD3's."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random FLUX.1-schnell-style FluxPipeline to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(out_dir / "tokenizer_2")
    transformer = _seeded(
        seed,
        lambda: sharpen_attention(
            FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * LATENT_CHANNELS,  # packed 2x2 latent patches
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=T5_DIM,
                pooled_projection_dim=TEXT_DIM,
                guidance_embeds=False,
                axes_dims_rope=(4, 6, 6),
            )
        ),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
        vae=_seeded(seed, lambda: vae16(**FLUX_VAE_SCALE)),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(text_config(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed, lambda: t5_encoder(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return save_pipeline(pipe, out_dir)


def build_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SD3.5-style StableDiffusion3Pipeline (QK-norm, a dual-attention block) to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_3 = build_t5_tokenizer(out_dir / "tokenizer_3")
    transformer = _seeded(
        seed,
        lambda: sharpen_attention(
            SD3Transformer2DModel(
                sample_size=LATENT_SIDE,
                patch_size=2,
                in_channels=LATENT_CHANNELS,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=T5_DIM,
                caption_projection_dim=32,  # the transformer width, heads x head dim
                pooled_projection_dim=2 * TEXT_DIM,  # both CLIPs' projections, concatenated
                out_channels=LATENT_CHANNELS,
                pos_embed_max_size=16,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            )
        ),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_seeded(seed, lambda: vae16(scaling_factor=1.5305, shift_factor=0.0609)),
        text_encoder=_seeded(seed, lambda: CLIPTextModelWithProjection(text_config(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed + 1, lambda: CLIPTextModelWithProjection(text_config(tokenizer))),
        tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2"),
        text_encoder_3=_seeded(seed, lambda: t5_encoder(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )
    return save_pipeline(pipe, out_dir)


BUILDERS: dict[str, Callable[..., Path]] = {"flux": build_flux, "sd3": build_sd3}
