"""Image helpers: tensors to PIL, and labelled sample grids for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] to PIL images."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_grid(rows: list[Tensor], path: str | Path, labels: list[str] | None = None, cell: int = 96) -> Path:
    """Save rows of images (each (B, 3, H, W)) as one PNG, upscaled to `cell` px, with a label per row."""
    label_w = 140 if labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, i * cell + cell // 2 - 6), labels[i], fill="black")
        for j, img in enumerate(to_pil(row)):
            resample = Image.NEAREST if img.width <= cell else Image.LANCZOS  # crisp pixels up, smooth down
            grid.paste(img.resize((cell, cell), resample), (label_w + j * cell, i * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
