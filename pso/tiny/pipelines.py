"""Tiny, randomly initialised Stable Diffusion (1.x-style) and SDXL pipelines in diffusers format.

They build offline in about a second and a few MB, make 16x16 px images from 4x8x8 latents, and
exist so that the whole service can be tested without downloading a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pso.tiny.tokenizer import build_clip_tokenizer

TEXT_DIM = 32
# Stable Diffusion's noise schedule, which every tiny model uses
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def text_config(tokenizer: CLIPTokenizer, dim: int = TEXT_DIM, intermediate: int = 37) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder config whose special token ids are the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=dim,
        projection_dim=dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )


def _unet(arch: str, time_cond_proj_dim: int | None) -> UNet2DConditionModel:
    sdxl = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + TEXT_DIM,  # six size/crop ids + pooled text
        "transformer_layers_per_block": (1, 2),
        "use_linear_projection": True,
    }
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM if arch == "sdxl" else TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
        **(sdxl if arch == "sdxl" else {}),
    )
    return sharpen_attention(unet)


def sharpen_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every attention projection of a denoiser (UNet or transformer) with std 3/sqrt(fan_in).

    PyTorch's default init (std 1/sqrt(3 fan_in)) leaves attention nearly uniform over the prompt's
    tokens, so the prompt barely changes a tiny random model's image; the larger std makes it visibly do.
    """
    for module in model.modules():
        if not (hasattr(module, "to_q") and hasattr(module, "to_out")):
            continue
        outs = [module.to_out[0]] if len(module.to_out) else []
        for linear in [module.to_q, module.to_k, module.to_v, *outs, *(getattr(module, n, None) for n in _ADDED)]:
            if isinstance(linear, torch.nn.Linear):
                torch.nn.init.normal_(linear.weight, std=3 / linear.in_features**0.5)
    return model


_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # joint attention's text-stream projections


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of these parts, without safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _seeded(seed: int, build):
    """Build a component from a fixed seed without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_pipeline(
    out_dir: str | Path,
    arch: Literal["sd", "sdxl"] = "sd",
    *,
    seed: int = 0,
    time_cond_proj_dim: int | None = None,
    prediction_type: str = "epsilon",
) -> Path:
    """Save a tiny random `arch` pipeline to `out_dir`; the same seed gives identical weights.

    `time_cond_proj_dim` gives the UNet an LCM-style guidance embedding.
    """
    if arch not in ("sd", "sdxl"):
        raise ValueError(f"arch must be 'sd' or 'sdxl', not {arch!r}")
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    text_encoder = _seeded(seed, lambda: CLIPTextModel(text_config(tokenizer)))
    vae = _seeded(seed, _vae)
    unet = _seeded(seed, lambda: _unet(arch, time_cond_proj_dim))
    scheduler = EulerDiscreteScheduler(**SD_BETAS, prediction_type=prediction_type, steps_offset=1)
    if arch == "sd":
        pipe = sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    else:
        text_encoder_2 = _seeded(seed, lambda: CLIPTextModelWithProjection(text_config(tokenizer)))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2"),
            unet=unet,
            scheduler=scheduler,
        )
    return save_pipeline(pipe, out_dir)


def save_pipeline(pipe: DiffusionPipeline, out_dir: str | Path) -> Path:
    """Every tiny pipeline's folder: diffusers' own layout, safetensors weights."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
