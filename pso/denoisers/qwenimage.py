"""Qwen-Image transformers (QwenImagePipeline: Qwen-Image with the Qwen-Image-Lightning LoRA fused).

The pipeline draws latents as (B, 1, C, H, W) (a frame dimension for its video-style VAE) and packs them
into 2x2 patches at once. The state is kept unpacked and frameless, (B, C, H, W) with the same values (the
frame has size 1), and packed around each transformer call with the pipeline's own helpers; the frame is
added back for the VAE.

Prompts: the pipeline pads a batch's Qwen2.5-VL embeddings to its longest prompt and passes the padding
mask, or no mask when nothing is padded. Each sample keeps its unpadded embedding here (a per-sample list),
and `forward` pads a batch the same way, so any selection of rows sees what the pipeline would give it.

diffusers 0.42.1's `QwenImagePipeline.encode_prompt` pairs masks with the wrong prompts when
`num_images_per_prompt > 1` and prompts differ in length (embeds repeated [p0, p0, p1, p1], masks
[p0, p1, p0, p1]; huggingface/diffusers#13581, fix in #14147); PSO encodes one row per prompt, which it
gets right.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import PackedFlowDenoiser

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default


class QwenImageDenoiser(PackedFlowDenoiser):
    arch = "qwenimage"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        # `guidance_scale` is the pipeline's `true_cfg_scale`; Qwen-Image has no guidance embedding
        if guidance_scale > 1:
            raise ValueError(
                f"guidance_scale {guidance_scale}: Qwen-Image's true CFG needs a negative prompt and rescales the "
                "guided prediction to the conditional one's norm, which PSO does not model; Qwen-Image-Lightning "
                "is distilled for true_cfg_scale 1.0 (no CFG): set guidance_scale to 1.0 or less"
            )
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length or MAX_SEQUENCE_LENGTH
        )
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        # the pipeline's masks are ones then zeros: the unpadded embedding is a prefix
        return Conditioning({"encoder_hidden_states": [e[:n] for e, n in zip(embeds, lengths)]}, guidance_scale=1.0)

    @staticmethod
    def _pad(embeds: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Pad to the longest embedding with zeros, as `_get_qwen_prompt_embeds` does; no mask if none is padded."""
        longest = max(e.shape[0] for e in embeds)
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        if all(e.shape[0] == longest for e in embeds):
            return padded, None
        mask = torch.stack(
            [torch.arange(longest, device=padded.device) < e.shape[0] for e in embeds]
        ).long()  # the pipeline's mask dtype
        return padded, mask

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        b, c, h, w = x.shape
        embeds, mask = self._pad(cond.batched["encoder_hidden_states"])
        out = backbone(
            hidden_states=self.pipe._pack_latents(x, b, c, h, w),
            timestep=t.to(x.dtype) / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        return self.pipe._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        latents = latents[:, :, None].to(vae.dtype)  # the frame dimension
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
        latents = latents / inv_std + mean  # the pipeline's arithmetic, for bit-equal images
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def vae_encode(self, images: Tensor) -> Tensor:
        # the img2img pipeline's rule: (z - latents_mean) / latents_std, through the frame dimension
        cfg = self.pipe.vae.config
        latents = self._vae_mode(images, frames=True)
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
        return (latents - mean) / torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
