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
# Beyond the base world (pso/tiny/tasks.py): a shape the base students never saw, the rare word that names it in
# the subject task, and the styles a shape can be drawn in (the base students only ever saw "filled").
NEW_SHAPE = "cross"  # a plus sign
# One token in every shipped tokenizer: "sks" (one token in real CLIP) is two in the tiny one ("sk s"), which
# shifts the background colour word one place and the tiny text encoder then loses it (the base drew "a red sks
# on a blue background" with an orange background); "pixel" is a vocabulary word no tiny-world prompt uses.
IDENTIFIER = "pixel"
STYLES = ("filled", "sepia")
# "sepia": the filled scene with every colour mixed SEPIA_MIX of the way toward the brown SEPIA (a palette style).
# Chosen for the shipped VAE (4x8x8 latents), which knows the palette's eight colours and little else: it keeps
# about half of the tint (its round trips of the targets sit halfway between the plain and the sepia colours),
# where a two-copy layout ("twins") survived the VAE but no method could teach it to the 1-step student.
SEPIA = (140, 89, 51)
SEPIA_MIX = 0.4
CROSS_MIN_HALF = 8  # a cross is drawn at half-extent CROSS_MIN_HALF..MAX_HALF, so its arms survive the VAE
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


def parse_any_prompt(prompt: str) -> Scene:
    """Like parse_prompt, but the shape word may also be NEW_SHAPE or IDENTIFIER (which names NEW_SHAPE)."""
    m = _PROMPT.match(prompt.strip().lower())
    if m and m[2] in (NEW_SHAPE, IDENTIFIER) and m[1] in COLOURS and m[3] in COLOURS and m[1] != m[3]:
        return Scene(m[1], NEW_SHAPE, m[3])
    return parse_prompt(prompt)


def cross_arm(half: int) -> int:
    """Half-thickness of a cross's arms: at the drawn sizes (CROSS_MIN_HALF..MAX_HALF) arms 5 px wide up to
    half-extent 8, 7 px above (the VAE blurs thinner arms away)."""
    return max(1, half // 3)


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """`mask` eroded `steps` times by the 4-neighbourhood; outside the image counts as outside the mask."""
    for _ in range(steps):
        m = np.pad(mask, 1)
        mask = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask


def shape_mask(shape: str, cx: int, cy: int, half: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent `half`."""
    y, x = np.mgrid[0:size, 0:size]
    if shape == NEW_SHAPE:
        arm = cross_arm(half)
        box = (abs(x - cx) <= half) & (abs(y - cy) <= half)
        return box & ((abs(x - cx) <= arm) | (abs(y - cy) <= arm))
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (abs(x - cx) <= half) & (abs(y - cy) <= half)
    # an upward triangle: apex at (cx, cy - half), base on row cy + half
    rows = (y - (cy - half)) / (2 * half)
    return (y >= cy - half) & (y <= cy + half) & (abs(x - cx) <= rows * half)


def draw(scene: Scene, rng: np.random.Generator, half: int | None = None, style: str = "filled") -> np.ndarray:
    """A (size, size, 3) uint8 image of the scene at a random size and position inside the border (a cross:
    half-extent at least CROSS_MIN_HALF); `style` "sepia" tints it (`in_sepia`)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {list(STYLES)}")
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[scene.bg]
    low = CROSS_MIN_HALF if scene.shape == NEW_SHAPE else MIN_HALF
    half = int(rng.integers(low, MAX_HALF + 1)) if half is None else half
    lo, hi = BORDER + half, IMAGE_SIZE - 1 - BORDER - half
    cx, cy = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img[shape_mask(scene.shape, cx, cy, half)] = COLOURS[scene.fg]
    return in_sepia(img) if style == "sepia" else img


def in_sepia(image: np.ndarray) -> np.ndarray:
    """A uint8 image (or colours) in the sepia style: each colour mixed SEPIA_MIX of the way toward SEPIA."""
    mixed = (1 - SEPIA_MIX) * image.astype(np.float64) + SEPIA_MIX * np.asarray(SEPIA, np.float64)
    return np.rint(mixed).astype(np.uint8)


def draw_batch(scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 1]."""
    arr = np.stack([draw(s, rng) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
