"""One model kind behind one interface: how a backbone (UNet or transformer) is conditioned, called,
sized, decoded and exported.

The contract every denoiser keeps: `forward(backbone, x, t, cond)` returns exactly the `model_output`
the pipeline's own loop hands to `scheduler.step` for state `x` at scheduler timestep `t` (after the
scheduler's `scale_model_input`), so the samplers (pso/samplers.py) reproduce the pipeline. States are
kept in the pipeline's unpacked latent layout (B, C, H, W); a denoiser that packs patches does it inside
`forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from pso.conditioning import Conditioning


class Denoiser(ABC):
    arch: ClassVar[str]  # the name family recipes and `pso tiny random --arch` use
    component: ClassVar[str] = "transformer"  # the pipeline attribute holding the trainable backbone
    # the prefix diffusers' kohya converter is given: it turns "unet." into "lora_unet_"; transformer keys
    # get "lora_transformer_", the form ComfyUI reads for diffusers-named FLUX and SD3 LoRAs
    kohya_prefix: ClassVar[str] = "lora_transformer."
    # LoRA's default targets: the attention projections (a transformer with a text stream adds its own)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe: DiffusionPipeline, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.pipe, self.component)

    def frozen_modules(self) -> list[nn.Module]:
        """Every other model of the pipeline (VAE, text encoders): never trained."""
        return [m for n, m in self.pipe.components.items() if isinstance(m, nn.Module) and n != self.component]

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def default_image_size(self) -> int:
        return self.backbone.config.sample_size * self.vae_scale_factor

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """The shape of one sample's starting noise, as the pipeline's `prepare_latents` draws it."""
        side = image_size // self.vae_scale_factor
        return (self.backbone.config.in_channels, side, side)

    def schedule(self, scheduler: SchedulerMixin, num_steps: int, image_size: int) -> dict:
        """What the pipeline passes to `scheduler.set_timesteps` ({}: the step count alone)."""
        return {}

    @abstractmethod
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        """Encode prompts the way the pipeline's own __call__ does (same guidance rules)."""

    @abstractmethod
    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The unguided model output for states x (B, ...) at scheduler timesteps t (B,)."""

    def predict(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, guided: bool = True) -> Tensor:
        """`forward`, combined with the unconditional branch when the conditioning carries one."""
        if cond.uncond is None or not guided:
            return self.forward(backbone, x, t, cond)
        out_uncond, out_cond = self.forward(
            backbone, torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([cond.uncond, cond])
        ).chunk(2)
        return out_uncond + cond.guidance_scale * (out_cond - out_uncond)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images in [0, 1], (B, 3, H, W) float32, as the pipeline's VAE step does."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        cfg = vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (latents.ndim - 2)
            latents = latents * torch.tensor(std).view(shape).to(latents) / cfg.scaling_factor
            latents = latents + torch.tensor(mean).view(shape).to(latents)
        else:
            latents = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return self._vae_decode(latents)

    @torch.no_grad()
    def vae_encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] to final sampler states, the inverse of `decode` up to the VAE's own
        error (target images: pso/targets.py)."""
        latents = self._vae_mode(images)
        cfg = self.pipe.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (latents.ndim - 2)
            latents = latents - torch.tensor(mean).view(shape).to(latents)
            return latents * cfg.scaling_factor / torch.tensor(std).view(shape).to(latents)
        return (latents - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor

    def _vae_mode(self, images: Tensor, frames: bool = False) -> Tensor:
        """The VAE's deterministic latents of images in [0, 1] (the distribution's mode; DC-AE's latent),
        float32; `frames`: through a video VAE, with a frame dimension of size 1."""
        vae = self.pipe.vae
        x = (images.to(vae.device, torch.float32) * 2 - 1).to(vae.dtype)
        out = vae.encode(x[:, :, None] if frames else x)
        dist = getattr(out, "latent_dist", None)
        latents = (dist.mode() if dist is not None else out.latent).float()
        return latents[:, :, 0] if frames else latents

    def _vae_decode(self, latents: Tensor) -> Tensor:
        image = self.pipe.vae.decode(latents).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def save_lora(self, out: Path, layers: dict[str, Tensor], metadata: dict | None) -> None:
        """Write LoRA layers (peft's names) with the pipeline class's own writer, as diffusers' transformer LoRA
        scripts do: under peft's lora_A / lora_B names, which its loaders read for any target module."""
        type(self.pipe).save_lora_weights(
            out,
            **{f"{self.component}_lora_layers": layers, f"{self.component}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )


def shift_mu(scheduler: SchedulerMixin, image_seq_len: int, max_shift: float = 1.15) -> float:
    """The shift `mu` FLUX-style pipelines compute from the image's token count (diffusers' `calculate_shift`,
    copied into each of those pipelines, with the scheduler's settings and the pipeline's defaults)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    return calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", max_shift),
    )


class PackedFlowDenoiser(Denoiser):
    """Transformers fed 2x2 patches of the latents (FLUX.1, Qwen-Image): their pipelines draw (C, H, W) noise,
    size images from `default_sample_size` and pass sigmas linspace(1, 1/N, N) with a shift for the image's
    token count."""

    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        side = 2 * (image_size // (self.vae_scale_factor * 2))
        return (self.backbone.config.in_channels // 4, side, side)

    def schedule(self, scheduler, num_steps, image_size):
        side = image_size // (self.vae_scale_factor * 2)
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": shift_mu(scheduler, side * side)}
