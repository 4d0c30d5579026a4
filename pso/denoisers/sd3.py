"""Stable Diffusion 3 / 3.5 MMDiT transformers (StableDiffusion3Pipeline: SD3.5 Large Turbo).

Reproduces `StableDiffusion3Pipeline.__call__` (diffusers 0.42.1): latents stay (B, C, H, W) (the transformer
patchifies them itself), the scheduler timestep goes in as is (noise = 1000), the text conditioning is the CLIP-L
+ CLIP-G + T5 sequence with the two CLIPs' pooled projections, and classifier-free guidance runs only when
`guidance_scale > 1`, with the negative prompt "" (the pipeline's default).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser, shift_mu


class SD3Denoiser(Denoiser):
    arch = "sd3"
    # the joint attention's image and text streams (attn), and SD3.5's second image attention (attn2)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def default_image_size(self) -> int:
        # the pipeline's default_sample_size: the transformer's sample_size (128 for SD3.5 -> 1024 px)
        return self.pipe.default_sample_size * self.vae_scale_factor

    def schedule(self, scheduler, num_steps, image_size):
        # the pipeline passes no sigmas; it computes `mu` only for a scheduler with dynamic shifting (the
        # SD3.5 Turbo recipe pins static shift 3.0, so the step count alone sets the grid)
        cfg = scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return {}
        side = image_size // self.vae_scale_factor // self.backbone.config.patch_size
        return {"num_inference_steps": num_steps, "mu": shift_mu(scheduler, side * side, max_shift=1.16)}

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        do_cfg = guidance_scale > 1
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            max_sequence_length=self.max_sequence_length or 256,
        )
        uncond = None
        if do_cfg:
            uncond = Conditioning({"encoder_hidden_states": neg, "pooled_projections": neg_pooled})
        return Conditioning(
            {"encoder_hidden_states": embeds, "pooled_projections": pooled},
            uncond=uncond,
            guidance_scale=guidance_scale,
        )

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return backbone(hidden_states=x, timestep=t, return_dict=False, **cond.batched, **cond.shared)[0]
