"""SD and SDXL UNets (every UNet family: SD-Turbo, SDXL-Turbo, LCM, TCD, DMD2, Lightning, Hyper-SD)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser


class SDUNetDenoiser(Denoiser):
    arch = "sd"
    component = "unet"
    kohya_prefix = "unet."

    def _embed(self, prompts: list[str], do_cfg: bool, image_size: int):
        """(cond kwargs, uncond kwargs or None) for the UNet: text states and any added conditioning."""
        embeds, neg = self.pipe.encode_prompt(prompts, self.device, 1, do_cfg)
        return {"encoder_hidden_states": embeds}, None if neg is None else {"encoder_hidden_states": neg}

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        # LCM UNets take guidance as a w-embedding instead of CFG (the pipeline's own rule)
        w_dim = self.backbone.config.time_cond_proj_dim
        do_cfg = guidance_scale > 1 and w_dim is None
        cond, uncond = self._embed(prompts, do_cfg, image_size)
        if w_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(len(prompts))
            embedding = self.pipe.get_guidance_scale_embedding(w, embedding_dim=w_dim)
            cond["timestep_cond"] = embedding.to(self.device, cond["encoder_hidden_states"].dtype)
        return Conditioning(cond, uncond=Conditioning(uncond) if do_cfg else None, guidance_scale=guidance_scale)

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return backbone(x, t, **cond.batched, **cond.shared).sample

    def save_lora(self, out: Path, layers: dict[str, Tensor], metadata: dict | None) -> None:
        """UNet layers in diffusers' naming (converted from peft's), as its UNet LoRA training scripts write them."""
        from diffusers.utils import convert_state_dict_to_diffusers

        super().save_lora(out, convert_state_dict_to_diffusers(layers), metadata)


class SDXLUNetDenoiser(SDUNetDenoiser):
    arch = "sdxl"

    def _embed(self, prompts, do_cfg, image_size):
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
        )
        size = (image_size, image_size)
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if not do_cfg:
            return cond, None
        neg_added = {"text_embeds": neg_pooled, "time_ids": time_ids}
        return cond, {"encoder_hidden_states": neg, "added_cond_kwargs": neg_added}
