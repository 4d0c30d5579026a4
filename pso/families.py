"""Recipes for the timestep-distilled model families PSO tunes.

Each recipe pins the scheduler settings a family was distilled for (never trust the
scheduler config shipped with a checkpoint: SDXL-Turbo's "leading" spacing gives timestep 1
instead of 999). The table is kept in step with docs/families.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SamplerKind = Literal["lcm", "tcd", "euler_ancestral", "euler", "ddim", "flow_euler", "scm"]
Arch = Literal["sd", "sdxl", "flux", "flux2", "zimage", "sd3", "qwenimage", "sana"]


class UnsupportedFamilyError(ValueError):
    """A family name this version does not know."""


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
    # the image side where the pipeline's default is not the model's (a FluxPipeline always defaults to 1024 px)
    resolution: int | None = None


_TRAILING = {"timestep_spacing": "trailing"}
_LCM = {"timestep_spacing": "leading", "original_inference_steps": 50, "timestep_scaling": 10.0}
_FLUX_SCHNELL = {"shift": 1.0, "use_dynamic_shifting": False}  # no shift at all: sigmas linspace(1, 1/N, N)

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
            _FLUX_SCHNELL,
            example_hub_id="black-forest-labs/FLUX.1-schnell",
            max_sequence_length=256,
        ),
        FamilyRecipe(
            "flux2-klein",
            ("flux2",),
            "flow_euler",
            4,
            (1, 2, 3, 4),
            1.0,
            "FLUX.2 [klein], distilled (1024 px, Qwen3 512 tokens): flow-matching Euler on sigmas linspace(1, 1/N, N) "
            "with the exponential shift mu = compute_empirical_mu(seq len, N), so the grid depends on resolution and "
            "step count; no CFG (guidance is ignored). Distilled for 4 steps: 1-3 are not documented by BFL, they "
            "follow the same formula off-recipe (expect worse images). Deterministic at eta 0; set eta > 0 for "
            "online PSO.",
            {"use_dynamic_shifting": True, "time_shift_type": "exponential", "shift_terminal": None},
            example_hub_id="black-forest-labs/FLUX.2-klein-4B",
        ),
        FamilyRecipe(
            "z-image-turbo",
            ("zimage",),
            "flow_euler",
            8,
            (1, 2, 4, 8),
            0.0,
            "Z-Image-Turbo (1024 px, Qwen3 up to 512 tokens): flow-matching Euler on sigmas linspace(1, 1/N, N) "
            "with static shift 3, no guidance (CFG runs at any guidance > 0). 8 steps = 8 forwards, the card's "
            "num_inference_steps=9 in diffusers < 0.42 (9 here is another grid); 1, 2 and 4 steps sample subsets "
            "of the 8-step timesteps. Deterministic at eta 0 (the pipeline's sampler); set eta > 0 for online PSO.",
            {"shift": 3.0, "use_dynamic_shifting": False},
            example_hub_id="Tongyi-MAI/Z-Image-Turbo",
        ),
        FamilyRecipe(
            "sd35-turbo",
            ("sd3",),
            "flow_euler",
            4,
            (1, 4),
            0.0,
            "SD3.5 Large Turbo (ADD, 1024 px, T5 256 tokens): flow-matching Euler, static shift 3.0, the pipeline's "
            "own grid (no sigmas passed; 4 steps: sigmas 1, .858, .602, .009), no CFG. 4 steps is the distilled "
            "count; 1 step is its first x0 estimate from pure noise (2 steps would only add a no-op at sigma .009, "
            "8 are undocumented). Deterministic at eta 0; set eta > 0 for online PSO.",
            {"shift": 3.0, "use_dynamic_shifting": False},
            example_hub_id="stabilityai/stable-diffusion-3.5-large-turbo",
            max_sequence_length=256,
        ),
        FamilyRecipe(
            "qwen-image-lightning",
            ("qwenimage",),
            "flow_euler",
            8,
            (4, 8),
            1.0,
            "Qwen-Image with a Lightning LoRA: model.distill_lora must name the lightx2v/Qwen-Image-Lightning LoRA "
            "of the step count (distill_lora_weight_name e.g. Qwen-Image-Lightning-8steps-V1.1.safetensors, or a "
            "4steps one for 4 steps). Flow-matching Euler on the authors' scheduler (exponential shift with mu = "
            "ln 3 at every size: static shift 3); no CFG (guidance_scale is true_cfg_scale, 1.0). Deterministic "
            "at eta 0 (the pipeline's sampler); set eta > 0 for online PSO.",
            # ModelTC/Qwen-Image-Lightning generate_with_diffusers.py `scheduler_config` ("shift=3 in distillation")
            {
                "num_train_timesteps": 1000,
                "shift": 1.0,
                "use_dynamic_shifting": True,
                "base_shift": 1.0986122886681098,  # ln 3
                "max_shift": 1.0986122886681098,
                "base_image_seq_len": 256,
                "max_image_seq_len": 8192,
                "time_shift_type": "exponential",
                "shift_terminal": None,
                "stochastic_sampling": False,
                "invert_sigmas": False,
                "use_karras_sigmas": False,
                "use_exponential_sigmas": False,
                "use_beta_sigmas": False,
            },
            example_hub_id="Qwen/Qwen-Image",
        ),
        FamilyRecipe(
            "sana-sprint",
            ("sana",),
            "scm",
            2,
            (1, 2, 3, 4),
            4.5,
            "SANA-Sprint (1024 px, Gemma-2 300 tokens after the pipeline's instruction): sCM consistency sampling "
            "on TrigFlow angles from 1.5708 (2 steps: 1.5708, 1.3; else evenly to 0), guidance 4.5 embedded (times "
            "guidance_embeds_scale), no CFG. Natively stochastic (re-noising every step but the last), so online "
            "PSO trains at any eta; eta has no effect.",
            example_hub_id="Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
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
        FamilyRecipe(
            "tiny-flow",
            ("flux",),
            "flow_euler",
            4,
            (1, 2, 4),
            0.0,
            "The built-in tiny flow-matching model (pso tiny build --flow): 32 px FLUX-format, flow-Euler on "
            "FLUX.1-schnell's sigmas; set eta > 0 for online PSO.",
            _FLUX_SCHNELL,
            example_hub_id="builtin:tiny-flow",
            max_sequence_length=32,
            resolution=32,
        ),
    ]
}


def get_family(name: str) -> FamilyRecipe:
    """Return the recipe for `name`, or raise a clear error for unknown families."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise UnsupportedFamilyError(f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}")
