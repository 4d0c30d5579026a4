"""Two example scorers for the PSO reward server's `kind: python` (docs/reward-server.md, "Your own scorer").

A scorer is a plain class: the server imports it by the path in its config, builds it once per device with
`device` and the config's `options`, and calls `score` with batches of images of one size. Nothing here
imports the server: a scorer package depends only on what it computes with.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["ColourWord", "Colourfulness"]


class Colourfulness:
    """Colourfulness M of Hasler and Süsstrunk (2003), from the opponent channels rg = R - G and
    yb = (R + G) / 2 - B: M = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2). The prompt is ignored."""

    scale = "Hasler-Süsstrunk colourfulness: 0 for grey, about 33 'moderately' and over 59 'extremely' colourful"
    version = "hasler-susstrunk-2003"

    def __init__(self, device: str = "cpu", divide_by: float = 1.0):
        if not divide_by > 0:
            raise ValueError(f"divide_by must be positive, got {divide_by}")
        self.divide_by = float(divide_by)

    def score(self, images, prompts: list[str]) -> list[float]:
        x = np.asarray(images, dtype=np.float64)  # (B, H, W, 3), 0-255
        rg = x[..., 0] - x[..., 1]
        yb = (x[..., 0] + x[..., 1]) / 2 - x[..., 2]
        spread = np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2)
        mean = np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2)
        return ((spread + 0.3 * mean) / self.divide_by).tolist()


class ColourWord:
    """The share of pixels near the first colour the prompt names ("a red car" -> red): a prompt-aware
    check, and one that refuses prompts it cannot read (`check_prompt`), which the caller gets as a 422."""

    COLOURS = {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (240, 220, 40),
        "orange": (245, 140, 30),
        "purple": (150, 60, 190),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
    }
    scale = "share of pixels within `tolerance` (RGB distance, 0-255) of the prompt's first colour, 0 to 1"
    version = "colour-word-1"
    _WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)

    def __init__(self, device: str = "cpu", tolerance: float = 40.0):
        self.tolerance = float(tolerance)

    def colour(self, prompt: str) -> str | None:
        m = self._WORDS.search(prompt)
        return m[1].lower() if m else None

    def check_prompt(self, prompt: str) -> str | None:
        if self.colour(prompt) is None:
            return f"the prompt names none of the colours {sorted(self.COLOURS)}"
        return None

    def score(self, images, prompts: list[str]) -> list[float]:
        x = np.asarray(images, dtype=np.float64)
        target = np.array([self.COLOURS[self.colour(p)] for p in prompts], dtype=np.float64)[:, None, None, :]
        near = np.linalg.norm(x - target, axis=-1) < self.tolerance
        return near.mean(axis=(1, 2)).tolist()
