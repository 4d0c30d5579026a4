"""Per-model reward normalisation for training on several rewards at once.

A weighted sum of raw scores means little when the models score on different scales: PickScore moves by
about 1 around 21, HPSv2 by 0.01 around 0.27, so "weight 1 each" is PickScore alone. Standardising each
model's scores by its running mean and standard deviation first makes the weights say how much each model
counts: total = sum over models of weight x (score - mean) / std.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

MIN_STD = 1e-8  # a model whose scores have not varied yet contributes (score - mean) unscaled, which is 0


class RunningMoments:
    """Count, mean and variance of every value seen, updated a batch at a time (Chan et al.'s merge of
    Welford's sums: exact, and stable over millions of values)."""

    def __init__(self) -> None:
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if n == 0:
            return
        batch_mean = math.fsum(values) / n
        batch_m2 = math.fsum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The population standard deviation of the values seen (0 before two of them)."""
        return math.sqrt(self._m2 / self.count) if self.count > 1 else 0.0


class RewardNormalizer:
    """The weighted sum of each model's standardised scores, with the moments kept per model."""

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("reward normalisation needs at least one model and its weight")
        self.weights = dict(weights)
        self.moments = {name: RunningMoments() for name in self.weights}

    def total(self, per_model: Mapping[str, Sequence[float]]) -> Tensor:
        """Add the scores to each model's moments, then return (N,) weighted standardised totals."""
        missing = set(self.weights) - set(per_model)
        if missing:
            raise ValueError(f"scores lack the models {sorted(missing)}")
        total = None
        for name, weight in self.weights.items():
            moments = self.moments[name]
            moments.update([float(v) for v in per_model[name]])
            scores = torch.tensor(per_model[name], dtype=torch.float64)
            part = weight * (scores - moments.mean) / max(moments.std, MIN_STD)
            total = part if total is None else total + part
        return total.float()

    def state(self) -> dict[str, dict[str, float]]:
        """Per model: how many scores seen, their mean and standard deviation (what the actor reports)."""
        return {n: {"count": m.count, "mean": m.mean, "std": m.std} for n, m in self.moments.items()}
