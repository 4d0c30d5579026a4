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
- `twin`: the style measure: the shape is drawn twice, as two separate foreground blobs of about the same size
  (one shape, filled or blurred, scores 0).
- `style_fidelity`: `fidelity` with the shape told from the largest foreground component instead of all the
  foreground pixels, so that twins of the asked shape in the asked colours score as one copy does. Equal to
  `fidelity` on any image whose foreground pixels form one 8-connected component (all drawn filled scenes).
- `subject`: the new shape (a cross, named by the identifier in subject prompts) in the prompt's colours,
  told apart from circle, square and triangle by `shape_probs`. Prompts may name any shape: on an ordinary
  prompt it measures whether the new shape leaks in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pso.loop import RewardFn
from pso.tiny.world import BORDER, COLOURS, NEW_SHAPE, parse_any_prompt, parse_prompt

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


# ----- beyond the base world: style (twin), subject (a new shape) -----

TWIN_MIN_PIXELS = 30  # the second copy's size that counts fully (drawn copies: at least ~60 px)
TWIN_BALANCE = 0.5  # the second copy's share of the first's size that counts fully (drawn: 1)
TWIN_CLEAN_POWER = 1  # calibrated on VAE round trips of the targets (see twin)
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


def components(mask: Tensor) -> Tensor:
    """(B, H, W) int64 labels of `mask`'s 8-connected components (0 outside the mask; each component labelled
    by one of its pixels' 1-based flat index)."""
    b, h, w = mask.shape
    index = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    labels = torch.where(mask[:, None], index, torch.zeros_like(index))
    while True:
        grown = torch.where(mask[:, None], torch.nn.functional.max_pool2d(labels, 3, 1, 1), labels)
        if torch.equal(grown, labels):
            return labels[:, 0].long()
        labels = grown


def component_areas(mask: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """The k largest components of each mask: (B, k) pixel counts (0 where fewer) in decreasing order, and
    (B, H, W) bool: the largest component (all False on an empty mask)."""
    labels = components(mask)
    areas = torch.zeros(len(mask), k, device=mask.device)
    largest = torch.zeros_like(mask)
    for i in range(len(mask)):
        ids, counts = torch.unique(labels[i][mask[i]], return_counts=True)
        order = counts.argsort(descending=True, stable=True)[:k]
        areas[i, : len(order)] = counts[order].float()
        if len(order):
            largest[i] = labels[i] == ids[order[0]]
    return areas, largest


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


def _style_parts(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    images = _check(images, prompts)
    _, _, h, w = images.shape
    fg, bg = _colours(prompts, images.device)
    is_fg, is_bg = _near(images, fg), _near(images, bg)
    ring = _ring(h, w, images.device)
    area = is_fg.flatten(1).sum(1).float()
    return {
        "is_fg": is_fg,
        "is_bg": is_bg,
        "nearer_fg": (images - fg[:, :, None, None]).norm(dim=1) < (images - bg[:, :, None, None]).norm(dim=1),
        "border": (is_bg & ring).flatten(1).sum(1) / ring.sum(),
        "present": (area / MIN_SHAPE_PIXELS).clamp(max=1),
        "clean": (is_fg | is_bg).flatten(1).float().mean(1),
    }


def twin(images: Tensor, prompts: list[str]) -> Tensor:
    """How twin-like the image is: the pixels nearer the prompt's foreground colour than its background colour
    fall into two large 8-connected components: the second-largest has at least TWIN_MIN_PIXELS pixels and at
    least TWIN_BALANCE of the largest's (each ramps linearly to 1 there), counted while the border shows the
    background and the image is crisp (clean^TWIN_CLEAN_POWER: the VAE's soft edges and colour shifts pass, noise
    does not). A single shape, filled or blurred, has no second component and scores 0."""
    p = _style_parts(images, prompts)
    areas, _ = component_areas(p["nearer_fg"], 2)
    second = (areas[:, 1] / TWIN_MIN_PIXELS).clamp(max=1)
    balance = (areas[:, 1] / (TWIN_BALANCE * areas[:, 0]).clamp(min=1)).clamp(max=1)
    return p["border"] * second * balance * p["clean"] ** TWIN_CLEAN_POWER


def style_fidelity(images: Tensor, prompts: list[str]) -> Tensor:
    """`fidelity` in either style: the shape is decided from the largest foreground component's fill of its
    bounding box (for twins, one copy); colours, border, presence and crispness as in `fidelity`. Equal to
    `fidelity` on any image whose foreground pixels form one 8-connected component (every drawn filled scene)."""
    p = _style_parts(images, prompts)
    shapes = [parse_prompt(q).shape for q in prompts]
    _, largest = component_areas(p["is_fg"], 1)
    probs = _fill_probs(largest)
    shape = probs[torch.arange(len(shapes)), [list(FILL_RATIO).index(s) for s in shapes]]
    return p["border"] * p["present"] * shape * p["clean"] ** 4


def subject(images: Tensor, prompts: list[str]) -> Tensor:
    """The new shape (pso.tiny.world.NEW_SHAPE) in the prompt's foreground colour on its background:
    border x present x P(cross) x clean^SUBJECT_CLEAN_POWER, as `fidelity` with the cross asked for, but softer
    on the VAE's soft edges and colour shifts: the shape (present, P(cross)) is read from the pixels nearer the
    foreground colour than the background colour, and crispness weighs less. Equal to border x P(cross) on
    drawn (crisp) images. Prompts may name the identifier, the new shape or an old shape (then it measures the
    new shape leaking into them)."""
    p = _style_parts(images, prompts)
    present = (p["nearer_fg"].flatten(1).sum(1) / MIN_SHAPE_PIXELS).clamp(max=1)
    cross = shape_probs(p["nearer_fg"])[:, -1]
    return p["border"] * present * cross * p["clean"] ** SUBJECT_CLEAN_POWER


REWARDS: dict[str, RewardFn] = {
    "fidelity": fidelity,
    "large": large,
    "crispness": crispness,
    "twin": twin,
    "style_fidelity": style_fidelity,
    "subject": subject,
}
