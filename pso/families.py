"""Recipes for the timestep-distilled model families PSO tunes.

Each recipe pins the scheduler settings a family was distilled for (never trust the
scheduler config shipped with a checkpoint: SDXL-Turbo's "leading" spacing gives timestep 1
instead of 999). The table is kept in step with docs/families.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SamplerKind = Literal["lcm", "tcd", "euler_ancestral", "euler", "ddim", "flow_euler"]
Arch = Literal["sd", "sdxl", "flux", "flux2", "zimage", "sd3", "qwenimage", "sana"]


class UnsupportedFamilyError(ValueError):
    """A known family that this version cannot run yet, or an unknown family name."""


@dataclass(frozen=True)
class FamilyRecipe:
    name: str
    arch: tuple[Arch, ...]
    sampler: SamplerKind
    default_steps: int
    steps: tuple[int, ...]
    guidance_scale: float
    description: str
    scheduler_settings: dict = field(default_factory=dict)
    # Custom timestep tables (step count -> timesteps), for families trained on their own grid.
    custom_timesteps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    eta: float = 0.0
    # Prediction type per step count where it differs from the checkpoint's (SDXL-Lightning 1-step).
    prediction_type: dict[int, str] = field(default_factory=dict)
    example_hub_id: str = ""
    # the text encoder's token budget where the family's pipeline default is wrong for it (FLUX.1-schnell: 256)
    max_sequence_length: int | None = None


_TRAILING = {"timestep_spacing": "trailing"}
_LCM = {"timestep_spacing": "leading", "original_inference_steps": 50, "timestep_scaling": 10.0}

FAMILIES: dict[str, FamilyRecipe] = {
    r.name: r
    for r in [
        FamilyRecipe(
            "sd-turbo",
            ("sd",),
            "euler",
            1,
            (1, 2, 3, 4),
            0.0,
            "SD-Turbo (ADD, 512 px). The hub sampler is deterministic Euler; set sampler "
            "euler_ancestral for online PSO.",
            _TRAILING,
            example_hub_id="stabilityai/sd-turbo",
        ),
        FamilyRecipe(
            "sdxl-turbo",
            ("sdxl",),
            "euler_ancestral",
            1,
            (1, 2, 3, 4),
            0.0,
            "SDXL-Turbo (ADD, 512 px), Euler ancestral with trailing spacing.",
            _TRAILING,
            example_hub_id="stabilityai/sdxl-turbo",
        ),
        FamilyRecipe(
            "lcm",
            ("sd", "sdxl"),
            "lcm",
            4,
            (1, 2, 3, 4, 5, 6, 7, 8),
            8.0,
            "Latent Consistency Model UNet; guidance enters as a w-embedding, not CFG.",
            _LCM,
            example_hub_id="SimianLuo/LCM_Dreamshaper_v7",
        ),
        FamilyRecipe(
            "lcm-lora",
            ("sd", "sdxl"),
            "lcm",
            4,
            (2, 3, 4, 5, 6, 7, 8),
            1.0,
            "Base model with a fused LCM-LoRA (guidance 1-2 as CFG; 1.0 disables CFG).",
            _LCM,
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "tcd",
            ("sd", "sdxl"),
            "tcd",
            4,
            (1, 2, 3, 4, 5, 6, 7, 8),
            0.0,
            "Trajectory Consistency Distillation LoRA; gamma (eta) controls the stochasticity.",
            _LCM,
            eta=0.3,
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "sdxl-dmd2",
            ("sdxl",),
            "lcm",
            4,
            (1, 4),
            0.0,
            "SDXL-DMD2 (1024 px): LCM sampler on DMD2's own timestep grid.",
            _LCM,
            custom_timesteps={4: (999, 749, 499, 249), 1: (399,)},
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "sdxl-lightning",
            ("sdxl",),
            "euler",
            4,
            (1, 2, 4, 8),
            0.0,
            "SDXL-Lightning: deterministic Euler, trailing; step count must match the checkpoint; "
            "1-step checkpoints predict the sample. Set sampler euler_ancestral for online PSO.",
            _TRAILING,
            prediction_type={1: "sample"},
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "hyper-sd",
            ("sd", "sdxl"),
            "ddim",
            4,
            (1, 2, 4, 8),
            0.0,
            "Hyper-SD N-step LoRA with DDIM trailing (deterministic at eta 0; set eta > 0, or "
            "sampler tcd with eta 1.0 for the unified LoRA, to train online).",
            _TRAILING,
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "hyper-sd-1step",
            ("sd", "sdxl"),
            "lcm",
            1,
            (1,),
            0.0,
            "Hyper-SD 1-step UNet: LCM scheduler at timestep 800.",
            _LCM,
            custom_timesteps={1: (800,)},
            example_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        ),
        FamilyRecipe(
            "flux-schnell",
            ("flux",),
            "flow_euler",
            4,
            (1, 2, 3, 4),
            0.0,
            "FLUX.1-schnell (1024 px, T5 up to 256 tokens): flow-matching Euler on sigmas linspace(1, 1/N, N), no "
            "shift, no guidance. Deterministic at eta 0 (the pipeline's sampler); set eta > 0 for online PSO.",
            {"shift": 1.0, "use_dynamic_shifting": False},
            example_hub_id="black-forest-labs/FLUX.1-schnell",
            max_sequence_length=256,
        ),
        FamilyRecipe(
            "tiny",
            ("sd",),
            "lcm",
            4,
            (1, 2, 4),
            0.0,
            "The built-in tiny model (pso tiny build): 32 px, LCM sampler on its distillation grid.",
            _LCM,
            custom_timesteps={1: (999,), 2: (999, 499), 4: (999, 749, 499, 249)},
            example_hub_id="builtin:tiny",
        ),
    ]
}

# The flow-matching few-step families to come (docs/flow-families-research.md has their recipes so far;
# `pso tiny random --arch` builds a tiny random pipeline of each architecture)
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "flux2-klein": "FLUX.2 [klein], distilled: Flux2KleinPipeline, FlowMatchEulerDiscrete, 4 steps",
    "z-image-turbo": "Z-Image-Turbo: ZImagePipeline, FlowMatchEulerDiscrete shift 3.0, 8 steps",
    "sd35-turbo": "SD3.5-Large-Turbo: StableDiffusion3Pipeline, FlowMatchEulerDiscrete shift 3.0, 4 steps",
    "qwen-image-lightning": "Qwen-Image + Lightning LoRA: QwenImagePipeline, FlowMatchEulerDiscrete shift 3, 4/8 steps",
    "sana-sprint": "SANA-Sprint: SanaSprintPipeline, SCM (TrigFlow), 1-4 steps",
}


def get_family(name: str) -> FamilyRecipe:
    """Return the recipe for `name`, or raise a clear error for unknown or unsupported families."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in UNSUPPORTED_FAMILIES:
        raise UnsupportedFamilyError(
            f"model family {name!r} ({UNSUPPORTED_FAMILIES[name]}) is a flow-matching family, "
            "which is not supported yet; supported families: " + ", ".join(FAMILIES)
        )
    raise UnsupportedFamilyError(
        f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}"
        f" (not supported yet: {', '.join(UNSUPPORTED_FAMILIES)})"
    )
