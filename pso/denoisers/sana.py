"""SANA-Sprint transformers (SanaSprintPipeline: a SanaTransformer2DModel on TrigFlow angles, Gemma-2, DC-AE).

The pipeline keeps its latents scaled by the scheduler's sigma_data and converts around each transformer
call (pipeline_sana_sprint.py, the denoising loop): the TrigFlow angle t becomes the flow-matching time
s = sin t / (sin t + cos t), the input is rescaled to a flow-matching state, and the model's flow velocity is
turned back into the TrigFlow velocity F that `SCMScheduler.step` takes. `forward` does the same, so it
returns F for the pipeline's latents x (pso/samplers.py SCMSampler turns its states into those latents with
`model_input`).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from pso.conditioning import Conditioning
from pso.denoisers.base import Denoiser

# SanaSprintPipeline.__call__'s defaults (pipeline_sana_sprint.py: height=width=1024, max_timesteps=1.57080,
# intermediate_timesteps=1.3, which SCMScheduler allows only at 2 steps, max_sequence_length=300)
DEFAULT_IMAGE_SIZE = 1024
MAX_TIMESTEPS = 1.57080
INTERMEDIATE_TIMESTEPS = {2: 1.3}
MAX_SEQUENCE_LENGTH = 300


class SanaSprintDenoiser(Denoiser):
    arch = "sana"

    def default_image_size(self) -> int:
        return DEFAULT_IMAGE_SIZE  # the pipeline's own default, not sample_size * vae_scale_factor

    def schedule(self, scheduler, num_steps, image_size):
        return {"max_timesteps": MAX_TIMESTEPS, "intermediate_timesteps": INTERMEDIATE_TIMESTEPS.get(num_steps)}

    @property
    def sigma_data(self) -> float:
        return float(self.pipe.scheduler.config.sigma_data)

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, image_size: int) -> Conditioning:
        # the pipeline prepends its default "complex human instruction" to every prompt before Gemma encodes it
        instruction = inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default
        embeds, mask = self.pipe.encode_prompt(
            prompts,
            device=self.device,
            max_sequence_length=self.max_sequence_length or MAX_SEQUENCE_LENGTH,
            complex_human_instruction=instruction,
        )
        # guidance is embedded, never CFG: guidance_scale times the transformer's guidance_embeds_scale
        guidance = torch.full((len(prompts),), guidance_scale, device=self.device, dtype=torch.float32)
        guidance = guidance.to(embeds.dtype) * self.backbone.config.guidance_embeds_scale
        batched = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "guidance": guidance}
        return Conditioning(batched, guidance_scale=guidance_scale)

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        sigma_data = self.sigma_data
        timestep = t.to(x.device, torch.float32)
        scm_timestep = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = scm_timestep.view(-1, 1, 1, 1)
        scale = torch.sqrt(s**2 + (1 - s) ** 2)
        model_input = x.float() / sigma_data * scale  # the pipeline's latents are float32
        out = backbone(
            model_input.to(x.dtype),
            encoder_hidden_states=cond.batched["encoder_hidden_states"].to(x.dtype),
            encoder_attention_mask=cond.batched["encoder_attention_mask"],
            guidance=cond.batched["guidance"],
            timestep=scm_timestep,
            return_dict=False,
        )[0]
        out = ((1 - 2 * s) * model_input + (1 - 2 * s + 2 * s**2) * out) / scale
        return out.float() * sigma_data
