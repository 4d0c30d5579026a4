"""The project's configuration models (YAML in configs/, see docs/configuration.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pso.config.loader import StrictModel
from pso.config.reward_server import RewardServerConfig
from pso.config.services import ActorConfig, LearnerConfig, RedisConfig, UpConfig
from pso.families import SamplerKind, get_family

Reduction = Literal["mean", "sum"]


class ModelConfig(StrictModel):
    """Which distilled model to load and how to sample it."""

    family: str = Field("sd-turbo", description="a recipe name from pso.families (docs/families.md)")
    pretrained: str = Field("stabilityai/sd-turbo", description="hub id or local diffusers folder")
    revision: str | None = None
    variant: str | None = Field(None, description='weight file variant, e.g. "fp16"')
    unet: str | None = Field(
        None, description="replace the UNet: hub id or folder of a diffusers UNet, or a .safetensors file"
    )
    distill_lora: str | None = Field(
        None, description="LoRA that makes the base a few-step model (LCM-LoRA, TCD, Hyper-SD); fused"
    )
    distill_lora_weight_name: str | None = None
    num_steps: int | None = Field(None, ge=1, description="default: the family's")
    sampler: SamplerKind | None = Field(None, description="default: the family's")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="TCD gamma / DDIM eta; default: the family's")
    guidance_scale: float | None = Field(None, ge=0.0, description="default: the family's")
    resolution: int | None = Field(None, ge=8, description="image side in pixels; default: the model's")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    local_files_only: bool = Field(False, description="never reach the hub (folders and the local cache only)")

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        get_family(name)
        return name


class _FinetuneBase(StrictModel):
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward to save memory")


class LoraFinetune(_FinetuneBase):
    """Train LoRA adapters (kept in float32 whatever the model dtype); the reference model is the same
    network with adapters switched off."""

    mode: Literal["lora"] = "lora"
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0, description="default: equal to rank (scale 1)")
    target_modules: list[str] | None = Field(
        None,
        description="module names to adapt; default: the model's attention projections (UNet: to_q, to_k, to_v, "
        "to_out.0; transformers: those of both the image and the text stream)",
    )
    init_seed: int = 0


class FullFinetune(_FinetuneBase):
    """Train every UNet weight (needs dtype float32 or bfloat16); the reference model is a frozen copy."""

    mode: Literal["full"] = "full"


Finetune = Annotated[LoraFinetune | FullFinetune, Field(discriminator="mode")]


class _LossBase(StrictModel):
    reduction: Reduction = Field(
        "mean",
        description="squared errors averaged (mean) or summed (sum) over latent elements; "
        "mean is the reference code's convention and rescales beta by 1/(C*H*W)",
    )


class OnlinePSOLoss(_LossBase):
    """Transition form on the policy's own trajectories (pso.md, "Online PSO")."""

    name: Literal["online-pso"] = "online-pso"
    beta: float = Field(50.0, gt=0)
    clip_eps: float = Field(0.1, gt=0, lt=1)


class OfflinePSOLoss(_LossBase):
    """Forward-noised pair at the distilled timesteps (pso.md, "Offline PSO")."""

    name: Literal["offline-pso"] = "offline-pso"
    beta: float = Field(2000.0, gt=0)


class TargetVsReferenceLoss(_LossBase):
    """Fixed target images against the policy's own samples (pso.md, "Target vs online reference")."""

    name: Literal["target-vs-reference"] = "target-vs-reference"
    beta: float = Field(50.0, gt=0)
    clip_eps: float = Field(0.1, gt=0, lt=1)


class CustomizationLoss(_LossBase):
    """The paper's concept-customization variant (its DreamBooth script's `pso_db`): the target and the
    policy's own sample are both forward-noised at one distilled timestep with one noise, and a hinge asks
    the target's prediction error to be `1/beta` below the sample's; no reference model. `sample_weight`
    adds the sample's own diffusion loss, which keeps the model fitting what it already draws (the
    paper's regulariser against forgetting, its `prior_loss_weight`)."""

    name: Literal["customization"] = "customization"
    beta: float = Field(5.0, gt=0, description="the hinge asks for an error gap of 1/beta")
    sample_weight: float = Field(0.5, ge=0, description="weight of the sample's own diffusion loss")


class SFTLoss(_LossBase):
    """Baseline: plain diffusion loss on the winners at the distilled timesteps."""

    name: Literal["sft"] = "sft"


class DiffusionDPOLoss(_LossBase):
    """Baseline: the offline form with t uniform over 0..T-1 (Wallace et al.)."""

    name: Literal["diffusion-dpo"] = "diffusion-dpo"
    beta: float = Field(2000.0, gt=0)


Loss = Annotated[
    OnlinePSOLoss | OfflinePSOLoss | TargetVsReferenceLoss | CustomizationLoss | SFTLoss | DiffusionDPOLoss,
    Field(discriminator="name"),
]


class PairingConfig(StrictModel):
    """How scored groups become (winner, loser) pairs."""

    strategy: Literal["best-vs-worst", "all-pairs"] = "best-vs-worst"
    margin: float = Field(0.0, ge=0.0, description="a pair needs score(winner) - score(loser) > margin")
    normalize: Literal["none", "zscore"] = Field("none", description="normalise scores within each prompt group")


class SamplingConfig(StrictModel):
    group_size: int = Field(2, ge=2, description="images per prompt, each from its own starting noise")
    batch_size: int = Field(8, ge=1, description="images per UNet call")
    seed: int = 0


class OptimConfig(StrictModel):
    """AdamW on the trainable weights (reference code: lr 1e-5, grad clip 1.0)."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    pairs_per_step: int = Field(8, ge=1, description="pairs per optimiser step (a micro-batch of the round)")


class LoopConfig(StrictModel):
    """The in-process online loop (sample, score, pair, update) used for research, tests and the demo."""

    rounds: int = Field(10, ge=1)
    prompts_per_round: int = Field(4, ge=1)
    prompts: list[str] = Field(
        default_factory=lambda: ["a red circle on a blue background", "a green square on a yellow background"],
        min_length=1,
    )


class TargetsConfig(StrictModel):
    """Fixed target images with captions (style transfer, concept customization; pso.md, "Target vs online
    reference"): fresh samples of the policy for each target's caption are its references, and the loss
    (`target-vs-reference` or `customization`, or `sft` as the naive baseline) trains each target against them."""

    source: str = Field(
        description="a folder of images with a metadata.jsonl of captions (the Hugging Face imagefolder "
        "convention), a parquet file or folder, or a hub dataset id"
    )
    caption_column: str = "text"
    image_column: str = "image"
    split: str = "train"
    max_images: int | None = Field(None, ge=1, description="use at most this many targets (default: all)")
    score: bool = Field(False, description="score the references on the reward server (for monitoring only)")
    class_prompts: list[str] = Field(
        default_factory=list,
        description="prior preservation (customization): prompts of the subject's class; the base model's own "
        "samples of them become extra targets, so the model keeps drawing the class as it did",
    )
    class_samples: int = Field(4, ge=1, description="base-model samples per class prompt")
    prior_weight: float = Field(1.0, ge=0, description="loss weight of the class targets' pairs")


class PreferencesConfig(StrictModel):
    """Offline preference pairs (the Pick-a-Pic v2 layout, pso/preference_data.py): the learner trains on them
    alone, with no actors (pso.md, "Offline PSO"). Each learner rank reads its own shard of the source; the
    images are encoded once by the model's own VAE. Needs `loss.name` offline-pso or diffusion-dpo."""

    source: str = Field(
        description="parquet files in the Pick-a-Pic v2 layout (a file, or a folder of them), a hub dataset "
        "(hf:OWNER/NAME, e.g. hf:yuvalkirstain/pickapic_v2), or builtin:tiny-offline"
    )
    split: str = Field("train", description="the hub dataset's split")
    epochs: int = Field(1, ge=1, description="passes over the data; the learner stops after the last one")
    max_pairs: int | None = Field(
        None, ge=1, description="use at most this many pairs of each rank's shard per epoch (default: all)"
    )
    cache_latents: bool = Field(
        True,
        description="keep the pairs' VAE latents on disk (learner.run_dir/preference-latents), so a later epoch "
        "or a resumed learner does not encode them again",
    )


class PSOConfig(StrictModel):
    """Everything one run needs: the core library's sections, then one section per service."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: Finetune = Field(default_factory=LoraFinetune)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    loss: Loss = Field(default_factory=OnlinePSOLoss)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    targets: TargetsConfig | None = None
    preferences: PreferencesConfig | None = None
    reward_server: RewardServerConfig = Field(default_factory=RewardServerConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    up: UpConfig = Field(default_factory=UpConfig)

    @model_validator(mode="after")
    def _learner_precision_fits_the_model(self) -> PSOConfig:
        """DeepSpeed's bf16/fp16 modes run the whole UNet in that dtype, so the model must be loaded in it."""
        want = {"bf16": "bfloat16", "fp16": "float16"}.get(self.learner.precision)
        if want and self.model.dtype != want:
            raise ValueError(
                f"learner.precision {self.learner.precision} needs model.dtype {want} (it is {self.model.dtype}); "
                "or keep learner.precision fp32 (LoRA adapters train in float32 on any model dtype)"
            )
        return self

    @model_validator(mode="after")
    def _preferences_need_an_offline_loss(self) -> PSOConfig:
        if self.preferences is None:
            return self
        if self.targets is not None:
            raise ValueError("preferences (offline pairs) and targets (target images) are two kinds of run: give one")
        if not isinstance(self.loss, (OfflinePSOLoss, DiffusionDPOLoss)):
            raise ValueError(
                f"preferences (offline pairs, fixed images) train with loss offline-pso or diffusion-dpo, not "
                f"{self.loss.name}: the other losses need trajectories sampled by actors"
            )
        return self

    @model_validator(mode="after")
    def _a_judge_pairs_sampled_groups(self) -> PSOConfig:
        if self.actor.judge is not None and self.targets is not None:
            raise ValueError("actor.judge pairs a group's samples; with targets each sample pairs with its target")
        return self

    @model_validator(mode="after")
    def _targets_need_a_target_loss(self) -> PSOConfig:
        if self.targets is not None and not isinstance(self.loss, (TargetVsReferenceLoss, CustomizationLoss, SFTLoss)):
            raise ValueError(
                "targets train with loss target-vs-reference or customization (or sft, the naive baseline), "
                f"not {self.loss.name}"
            )
        return self

    @model_validator(mode="after")
    def _backlog_target_below_the_actors_bound(self) -> PSOConfig:
        """Actors pause above actor.max_backlog, so a higher target is never reached and the autoscaling
        signal would ask for more actors for ever."""
        if self.learner.target_backlog >= self.actor.max_backlog:
            raise ValueError(
                f"learner.target_backlog ({self.learner.target_backlog}) must be below actor.max_backlog "
                f"({self.actor.max_backlog}): actors pause above it"
            )
        return self
