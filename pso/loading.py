"""Load a distilled model's diffusers pipeline with its family's exact scheduler settings."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from pso.config.schema import ModelConfig
from pso.denoisers import UNET_ARCHS, Denoiser, denoiser_for, pipeline_arch
from pso.families import FamilyRecipe, get_family
from pso.samplers import SAMPLERS, Sampler

log = logging.getLogger(__name__)


BUILTIN_MODELS = {
    "builtin:tiny": Path(__file__).parent / "tiny" / "assets" / "model",
    "builtin:tiny-flow": Path(__file__).parent / "tiny" / "assets" / "flow-model",
}


def resolve_pretrained(name: str) -> str:
    """A hub id or folder as given, or the folder of a model shipped inside the package."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        return str(BUILTIN_MODELS[name])
    return name


def _load_unet(spec: str, cfg: ModelConfig, dtype: torch.dtype) -> UNet2DConditionModel:
    """A replacement UNet: a diffusers UNet folder or hub id, or a .safetensors state dict for the base UNet."""
    common = dict(dtype=dtype, local_files_only=cfg.local_files_only)
    if spec.endswith(".safetensors"):
        path = Path(spec)
        if not path.is_file():  # "owner/repo/file.safetensors" on the hub
            from huggingface_hub import hf_hub_download

            repo, _, filename = spec.rpartition("/")
            path = Path(hf_hub_download(repo, filename, local_files_only=cfg.local_files_only))
        unet = UNet2DConditionModel.from_pretrained(
            cfg.pretrained, subfolder="unet", revision=cfg.revision, variant=cfg.variant, **common
        )
        unet.load_state_dict(load_file(path), strict=True)
        return unet.to(dtype)
    if spec.endswith((".bin", ".pt", ".ckpt")):
        raise ValueError(f"refusing to load {spec}: pickle-based checkpoints can run code; use a .safetensors file")
    subfolder = "unet" if (Path(spec) / "unet").is_dir() else None
    return UNet2DConditionModel.from_pretrained(spec, subfolder=subfolder, **common)


def check_device(device: str) -> None:
    """A clear error for device names torch does not know, or accelerators this machine lacks."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"model.device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {device!r} but this machine has no CUDA device; use --set model.device=cpu")


def image_size(denoiser: Denoiser, recipe: FamilyRecipe, cfg: ModelConfig) -> int:
    """The side of the square images sampled: configured, else the family's, else the pipeline's default."""
    return cfg.resolution or recipe.resolution or denoiser.default_image_size()


def build_sampler(denoiser: Denoiser, recipe: FamilyRecipe, cfg: ModelConfig) -> Sampler:
    """The family's scheduler with its pinned settings, at the configured step count."""
    num_steps = cfg.num_steps or recipe.default_steps
    if num_steps not in recipe.steps:
        raise ValueError(f"family {recipe.name} is distilled for {list(recipe.steps)} steps, not {num_steps}")
    kind = cfg.sampler or recipe.sampler
    timesteps = recipe.custom_timesteps.get(num_steps)
    if timesteps and kind != "lcm":
        raise ValueError(
            f"family {recipe.name} samples {num_steps} step(s) on its own timestep grid {list(timesteps)}, "
            f"which only the lcm sampler follows; sampler {kind!r} cannot be used"
        )
    eta = recipe.eta if cfg.eta is None else cfg.eta
    size = image_size(denoiser, recipe, cfg)
    sampler = _make_sampler(denoiser, recipe, kind, num_steps, timesteps, eta, size)
    if kind != recipe.sampler:  # an override must keep the timesteps the model was distilled for
        own = _make_sampler(denoiser, recipe, recipe.sampler, num_steps, timesteps, eta, size).timesteps
        if not torch.equal(sampler.timesteps.round().long(), own.round().long()):
            raise ValueError(
                f"sampler {kind!r} would sample {recipe.name} at timesteps "
                f"{sampler.timesteps.round().long().tolist()}, not the family's {own.round().long().tolist()}"
            )
    return sampler


def _make_sampler(
    denoiser: Denoiser, recipe: FamilyRecipe, kind: str, num_steps: int, timesteps, eta: float, image_size: int
) -> Sampler:
    sampler_cls = SAMPLERS[kind]
    accepted = inspect.signature(sampler_cls.scheduler_class.__init__).parameters
    # clipping and thresholding of x0 are pixel-space tricks that distilled latent models never use
    settings = {k: v for k, v in {"clip_sample": False, "thresholding": False}.items() if k in accepted}
    settings.update(recipe.scheduler_settings)
    if num_steps in recipe.prediction_type:
        settings["prediction_type"] = recipe.prediction_type[num_steps]
    scheduler = sampler_cls.scheduler_class.from_config(denoiser.pipe.scheduler.config, **settings)
    schedule = denoiser.schedule(scheduler, num_steps, image_size)
    return sampler_cls(scheduler, num_steps, list(timesteps) if timesteps else None, eta=eta, schedule=schedule)


def load_pipeline(cfg: ModelConfig) -> tuple[Denoiser, Sampler]:
    """Load from a hub id or a local folder, apply the family recipe, and return (its denoiser, sampler);
    the pipeline is `denoiser.pipe`.

    The pipeline's own scheduler is replaced by the sampler's, so `pipe(...)` samples exactly as
    the policy does.
    """
    recipe = get_family(cfg.family)
    check_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    kwargs = dict(dtype=dtype, revision=cfg.revision, variant=cfg.variant, local_files_only=cfg.local_files_only)
    if cfg.unet:
        if not set(recipe.arch) <= UNET_ARCHS:
            raise ValueError(f"model.unet replaces a UNet, but family {recipe.name} runs a transformer")
        kwargs["unet"] = _load_unet(cfg.unet, cfg, dtype)
    source = resolve_pretrained(cfg.pretrained)
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    log.info("loading %s (%s) as %s", source, cfg.dtype, recipe.name)
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    arch = pipeline_arch(pipe)
    if arch not in recipe.arch:
        raise ValueError(
            f"family {recipe.name} expects a {'/'.join(recipe.arch)} pipeline, "
            f"but {cfg.pretrained} is {type(pipe).__name__}"
        )
    if cfg.distill_lora:
        pipe.load_lora_weights(cfg.distill_lora, weight_name=cfg.distill_lora_weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(cfg.device)
    denoiser = denoiser_for(pipe, recipe.max_sequence_length)
    sampler = build_sampler(denoiser, recipe, cfg)
    pipe.scheduler = sampler.scheduler
    return denoiser, sampler
