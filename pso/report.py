"""What a run leaves behind for people to look at: a reward curve, sample grids, a summary."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
from PIL import Image

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return rows


def reward_curve(
    rows: list[dict],
    path: Path,
    title: str,
    window: int = 10,
    key: str = "reward_mean",
    label: str = "reward of the samples trained on",
) -> Path:
    """Mean reward of the samples each update trained on (or another figure of the rows, `key`), raw and as a
    moving average, by update."""
    rows = [r for r in rows if key in r]
    updates = [r["updates"] for r in rows]
    rewards = [r[key] for r in rows]
    smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
              for i in range(len(rewards))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(updates, rewards, color="#9ab", linewidth=0.8, label="per update")
    ax.plot(updates, smooth, color="#c33", linewidth=2, label=f"moving average ({window})")
    ax.set_xlabel("update")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_curve(cfg, rows: list[dict], path: Path) -> Path:
    """The curve of a run of `cfg` (a PSOConfig): the reward of the samples trained on, or for offline training
    (no samples, no rewards) the implicit-reward accuracy of the pairs trained on."""
    if cfg.preferences is not None:
        from pso.offline import CURVE

        key, label = CURVE
        return reward_curve(rows, path, f"offline {cfg.loss.name}, run {cfg.redis.run}", key=key, label=label)
    return reward_curve(rows, path, f"online PSO, run {cfg.redis.run}")


def versions_sheet(grids_dir: Path, path: Path, rows: int = 6) -> Path | None:
    """One picture of how the samples changed: the per-version grids (same prompts and noise), stacked
    top to bottom for up to `rows` versions spread evenly from the first to the last."""
    files = sorted(grids_dir.glob("v*.png"))
    if not files:
        return None
    step = max(1, (len(files) - 1) / max(rows - 1, 1))
    chosen = sorted({files[min(round(i * step), len(files) - 1)] for i in range(rows)} | {files[-1]})
    images = [Image.open(f).convert("RGB") for f in chosen]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    sheet.save(path)
    return path
