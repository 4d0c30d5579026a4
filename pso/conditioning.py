"""Text conditioning for SD and SDXL UNets, computed once per prompt and reused for every step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from pso.loading import pipeline_arch


@dataclass
class Conditioning:
    """UNet conditioning for a batch. `uncond` is set when classifier-free guidance is on."""

    prompt_embeds: Tensor
    added_cond: dict[str, Tensor] | None = None  # SDXL: pooled text_embeds and time_ids
    timestep_cond: Tensor | None = None  # LCM guidance (w) embedding
    uncond: Conditioning | None = None
    guidance_scale: float = 0.0

    def index(self, idx: Tensor | slice) -> Conditioning:
        """Select rows (e.g. repeat each prompt G times, or take a micro-batch)."""
        return replace(
            self,
            prompt_embeds=self.prompt_embeds[idx],
            added_cond=None if self.added_cond is None else {k: v[idx] for k, v in self.added_cond.items()},
            timestep_cond=None if self.timestep_cond is None else self.timestep_cond[idx],
            uncond=None if self.uncond is None else self.uncond.index(idx),
        )

    @classmethod
    def cat(cls, items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension (all items share guidance settings)."""
        first = items[0]

        def cat(get):
            return None if get(first) is None else torch.cat([get(c) for c in items])

        return replace(
            first,
            prompt_embeds=cat(lambda c: c.prompt_embeds),
            added_cond=None
            if first.added_cond is None
            else {k: torch.cat([c.added_cond[k] for c in items]) for k in first.added_cond},
            timestep_cond=cat(lambda c: c.timestep_cond),
            uncond=None if first.uncond is None else cls.cat([c.uncond for c in items]),
        )

    def unet_kwargs(self) -> dict:
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "added_cond_kwargs": self.added_cond,
            "timestep_cond": self.timestep_cond,
        }


@torch.no_grad()
def encode_prompts(
    pipe: DiffusionPipeline, prompts: list[str], guidance_scale: float, image_size: tuple[int, int]
) -> Conditioning:
    """Encode prompts the way the pipeline's own __call__ does (same CFG and w-embedding rules)."""
    device = pipe.unet.device
    w_dim = pipe.unet.config.time_cond_proj_dim
    do_cfg = guidance_scale > 1 and w_dim is None
    added = neg_added = None
    if pipeline_arch(pipe) == "sdxl":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
        )
        time_ids = (
            pipe._get_add_time_ids(
                image_size,
                (0, 0),
                image_size,
                dtype=embeds.dtype,
                text_encoder_projection_dim=int(pooled.shape[-1]),
            )
            .to(device)
            .repeat(len(prompts), 1)
        )
        added = {"text_embeds": pooled, "time_ids": time_ids}
        if do_cfg:
            neg_added = {"text_embeds": neg_pooled, "time_ids": time_ids}
    else:
        embeds, neg = pipe.encode_prompt(prompts, device, 1, do_cfg)
    timestep_cond = None
    if w_dim is not None:
        w = torch.tensor(guidance_scale - 1).repeat(len(prompts))
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=w_dim).to(device, embeds.dtype)
    uncond = Conditioning(neg, neg_added) if do_cfg else None
    return Conditioning(embeds, added, timestep_cond, uncond, guidance_scale)
