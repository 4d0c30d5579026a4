"""Turn scored groups of G >= 2 samples into (winner, loser) pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from pso.config.schema import PairingConfig


def normalize_scores(scores: Tensor, mode: str) -> Tensor:
    """Per-group normalisation; a group with no spread normalises to zeros (all ties)."""
    if mode == "none":
        return scores
    std = scores.std(unbiased=False)
    return torch.zeros_like(scores) if std == 0 else (scores - scores.mean()) / std


def pairs_in_group(scores: Tensor, cfg: PairingConfig) -> list[tuple[int, int]]:
    """Pairs (winner, loser) of one group, indices into it. A pair needs winner - loser > margin,
    so ties never pair."""
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"a group needs at least 2 scores, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite, got {scores.tolist()}")
    s = normalize_scores(scores.double(), cfg.normalize)
    if cfg.strategy == "best-vs-worst":
        w, lo = int(s.argmax()), int(s.argmin())
        candidates = [(w, lo)]
    else:
        n = len(s)
        candidates = [(i, j) for i in range(n) for j in range(n) if i != j]
    return [(w, lo) for w, lo in candidates if float(s[w] - s[lo]) > cfg.margin]


def pairs_in_groups(scores: Tensor, group_size: int, cfg: PairingConfig) -> list[tuple[int, int]]:
    """Pairs over consecutive groups of `group_size` (prompt-major), as global indices."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    if len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group_size}")
    out = []
    for start in range(0, len(scores), group_size):
        out += [(start + w, start + lo) for w, lo in pairs_in_group(scores[start : start + group_size], cfg)]
    return out
