"""FLUX.1 transformers (FluxPipeline: schnell, and dev-style guidance-embedded models).

Latents are kept unpacked (B, C, H, W), as `prepare_latents` draws them, and packed into 2x2 patches
around each transformer call with the pipeline's own helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import PackedFlowDenoiser


class FluxDenoiser(PackedFlowDenoiser):
    arch = "flux"
    # both streams of the double blocks (the single blocks' to_q/k/v too), as diffusers' FLUX LoRA scripts
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

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
