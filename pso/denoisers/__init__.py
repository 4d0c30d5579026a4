"""The model kinds PSO runs, one denoiser per pipeline architecture (pso/denoisers/base.py: the contract).

Denoisers are imported when a pipeline of theirs is loaded, so the UNet path never imports the
transformer models' code.
"""

from __future__ import annotations

from importlib import import_module

from diffusers import DiffusionPipeline

from pso.denoisers.base import Denoiser

UNET_ARCHS = {"sd", "sdxl"}

# pipeline class name -> (arch, "module:Denoiser class")
DENOISERS: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("sd", "pso.denoisers.unet:SDUNetDenoiser"),
    "StableDiffusionXLPipeline": ("sdxl", "pso.denoisers.unet:SDXLUNetDenoiser"),
    "FluxPipeline": ("flux", "pso.denoisers.flux:FluxDenoiser"),
    "SanaSprintPipeline": ("sana", "pso.denoisers.sana:SanaSprintDenoiser"),
    "StableDiffusion3Pipeline": ("sd3", "pso.denoisers.sd3:SD3Denoiser"),
    "ZImagePipeline": ("zimage", "pso.denoisers.zimage:ZImageDenoiser"),
    "Flux2KleinPipeline": ("flux2", "pso.denoisers.flux2:Flux2Denoiser"),
    "QwenImagePipeline": ("qwenimage", "pso.denoisers.qwenimage:QwenImageDenoiser"),
}


def _entry(pipe: DiffusionPipeline) -> tuple[str, str]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in DENOISERS:
            return DENOISERS[cls.__name__]
    raise ValueError(f"{type(pipe).__name__} is not supported: PSO runs " + ", ".join(DENOISERS))


def pipeline_arch(pipe: DiffusionPipeline) -> str:
    """The architecture name of a pipeline ("sd", "sdxl", "flux", ...); any other class is refused with the reason."""
    return _entry(pipe)[0]


def denoiser_for(pipe: DiffusionPipeline, max_sequence_length: int | None = None) -> Denoiser:
    module, _, name = _entry(pipe)[1].partition(":")
    return getattr(import_module(module), name)(pipe, max_sequence_length)
