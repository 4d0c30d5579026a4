"""Z-Image transformers (ZImagePipeline: Z-Image-Turbo).

Reproduces `diffusers.pipelines.z_image.pipeline_z_image.ZImagePipeline.__call__` (diffusers 0.42.1):

- latents are drawn unpacked (B, C, H, W); the transformer takes a list of per-sample (C, 1, H, W) tensors
  (a frame axis of 1) and patchifies them itself;
- the transformer's time input is (1000 - t) / 1000 (0 = noise, 1 = clean), and the pipeline negates its
  output before `scheduler.step` (the model predicts x0 - noise, the scheduler steps along noise - x0);
- text embeddings are the Qwen3 encoder's second-to-last hidden states with padding dropped, one
  variable-length (L_i, D) tensor per prompt (kept as a per-sample list in `Conditioning.batched`);
- `set_timesteps` gets sigmas linspace(1, 1/N, N) and `mu` (which a static-shift scheduler ignores);
- classifier-free guidance is on whenever guidance_scale > 0 (not > 1), with the empty negative prompt,
  as pos + w (pos - neg) = neg + (1 + w) (pos - neg): the conditioning carries the effective scale 1 + w.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser, shift_mu

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s default


class ZImageDenoiser(Denoiser):
    arch = "zimage"

    def default_image_size(self) -> int:
        return 1024  # `height = height or 1024` in the pipeline's __call__

    def _check_size(self, image_size: int) -> None:
        multiple = self.vae_scale_factor * 2
        if image_size % multiple:
            raise ValueError(f"Z-Image needs an image size divisible by {multiple} (got {image_size})")

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        self._check_size(image_size)
        side = 2 * (image_size // (self.vae_scale_factor * 2))
        return (self.backbone.config.in_channels, side, side)

    def schedule(self, scheduler, num_steps, image_size):
        side = image_size // (self.vae_scale_factor * 2)  # patches per side: the transformer's 2x2 patches
        return {"sigmas": get_default_z_image_sigmas(num_steps), "mu": shift_mu(scheduler, side * side)}

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        do_cfg = guidance_scale > 0  # the pipeline's own rule (`do_classifier_free_guidance`)
        # copies: the pipeline's `_encode_prompt` rewrites the list it is given with the chat template
        embeds, neg = self.pipe.encode_prompt(
            list(prompts),
            device=self.device,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=["" for _ in prompts] if do_cfg else None,
            max_sequence_length=self.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
        )
        if not do_cfg:
            return Conditioning({"cap_feats": list(embeds)}, guidance_scale=guidance_scale)
        return Conditioning(
            {"cap_feats": list(embeds)},
            uncond=Conditioning({"cap_feats": list(neg)}),
            guidance_scale=1.0 + guidance_scale,  # pos + w (pos - neg) = neg + (1 + w) (pos - neg)
        )

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        frames = list(x.unsqueeze(2).unbind(0))  # B tensors of (C, 1, H, W)
        time = (1000 - t.float().expand(x.shape[0])) / 1000
        out = backbone(frames, time, return_dict=False, **cond.batched, **cond.shared)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        # the pipeline's VAE step: scaling and shift factor only (latents_mean/std are not used)
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self._vae_decode(latents)
