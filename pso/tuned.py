"""A model with trained weights applied, whatever form they come in (`pso sample`, `pso eval`).

    a weight bundle (.psow), a learner checkpoint or a run folder (pso/export.py: locate_weights)
    an exported LoRA: a folder holding `pytorch_lora_weights.safetensors` (diffusers) or the kohya file,
    or a LoRA .safetensors file from elsewhere (ComfyUI, A1111, the Hub), read by the pipeline's own
    `load_lora_weights`, which knows every key convention diffusers converts

Whatever the form, the policy's reference model is the base model, so `reference=True` samples compare
base and tuned from the same noise.
"""

from __future__ import annotations

from pathlib import Path

from pso.codecs import decode_weights
from pso.config.schema import ModelConfig
from pso.export import DIFFUSERS_FILE, KOHYA_FILE, locate_weights
from pso.policy import DistilledPolicy


def load_tuned(model_cfg: ModelConfig, weights: Path | None) -> DistilledPolicy:
    """The model of `model_cfg` with `weights` applied (the base model alone when None)."""
    if weights is None:
        return DistilledPolicy.from_config(model_cfg, None)
    lora = _lora_file(weights)
    if lora is None:
        bundle = decode_weights(locate_weights(weights).read_bytes())
        policy = DistilledPolicy.from_config(model_cfg, DistilledPolicy.finetune_of(bundle))
        policy.load_weights(bundle)
        return policy
    policy = DistilledPolicy.from_config(model_cfg, None)
    policy.pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    if not policy.backbone._hf_peft_config_loaded:
        raise ValueError(
            f"{lora}: no LoRA layers for this model's {policy.denoiser.component} ({model_cfg.pretrained})"
        )
    if any(getattr(m, "_hf_peft_config_loaded", False) for m in policy.denoiser.frozen_modules()):
        # the prompts are encoded once for base and tuned alike: a text-encoder LoRA would change both
        raise ValueError(
            f"{lora}: has text-encoder layers; only {policy.denoiser.component} LoRAs can be compared with their base"
        )
    return policy


def _lora_file(path: Path) -> Path | None:
    """The LoRA file `path` names (an exported folder, or a .safetensors file), or None for our own forms."""
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if (path / "model_index.json").is_file():
        raise ValueError(
            f"{path} is a whole pipeline (a full fine-tuning export): give it as the model (--model {path}); "
            "it has no base model inside to compare with"
        )
    return next((path / n for n in (DIFFUSERS_FILE, KOHYA_FILE) if (path / n).is_file()), None)
