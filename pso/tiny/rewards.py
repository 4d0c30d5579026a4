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

For the tasks beyond the base world (pso/tiny/tasks.py):
- `sepia`: the style measure: how far the scene's colours are tinted toward the sepia style (0 plain, 1 as
  drawn in the style), read where the background shows and the shape is present.
- `style_fidelity`: `fidelity` in either palette: a pixel shows a prompt colour when it lies within tolerance
  of the segment from the plain colour to its sepia version, so that the prompt is checked whatever the tint.
  Equal to `fidelity` on drawn plain scenes; 1 on drawn sepia scenes.
- `style_crispness`: `crispness` in either palette (the distance to the nearest palette colour's segment).
- `subject`: the new shape (a cross, named by the identifier in subject prompts) in the prompt's colours,
  told apart from circle, square and triangle by `shape_probs`. Prompts may name any shape: on an ordinary
  prompt it measures whether the new shape leaks in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pso.loop import RewardFn
from pso.tiny.world import BORDER, COLOURS, NEW_SHAPE, SEPIA, SEPIA_MIX, parse_any_prompt, parse_prompt

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


# ----- beyond the base world: style (sepia), subject (a new shape) -----

SEPIA_RGB = torch.tensor(SEPIA, dtype=torch.float32) / 255
SUBJECT_CLEAN_POWER = 0.5  # calibrated on VAE round trips of the targets (see subject)
CROSS_RAMP = 0.2  # template-IoU lead over the best old shape that takes P(cross) from 0 to 1, centred on 0
CROSS_MAX_ARM = 0.4  # the fitted cross's arms are at most this share of its span (drawn: 0.20-0.29)


def _check(images: Tensor, prompts: list[str]) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    return images.float().clamp(0, 1)


def _colours(prompts: list[str], device) -> tuple[Tensor, Tensor]:
    scenes = [parse_any_prompt(p) for p in prompts]
    fg = torch.tensor([COLOURS[s.fg] for s in scenes], dtype=torch.float32, device=device) / 255
    bg = torch.tensor([COLOURS[s.bg] for s in scenes], dtype=torch.float32, device=device) / 255
    return fg, bg


def _fill_probs(mask: Tensor) -> Tensor:
    """(B, 3) P(square, circle, triangle | how much of its bounding box `mask` fills), computed exactly as
    `fidelity` decides the shape; rows of zeros where the mask is too small to be a shape."""
    probs = torch.zeros(len(mask), len(FILL_RATIO), device=mask.device)
    ratios = torch.tensor(list(FILL_RATIO.values()), device=mask.device)
    area = mask.flatten(1).sum(1).float()
    for i in range(len(mask)):
        ys, xs = torch.nonzero(mask[i], as_tuple=True)
        if len(ys) >= MIN_SHAPE_PIXELS:
            fill = area[i] / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            probs[i] = torch.softmax(-((fill - ratios) ** 2) / FILL_TEMPERATURE, 0)
    return probs


def _templates(ys: Tensor, xs: Tensor, area: float, h: int, w: int) -> dict[str, Tensor]:
    """Each shape drawn into the bounding box of the pixels (ys, xs), as pso.tiny.world draws it; the cross's
    arm width is the one that gives it `area` pixels, at most CROSS_MAX_ARM of its span."""
    y0, y1, x0, x1 = (float(v) for v in (ys.min(), ys.max(), xs.min(), xs.max()))
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, 0.5), max((x1 - x0) / 2, 0.5)
    y, x = torch.meshgrid(torch.arange(h, device=ys.device), torch.arange(w, device=ys.device), indexing="ij")
    y, x = y.float(), x.float()
    box = (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
    sy, sx = y1 - y0 + 1, x1 - x0 + 1
    arm = ((sx + sy) - max((sx + sy) ** 2 - 4 * area, 0.0) ** 0.5) / 2  # a*sx + a*sy - a^2 = area
    arm = min(arm, CROSS_MAX_ARM * min(sx, sy))  # thicker arms would make a cross of any blob
    return {
        "square": box,
        "circle": ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1 + 1e-6,
        "triangle": box & ((x - cx).abs() <= (y - y0) / max(y1 - y0, 1) * rx + 1e-6),
        NEW_SHAPE: box & (((x - cx).abs() < arm / 2) | ((y - cy).abs() < arm / 2)),
    }


def shape_probs(mask: Tensor) -> Tensor:
    """(B, 4) P(square, circle, triangle, cross | mask): `fidelity`'s fill-ratio decision among the three
    old shapes, times 1 - P(cross); P(cross) ramps from 0 to 1 as the mask's IoU with a cross fitted to
    its bounding box goes from CROSS_RAMP / 2 below to CROSS_RAMP / 2 above its best IoU with a fitted old
    shape. Drawn circles, squares and triangles lead the cross by far more than that, so on them P(cross)
    is exactly 0 and the first three columns are `fidelity`'s shape scores unchanged."""
    old = _fill_probs(mask)
    p_cross = torch.zeros(len(mask), device=mask.device)
    h, w = mask.shape[1:]
    for i in range(len(mask)):
        ys, xs = torch.nonzero(mask[i], as_tuple=True)
        if len(ys) >= MIN_SHAPE_PIXELS:
            t = _templates(ys, xs, float(len(ys)), h, w)
            iou = {k: float((v & mask[i]).sum() / (v | mask[i]).sum()) for k, v in t.items()}
            lead = iou[NEW_SHAPE] - max(iou[k] for k in FILL_RATIO)
            p_cross[i] = min(max(0.5 + lead / CROSS_RAMP, 0.0), 1.0)
    return torch.cat([old * (1 - p_cross[:, None]), p_cross[:, None]], 1)


SHAPE_CLASSES = (*FILL_RATIO, NEW_SHAPE)  # the columns of shape_probs


def _nearer_fg(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """`subject`'s parts: the pixels nearer the foreground colour than the background colour, the border and
    the crispness as `fidelity` reads them."""
    images = _check(images, prompts)
    _, _, h, w = images.shape
    fg, bg = _colours(prompts, images.device)
    to_fg, to_bg = (images - fg[:, :, None, None]).norm(dim=1), (images - bg[:, :, None, None]).norm(dim=1)
    is_fg, is_bg = to_fg < COLOUR_TOLERANCE, to_bg < COLOUR_TOLERANCE
    ring = _ring(h, w, images.device)
    return {
        "nearer_fg": to_fg < to_bg,
        "border": (is_bg & ring).flatten(1).sum(1) / ring.sum(),
        "clean": (is_fg | is_bg).flatten(1).float().mean(1),
    }


def sepia_colours(colours: Tensor) -> Tensor:
    """Colours (..., 3) in [0, 1] as the sepia style draws them (pso.tiny.world.in_sepia, unrounded)."""
    return (1 - SEPIA_MIX) * colours + SEPIA_MIX * SEPIA_RGB.to(colours.device)


def _along_sepia(images: Tensor, colours: Tensor) -> tuple[Tensor, Tensor]:
    """Each pixel against the segment from its image's colour (B, 3) to that colour's sepia version: (B, H, W)
    distance to the segment, and (B, H, W) position of the nearest point on it (0 plain, 1 sepia)."""
    plain = colours[:, :, None, None]
    step = sepia_colours(colours)[:, :, None, None] - plain
    t = (((images - plain) * step).sum(1) / (step * step).sum(1).clamp(min=1e-8)).clamp(0, 1)
    return (images - plain - t[:, None] * step).norm(dim=1), t


def _sepia_parts(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """`fidelity`'s parts with a pixel showing a prompt colour anywhere between plain and sepia."""
    images = _check(images, prompts)
    _, _, h, w = images.shape
    fg, bg = _colours(prompts, images.device)
    (d_fg, t_fg), (d_bg, t_bg) = _along_sepia(images, fg), _along_sepia(images, bg)
    is_fg, is_bg = d_fg < COLOUR_TOLERANCE, d_bg < COLOUR_TOLERANCE
    ring = _ring(h, w, images.device)
    return {
        "is_fg": is_fg,
        "border": (is_bg & ring).flatten(1).sum(1) / ring.sum(),
        "present": (is_fg.flatten(1).sum(1) / MIN_SHAPE_PIXELS).clamp(max=1),
        "clean": (is_fg | is_bg).flatten(1).float().mean(1),
        "tint": torch.where(d_fg < d_bg, t_fg, t_bg),
        "shown": is_fg | is_bg,
    }


def sepia(images: Tensor, prompts: list[str]) -> Tensor:
    """How sepia the scene is: the median tint (0 plain, 1 as the style draws it) of the pixels that show a
    prompt colour in either palette, counted while the border shows the background and the shape is present
    (a flat brown image, noise or an empty scene score about 0). The median, not the mean: a plain image's
    small colour errors, clamped at 0, would add up to a tint."""
    p = _sepia_parts(images, prompts)
    tint = torch.where(p["shown"], p["tint"], torch.nan).flatten(1).nanmedian(1).values.nan_to_num(0.0)
    return tint * p["border"] * p["present"]


def style_fidelity(images: Tensor, prompts: list[str]) -> Tensor:
    """`fidelity` in either palette: border, presence, shape and crispness as `fidelity` reads them, with a
    pixel showing a prompt colour when it lies within tolerance of the segment from the plain colour to its
    sepia version. The prompt holds whatever the tint; a blurred, noisy or wrong scene fails as in `fidelity`."""
    p = _sepia_parts(images, prompts)
    shapes = [parse_prompt(q).shape for q in prompts]
    shape = _fill_probs(p["is_fg"])[torch.arange(len(shapes)), [list(FILL_RATIO).index(s) for s in shapes]]
    return p["border"] * p["present"] * shape * p["clean"] ** 4


def style_crispness(images: Tensor, prompts: list[str] | None = None) -> Tensor:
    """`crispness` in either palette: the share of pixels within tolerance of the segment from some palette
    colour to its sepia version."""
    images = images.float().clamp(0, 1)
    dist = torch.stack([_along_sepia(images, c.expand(len(images), 3))[0] for c in PALETTE.to(images.device)])
    return (dist.min(0).values < COLOUR_TOLERANCE).flatten(1).float().mean(1)


def subject(images: Tensor, prompts: list[str]) -> Tensor:
    """The new shape (pso.tiny.world.NEW_SHAPE) in the prompt's foreground colour on its background:
    border x present x P(cross) x clean^SUBJECT_CLEAN_POWER, as `fidelity` with the cross asked for, but softer
    on the VAE's soft edges and colour shifts: the shape (present, P(cross)) is read from the pixels nearer the
    foreground colour than the background colour, and crispness weighs less. Equal to border x P(cross) on
    drawn (crisp) images. Prompts may name the identifier, the new shape or an old shape (then it measures the
    new shape leaking into them)."""
    p = _nearer_fg(images, prompts)
    present = (p["nearer_fg"].flatten(1).sum(1) / MIN_SHAPE_PIXELS).clamp(max=1)
    cross = shape_probs(p["nearer_fg"])[:, -1]
    return p["border"] * present * cross * p["clean"] ** SUBJECT_CLEAN_POWER


REWARDS: dict[str, RewardFn] = {
    "fidelity": fidelity,
    "large": large,
    "crispness": crispness,
    "sepia": sepia,
    "style_fidelity": style_fidelity,
    "style_crispness": style_crispness,
    "subject": subject,
}
