"""FLUX.2 transformers (Flux2KleinPipeline: FLUX.2 [klein], distilled or base).

The state is the pipeline's starting noise as `prepare_latents` draws it: already 2x2-patchified,
(B, 4 C, H / 2, W / 2) in VAE-latent units, so the same generators give the same noise. The pipeline packs
it row-major into tokens, (B, H/2 * W/2, 4 C), and `_unpack_latents_with_ids` scatters the tokens back by
their position ids, which is the inverse reshape; `forward` packs and unpacks around each transformer call.
`decode` undoes the VAE's batch-norm latent statistics and the patchify before the VAE decoder, as the
pipeline does after its loop.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser


class Flux2Denoiser(Denoiser):
    arch = "flux2"
    # both streams of the double blocks and the single blocks' fused QKV+MLP input (their output projection,
    # `attn.to_out`, shares its name with the double blocks' ModuleList and cannot be named on its own)
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj"
    )  # fmt: skip

    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        side = image_size // (self.vae_scale_factor * 2)  # prepare_latents: 2 * (size // (2 f)) // 2
        return (self.backbone.config.in_channels, side, side)

    def schedule(self, scheduler, num_steps, image_size):
        # __call__ step 6: mu from the packed sequence length and the step count (dynamic exponential shift)
        side = image_size // (self.vae_scale_factor * 2)
        mu = compute_empirical_mu(image_seq_len=side * side, num_steps=num_steps)
        if scheduler.config.get("use_flow_sigmas"):
            return {"mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.pipe.encode_prompt(prompts, device=self.device, max_sequence_length=self.max_sequence_length or 512)

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        embeds, text_ids = self._encode(prompts)
        # the transformer reads one set of text position ids (txt_ids[0]); they depend only on the padded length
        cond = Conditioning({"encoder_hidden_states": embeds}, shared={"txt_ids": text_ids[0]})
        # distilled checkpoints ignore guidance (no CFG, no guidance embedding); base ones run true CFG against
        # the empty prompt when guidance_scale > 1 (Flux2KleinPipeline.do_classifier_free_guidance)
        if guidance_scale > 1 and not self.pipe.config.is_distilled:
            neg_embeds, _ = self._encode([""] * len(prompts))
            uncond = Conditioning({"encoder_hidden_states": neg_embeds}, shared=cond.shared)
            return Conditioning(cond.batched, cond.shared, uncond=uncond, guidance_scale=guidance_scale)
        return cond

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        b, c, h, w = x.shape
        packed = x.reshape(b, c, h * w).permute(0, 2, 1)  # Flux2KleinPipeline._pack_latents
        out = backbone(
            hidden_states=packed,
            timestep=t.to(x.dtype) / 1000,
            guidance=None,
            img_ids=self.pipe._prepare_latent_ids(x).to(x.device),
            return_dict=False,
            **cond.batched,
            **cond.shared,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return self._vae_decode(self.pipe._unpatchify_latents(latents * std + mean))

    @torch.no_grad()
    def vae_encode(self, images: Tensor) -> Tensor:
        # the pipeline's prepare_image_latents: patchify, then the VAE's batch-norm statistics
        vae = self.pipe.vae
        latents = self.pipe._patchify_latents(self._vae_mode(images))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return (latents - mean) / std
