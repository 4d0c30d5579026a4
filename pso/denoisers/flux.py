"""FLUX.1 transformers (FluxPipeline: schnell, and dev-style guidance-embedded models).

Latents are kept unpacked (B, C, H, W), as `prepare_latents` draws them, and packed into 2x2 patches
around each transformer call with the pipeline's own helpers.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser


class FluxDenoiser(Denoiser):
    arch = "flux"

    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        side = 2 * (image_size // (self.vae_scale_factor * 2))
        return (self.backbone.config.in_channels // 4, side, side)

    def schedule(self, scheduler, num_steps, image_size):
        side = image_size // (self.vae_scale_factor * 2)
        cfg = scheduler.config
        mu = calculate_shift(
            side * side,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        # FluxPipeline's true CFG needs a negative prompt, which PSO does not use: guidance, if any, is embedded
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length or 512
        )
        batched = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.backbone.config.guidance_embeds:
            batched["guidance"] = torch.full((len(prompts),), guidance_scale, device=self.device, dtype=torch.float32)
        return Conditioning(batched, shared={"txt_ids": text_ids}, guidance_scale=guidance_scale)

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = backbone(
            hidden_states=packed,
            timestep=t.to(x.dtype) / 1000,
            img_ids=img_ids,
            return_dict=False,
            **cond.batched,
            **cond.shared,
        )[0]
        scale = self.vae_scale_factor
        return self.pipe._unpack_latents(out, h * scale, w * scale, scale)
