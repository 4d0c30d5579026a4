"""Built-in rewards for the tiny world, hard to satisfy with degenerate images.

Every reward takes images (B, 3, H, W) in [0, 1] and one prompt per image and returns (B,)
scores in [0, 1]. A pixel "shows" a colour when it lies within COLOUR_TOLERANCE of it in RGB;
real data shows exactly the two prompt colours, so noise (no pixel near either), blur (mixed
colours along every edge) and flat images (no shape, or no background border) all score low.

- `fidelity`: the prompt is shown: background border, foreground colour, shape (told apart by how
  much of its bounding box it fills), and nothing else.
- `large`: the preference that the base model does not satisfy: a bigger shape, while the
  border stays background and the image stays crisp.
- `crispness`: prompt-free blur measure: the share of pixels within tolerance of a palette colour.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pso.loop import RewardFn
from pso.tiny.world import BORDER, COLOURS, parse_prompt

COLOUR_TOLERANCE = 0.15  # RGB distance in [0, 1] units; the closest palette pair is 0.31 apart
MIN_SHAPE_PIXELS = 30  # a shape smaller than this is not a shape (data: at least ~60)
FILL_RATIO = {"square": 1.0, "circle": 0.69, "triangle": 0.50}  # shape area / bounding-box area in data
FILL_TEMPERATURE = 0.002  # softness of the nearest-fill-ratio shape decision
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255


def _near(images: Tensor, colours: Tensor) -> Tensor:
    """(B, H, W) bool: the pixel is within tolerance of its image's colour, colours (B, 3)."""
    return (images - colours[:, :, None, None]).norm(dim=1) < COLOUR_TOLERANCE


def _targets(prompts: list[str], device) -> tuple[Tensor, Tensor, list[str]]:
    scenes = [parse_prompt(p) for p in prompts]
    fg = torch.tensor([COLOURS[s.fg] for s in scenes], dtype=torch.float32, device=device) / 255
    bg = torch.tensor([COLOURS[s.bg] for s in scenes], dtype=torch.float32, device=device) / 255
    return fg, bg, [s.shape for s in scenes]


def _ring(h: int, w: int, device) -> Tensor:
    ring = torch.ones(h, w, dtype=torch.bool, device=device)
    ring[BORDER : h - BORDER, BORDER : w - BORDER] = False
    return ring


def _parts(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """The measured parts every reward combines, each (B,) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    images = images.float().clamp(0, 1)
    b, _, h, w = images.shape
    fg, bg, shapes = _targets(prompts, images.device)
    is_fg, is_bg = _near(images, fg), _near(images, bg)
    ring = _ring(h, w, images.device)
    border = (is_bg & ring).flatten(1).sum(1) / ring.sum()
    area = is_fg.flatten(1).sum(1).float()
    clean = (is_fg | is_bg).flatten(1).float().mean(1)
    shape_match = torch.zeros(b, device=images.device)
    names = list(FILL_RATIO)
    ratios = torch.tensor(list(FILL_RATIO.values()), device=images.device)
    for i in range(b):
        ys, xs = torch.nonzero(is_fg[i], as_tuple=True)
        if len(ys) >= MIN_SHAPE_PIXELS:
            fill = area[i] / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            # the shape whose fill ratio is nearest wins, softly: P(asked shape | fill)
            shape_match[i] = torch.softmax(-((fill - ratios) ** 2) / FILL_TEMPERATURE, 0)[names.index(shapes[i])]
    present = (area / MIN_SHAPE_PIXELS).clamp(max=1)
    return {"border": border, "present": present, "shape": shape_match, "clean": clean, "area": area / (h * w)}


def fidelity(images: Tensor, prompts: list[str]) -> Tensor:
    p = _parts(images, prompts)
    return p["border"] * p["present"] * p["shape"] * p["clean"] ** 4


def large(images: Tensor, prompts: list[str]) -> Tensor:
    """Foreground share of the image (data: about 0.05-0.45), counted only while the border shows the
    background and the image is crisp."""
    p = _parts(images, prompts)
    return p["area"] * p["border"] * p["clean"] ** 4


def crispness(images: Tensor, prompts: list[str] | None = None) -> Tensor:
    images = images.float().clamp(0, 1)
    dist = (images[:, None] - PALETTE.to(images.device)[None, :, :, None, None]).norm(dim=2)  # (B, 8, H, W)
    return (dist.min(1).values < COLOUR_TOLERANCE).flatten(1).float().mean(1)


REWARDS: dict[str, RewardFn] = {"fidelity": fidelity, "large": large, "crispness": crispness}
