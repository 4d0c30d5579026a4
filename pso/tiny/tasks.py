"""Data for the tasks beyond the base tiny world (issue 15): a style, a subject, offline preferences.

The shipped students (`builtin:tiny`, `builtin:tiny-flow`) only ever saw filled circles, squares and
triangles, so each task asks for something they do not do, measured by a reward in pso.tiny.rewards:

- style (`style_targets`): the world's scenes drawn in sepia (every colour mixed SEPIA_MIX of the way toward a
  brown), with their ordinary captions: the style is learnt from the images, not the words. Measured by
  `sepia`; `style_fidelity` and `style_crispness` check that the prompt still holds and the image stays crisp
  in either palette. The shipped VAE keeps about half the tint: its round trip of the targets scores `sepia`
  0.27 (plain scenes: 0.02), which caps what any method can reach through it.
- subject (`subject_targets`): at most 8 images of a shape the world never draws (NEW_SHAPE, a plus sign with
  thick arms, at least CROSS_MIN_HALF in half-extent so that it survives the VAE),
  named by the rare identifier IDENTIFIER in the shape slot ("a red pixel on a blue background"), in the few
  colour pairs SUBJECT_COLOURS. `subject_eval_prompts` asks for it in every other colour pair, and for the
  ordinary scenes that must stay unchanged. Measured by `subject`.
- offline (`preference_pairs`): a Pick-a-Pic v2-style preference data set labelled by the `large` reward.

`build_task_data` writes each one where a `pso up` config can point: a Hugging Face imagefolder (images and
metadata.jsonl) for style and subject, a parquet file for offline; the same seed writes the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pso.tiny.rewards import large
from pso.tiny.world import COLOURS, IDENTIFIER, NEW_SHAPE, SHAPES, Scene, draw, random_scenes

TASKS = ("style", "subject", "offline")
DATA_VERSION = 3  # raised whenever the data changes: built-in data cached under an older one is built again
STYLE = "sepia"
STYLE_TARGETS = 48
SUBJECT_COLOURS: tuple[tuple[str, str], ...] = (("red", "blue"), ("yellow", "purple"), ("white", "black"))
MAX_SUBJECT_TARGETS = 8
PREFERENCE_PAIRS = 1024
ROW_GROUP_SIZE = 256
BLUR_SHARE = 0.25  # share of preference images blurred (sigma BLUR_SIGMA): worse fidelity, lower `large`
BLUR_SIGMA = 1.0
TIE_TOLERANCE = 1e-6
PREFERENCE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "are_different", "has_label")

Item = tuple[str, np.ndarray]  # caption, (H, W, 3) uint8 image


# ----- style -----


def style_targets(n: int = STYLE_TARGETS, seed: int = 0) -> list[Item]:
    """n random scenes drawn in the style STYLE, with their ordinary captions."""
    rng = np.random.default_rng(seed)
    return [(s.prompt, draw(s, rng, style=STYLE)) for s in random_scenes(rng, n)]


# ----- subject -----


def subject_prompt(fg: str, bg: str) -> str:
    return f"a {fg} {IDENTIFIER} on a {bg} background"


def subject_targets(n: int = MAX_SUBJECT_TARGETS, seed: int = 0) -> list[Item]:
    """n <= 8 images of NEW_SHAPE captioned with IDENTIFIER, cycling through SUBJECT_COLOURS."""
    if not 1 <= n <= MAX_SUBJECT_TARGETS:
        raise ValueError(f"a subject is learnt from 1 to {MAX_SUBJECT_TARGETS} images, not {n}")
    rng = np.random.default_rng(seed)
    pairs = [SUBJECT_COLOURS[i % len(SUBJECT_COLOURS)] for i in range(n)]
    return [(subject_prompt(fg, bg), draw(Scene(fg, NEW_SHAPE, bg), rng)) for fg, bg in pairs]


def unseen_colour_pairs() -> list[tuple[str, str]]:
    """Every (foreground, background) pair the subject targets never show."""
    return [(fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg and (fg, bg) not in SUBJECT_COLOURS]


def subject_class_prompts() -> list[str]:
    """The prior-preservation prompts: the ordinary scenes (every old shape) in the targets' colour pairs.

    The identifier takes the shape slot, so its class is "whatever the shape word names". The world has no
    word for a generic shape that the students ever saw ("shape" is in the tokenizer, but untrained), so
    the closest existing class is the three trained shapes themselves; these prompts in the very colour pairs
    the targets use are where the new shape would leak first."""
    return [Scene(fg, shape, bg).prompt for fg, bg in SUBJECT_COLOURS for shape in SHAPES]


def subject_eval_prompts(n: int = 32, seed: int = 0) -> dict[str, list[str]]:
    """ "subject": n identifier prompts in colour pairs the targets never show (the `subject` reward should
    rise on them); "ordinary": n prompts without the identifier, the class prompts first, then random
    scenes (`fidelity` should hold and `subject` stay low on them)."""
    rng = np.random.default_rng(seed)
    unseen = unseen_colour_pairs()
    picks = rng.permutation(len(unseen))
    picks = np.concatenate([picks, rng.integers(len(unseen), size=max(0, n - len(unseen)))])[:n]
    ordinary = subject_class_prompts() + [s.prompt for s in random_scenes(rng, n)]
    return {"subject": [subject_prompt(*unseen[i]) for i in picks], "ordinary": ordinary[:n]}


# ----- offline preferences -----


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a uint8 image (edges replicated), rounded back to uint8."""
    r = np.arange(-3, 4)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k /= k.sum()
    x = np.pad(image.astype(np.float64), ((3, 3), (3, 3), (0, 0)), mode="edge")
    x = sum(w * x[3 + d : x.shape[0] - 3 + d] for d, w in zip(r, k))
    x = sum(w * x[:, 3 + d : x.shape[1] - 3 + d] for d, w in zip(r, k))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def preference_labels(image_0: np.ndarray, image_1: np.ndarray, caption: str) -> tuple[float, float]:
    """The rule: the `large` reward prefers one image (1.0 / 0.0); equal scores are a tie (0.5 / 0.5)."""
    x = torch.from_numpy(np.stack([image_0, image_1])).permute(0, 3, 1, 2).float() / 255
    s0, s1 = (float(v) for v in large(x, [caption, caption]))
    if abs(s0 - s1) <= TIE_TOLERANCE:
        return 0.5, 0.5
    return (1.0, 0.0) if s0 > s1 else (0.0, 1.0)


def preference_pairs(n: int = PREFERENCE_PAIRS, seed: int = 0) -> list[dict]:
    """n pairs in Pick-a-Pic v2's layout: two images for one caption (PNG bytes in jpg_0 and jpg_1, as
    Pick-a-Pic's columns are named), label_0 and label_1 from `preference_labels`.

    Each image is a fresh draw of the caption's scene at its own random size, and BLUR_SHARE of them are
    blurred. So `large` prefers the bigger shape among crisp images and a crisp image over a blurred one
    (blur fails its crispness term), and ties when both are crisp at the same size (about 1 in 7 of the
    crisp pairs) or both score 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for scene in random_scenes(rng, n):
        images = []
        for _ in range(2):
            image = draw(scene, rng)
            if rng.random() < BLUR_SHARE:
                image = _blur(image, BLUR_SIGMA)
            images.append(image)
        label_0, label_1 = preference_labels(*images, scene.prompt)
        rows.append(
            {
                "caption": scene.prompt,
                "jpg_0": png_bytes(images[0]),
                "jpg_1": png_bytes(images[1]),
                "label_0": label_0,
                "label_1": label_1,
                "are_different": True,
                "has_label": True,
            }
        )
    return rows


PREFERENCE_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("are_different", pa.bool_()),
        ("has_label", pa.bool_()),
    ]
)


def write_preference_parquet(path: str | Path, pairs: Sequence[dict], row_group_size: int = ROW_GROUP_SIZE) -> Path:
    """Write pairs as one parquet file in row groups of `row_group_size` rows (readable a group at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(pairs), schema=PREFERENCE_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ----- imagefolder -----


def write_imagefolder(directory: str | Path, items: Sequence[Item]) -> Path:
    """Write `items` as a Hugging Face imagefolder: 00000.png, ... and metadata.jsonl with one
    {"file_name": ..., "text": caption} line per image. The folder must be new, empty, or hold only such a
    data set (which is replaced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    present = list(directory.iterdir())
    foreign = [p.name for p in present if not (p.name == "metadata.jsonl" or (p.suffix == ".png" and p.stem.isdigit()))]
    if foreign:
        raise FileExistsError(f"{directory} holds other files ({', '.join(sorted(foreign)[:5])}); use a new folder")
    for p in present:
        p.unlink()
    lines = []
    for i, (caption, image) in enumerate(items):
        name = f"{i:05d}.png"
        (directory / name).write_bytes(png_bytes(image))
        lines.append(json.dumps({"file_name": name, "text": caption}) + "\n")
    (directory / "metadata.jsonl").write_text("".join(lines))
    return directory


def read_imagefolder(directory: str | Path) -> list[Item]:
    directory = Path(directory)
    rows = [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]
    return [(r["text"], decode((directory / r["file_name"]).read_bytes())) for r in rows]


def build_task_data(task: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a task's data set and return what a `pso up` config points at: `out_dir` itself, an imagefolder
    of the targets (style: STYLE_TARGETS sepia images; subject: MAX_SUBJECT_TARGETS images of the new
    shape), or for offline `out_dir`/train.parquet with PREFERENCE_PAIRS pairs. Byte-identical for a seed."""
    if task == "style":
        return write_imagefolder(out_dir, style_targets(STYLE_TARGETS, seed))
    if task == "subject":
        return write_imagefolder(out_dir, subject_targets(MAX_SUBJECT_TARGETS, seed))
    if task == "offline":
        return write_preference_parquet(Path(out_dir) / "train.parquet", preference_pairs(PREFERENCE_PAIRS, seed))
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
