"""The distilled model as a trainable policy next to its frozen reference model.

`DistilledPolicy` owns the pipeline, its denoiser (pso/denoisers: the one place that knows the model
kind), the sampler and the trainable weights of the backbone (a UNet or a transformer). With LoRA the
reference model is the same backbone with its adapters switched off (no second copy in memory); with
full fine-tuning it is a frozen deep copy made before any update.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from pydantic import TypeAdapter
from torch import Tensor, nn

from pso.codecs import WeightBundle, tensor_spec
from pso.conditioning import Conditioning
from pso.config.schema import Finetune, LoraFinetune, ModelConfig, Reduction
from pso.denoisers import Denoiser
from pso.families import get_family
from pso.loading import build_sampler, image_size, load_pipeline
from pso.samplers import Sampler


def reduce_elements(x: Tensor, reduction: Reduction) -> Tensor:
    """Mean or sum over every dimension but the batch (the explicit averaging convention)."""
    dims = tuple(range(1, x.ndim))
    return x.mean(dims) if reduction == "mean" else x.sum(dims)


class DistilledPolicy:
    def __init__(self, denoiser: Denoiser, sampler: Sampler, model_cfg: ModelConfig, finetune: Finetune | None):
        self.denoiser = denoiser
        self.pipe: DiffusionPipeline = denoiser.pipe
        self.sampler = sampler
        self.model_cfg = model_cfg
        self.finetune = finetune
        recipe = get_family(model_cfg.family)
        self.guidance_scale = recipe.guidance_scale if model_cfg.guidance_scale is None else model_cfg.guidance_scale
        self.backbone: nn.Module = denoiser.backbone
        for module in denoiser.frozen_modules():
            module.requires_grad_(False).eval()
        if self.pipe.vae.config.get("force_upcast") and self.pipe.vae.dtype == torch.float16:
            self.pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
        self._reference_backbone: nn.Module | None = None
        if finetune is None:  # inference only: nothing trains, the policy is its own reference
            self.backbone.requires_grad_(False)
        elif isinstance(finetune, LoraFinetune):
            self.backbone.requires_grad_(False)
            config = LoraConfig(
                r=finetune.rank,
                lora_alpha=finetune.alpha or finetune.rank,
                target_modules=self.lora_targets,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(finetune.init_seed)
                self.backbone.add_adapter(config)
            for name, param in self.backbone.named_parameters():
                param.requires_grad_("lora_" in name)
                if "lora_" in name:  # AdamW's eps underflows in fp16: keep the adapters in float32
                    param.data = param.data.float()
        else:
            if self.dtype == torch.float16:
                raise ValueError(
                    "full fine-tuning needs dtype float32 or bfloat16 (AdamW breaks on float16 "
                    "weights); or train LoRA adapters, which are kept in float32"
                )
            self._reference_backbone = copy.deepcopy(self.backbone).requires_grad_(False).eval()
            self.backbone.requires_grad_(True)
        if finetune is not None and finetune.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.backbone.eval()  # no dropout or norm statistics differ between sampling and training passes

    @property
    def lora_targets(self) -> list[str]:
        """The modules LoRA adapts: the configured ones, else the denoiser's default."""
        return list(self.finetune.target_modules or self.denoiser.lora_targets)

    def set_num_steps(self, num_steps: int, eta: float | None = None) -> None:
        """Switch the sampler to another of the family's step counts (e.g. train at 4, evaluate at 1), and to
        noise level `eta` when given (e.g. train a flow model at 0.7, evaluate it at 0)."""
        update = {"num_steps": num_steps} | ({} if eta is None else {"eta": eta})
        self.model_cfg = self.model_cfg.model_copy(update=update)
        self.sampler = build_sampler(self.denoiser, get_family(self.model_cfg.family), self.model_cfg)
        self.pipe.scheduler = self.sampler.scheduler

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, finetune: Finetune | None) -> DistilledPolicy:
        denoiser, sampler = load_pipeline(model_cfg)
        return cls(denoiser, sampler, model_cfg, finetune)

    # ----- shapes and conditioning -----
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype (LoRA adapters may be float32 inside a float16 backbone)."""
        return getattr(torch, self.model_cfg.dtype)

    @property
    def image_size(self) -> int:
        return image_size(self.denoiser, get_family(self.model_cfg.family), self.model_cfg)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.denoiser.latent_shape(self.image_size)

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.denoiser.encode(prompts, self.guidance_scale, self.image_size)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images in [0, 1], (B, 3, H, W) float32."""
        return self.denoiser.decode(latents)

    # ----- the two models -----
    @contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The base model: the frozen copy (full fine-tuning), else this backbone with its LoRA adapters off
        (ours, or one the pipeline's `load_lora_weights` added)."""
        if self._reference_backbone is not None or not self.backbone._hf_peft_config_loaded:
            yield self._reference_backbone or self.backbone
            return
        self.backbone.disable_adapters()
        try:
            yield self.backbone
        finally:
            self.backbone.enable_adapters()

    def model_output(
        self,
        model_input: Tensor,
        t: Tensor,
        cond: Conditioning,
        *,
        reference: bool = False,
        guided: bool = True,
    ) -> Tensor:
        """The backbone's prediction (CFG-combined when the conditioning carries an unconditional branch).

        `reference=True` evaluates the frozen reference model without building a graph.
        """
        if reference:
            with torch.no_grad(), self._reference() as backbone:
                return self.denoiser.predict(backbone, model_input, t, cond, guided)
        return self.denoiser.predict(self.backbone, model_input, t, cond, guided)

    def predict(self, x: Tensor, step: Tensor, cond: Conditioning, *, reference: bool = False) -> Tensor:
        """The model output for sampler states x at per-sample step indices."""
        t = self.sampler.timesteps.to(x.device)[step]
        return self.model_output(self.sampler.model_input(x, step).to(self.dtype), t, cond, reference=reference)

    # ----- the quantities PSO needs -----
    def transition_log_ratio(
        self, x: Tensor, x_next: Tensor, step: Tensor, cond: Conditioning, reduction: Reduction = "mean"
    ) -> Tensor:
        """log r = -(||x' - mu_theta||^2 - ||x' - mu_ref||^2) / (2 s^2) for realised transitions, (B,).

        Raises for deterministic transitions (s = 0), which have no likelihood.
        """
        std = self.sampler.stds.to(x.device)[step]
        if bool((std <= 0).any()):
            raise ValueError(
                f"transition at step(s) {sorted(set(step[std <= 0].tolist()))} is deterministic under sampler "
                f"{self.sampler.kind!r} (eta={self.sampler.eta}); it has no likelihood. Train on steps before the "
                "last, choose a stochastic sampler (euler_ancestral, lcm, tcd, ddim or flow_euler with eta > 0), "
                "or use a forward-noised loss (offline-pso)."
            )
        mean = self.sampler.step(x, self.predict(x, step, cond), step).mean.float()
        with torch.no_grad():
            mean_ref = self.sampler.step(x, self.predict(x, step, cond, reference=True), step).mean.float()
        x_next = x_next.float()
        err = reduce_elements((x_next - mean) ** 2, reduction)
        err_ref = reduce_elements((x_next - mean_ref) ** 2, reduction)
        return -(err - err_ref) / (2 * std.float() ** 2)

    def forward_noised_errors(
        self,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        cond: Conditioning,
        reduction: Reduction = "mean",
        *,
        with_reference: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Prediction errors of policy and reference on x0 forward-noised to timesteps t, (B,) each.

        The sampler knows the noising and the target in the model's own parameterisation (eps, v or x0
        for UNets, the velocity for flow matching); the conditional branch is used without guidance, as
        in ordinary diffusion training.
        """
        x_t, target = self.sampler.forward_noise(x0.float(), noise.float(), t.to(x0.device))
        x_t, t = x_t.to(self.dtype), t.to(x0.device)
        err = reduce_elements((self.model_output(x_t, t, cond, guided=False).float() - target) ** 2, reduction)
        if not with_reference:
            return err, None
        out_ref = self.model_output(x_t, t, cond, reference=True, guided=False).float()
        return err, reduce_elements((out_ref - target) ** 2, reduction)

    # ----- trainable weights -----
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Just the trainable tensors (LoRA factors, or the whole backbone), detached copies on CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.backbone.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors into the trainable parameters; names, shapes and dtypes must match exactly."""
        params = {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(
                f"trainable weights do not match this model: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        for name, param in params.items():
            src = tensors[name]
            if src.shape != param.shape or src.dtype != param.dtype:
                raise ValueError(
                    f"{name}: got {src.dtype} {tuple(src.shape)}, expected {param.dtype} {tuple(param.shape)}"
                )
            param.copy_(src)

    def export_weights(self, version: int) -> WeightBundle:
        self._require_trainable()
        return WeightBundle(
            version=version,
            tensors=self.trainable_state_dict(),
            kind=self.finetune.mode,
            base_model=self.model_cfg.pretrained,
            metadata={
                "family": self.model_cfg.family,
                "dtype": self.model_cfg.dtype,
                "finetune": self.finetune.model_dump(mode="json"),
            },
        )

    @staticmethod
    def finetune_of(bundle: WeightBundle) -> Finetune:
        """The fine-tuning a bundle was trained with, as `export_weights` records it."""
        return TypeAdapter(Finetune).validate_python(bundle.metadata.get("finetune", {"mode": bundle.kind}))

    def load_weights(self, bundle: WeightBundle) -> None:
        self._require_trainable()
        if bundle.kind != self.finetune.mode:
            raise ValueError(f"weight bundle holds {bundle.kind} weights, this model trains {self.finetune.mode}")
        self.load_trainable_state_dict(bundle.tensors)

    def _require_trainable(self) -> None:
        if self.finetune is None:
            raise ValueError(
                "this model was loaded for inference only (no finetune section): it has no weights to export or load"
            )

    def weight_spec(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Names, dtypes and shapes a weight bundle for this model must have (for decode_weights)."""
        return tensor_spec({n: p for n, p in self.backbone.named_parameters() if p.requires_grad})
