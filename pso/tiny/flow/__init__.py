"""Tiny, randomly initialised flow-matching text-to-image pipelines in diffusers format, one module per
family of text encoders (clip_t5: FLUX.1, SD3; qwen: FLUX.2 [klein], Z-Image, Qwen-Image; gemma:
SANA-Sprint), for testing the service on those architectures without downloading a checkpoint.

They build offline in well under a second, a few MB each, and make 32x32 px images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# `pso tiny random --arch` names, known without importing the builders' heavy modules
FLOW_ARCHS = ("flux", "flux2", "zimage", "sd3", "qwenimage", "sana")


def flow_builders() -> dict[str, Callable[..., Path]]:
    """Each flow architecture's `build(out_dir, seed=0) -> Path`."""
    from pso.tiny.flow import clip_t5, gemma, qwen

    return {**clip_t5.BUILDERS, **qwen.BUILDERS, **gemma.BUILDERS}
