"""The tiny world: procedurally drawn 32x32 images of "a {colour} {shape} on a {colour} background".

Images are drawn with numpy in microseconds, so the built-in model, its rewards and the quality
benchmark need no data set. Edges are crisp (no anti-aliasing): every pixel of real data is one
of the two prompt colours, which is what the crispness measure and the rewards rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
BORDER = 2  # a ring this wide always shows the background
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
MIN_HALF, MAX_HALF = 5, 11  # half-extent of a shape in pixels
_PROMPT = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    fg: str
    shape: str
    bg: str

    @property
    def prompt(self) -> str:
        return f"a {self.fg} {self.shape} on a {self.bg} background"


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt asks for; a clear error for anything else."""
    m = _PROMPT.match(prompt.strip().lower())
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in COLOURS or m[1] == m[3]:
        raise ValueError(
            f"not a tiny-world prompt: {prompt!r}; expected 'a {{colour}} {{shape}} on a {{colour}} background' "
            f"with two different colours from {sorted(COLOURS)} and a shape from {list(SHAPES)}"
        )
    return Scene(m[1], m[2], m[3])


def all_scenes() -> list[Scene]:
    return [Scene(fg, s, bg) for fg in COLOURS for s in SHAPES for bg in COLOURS if fg != bg]


def random_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    scenes = all_scenes()
    return [scenes[i] for i in rng.integers(len(scenes), size=n)]


def shape_mask(shape: str, cx: int, cy: int, half: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent `half`."""
    y, x = np.mgrid[0:size, 0:size]
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (abs(x - cx) <= half) & (abs(y - cy) <= half)
    # an upward triangle: apex at (cx, cy - half), base on row cy + half
    rows = (y - (cy - half)) / (2 * half)
    return (y >= cy - half) & (y <= cy + half) & (abs(x - cx) <= rows * half)


def draw(scene: Scene, rng: np.random.Generator, half: int | None = None) -> np.ndarray:
    """A (size, size, 3) uint8 image of the scene at a random size and position inside the border."""
    half = int(rng.integers(MIN_HALF, MAX_HALF + 1)) if half is None else half
    lo, hi = BORDER + half, IMAGE_SIZE - 1 - BORDER - half
    cx, cy = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[scene.bg]
    img[shape_mask(scene.shape, cx, cy, half)] = COLOURS[scene.fg]
    return img


def draw_batch(scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 1]."""
    arr = np.stack([draw(s, rng) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
