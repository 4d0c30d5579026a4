"""`kind: python`: a scorer class of your own, named by import path in the server's config.

The scorer gets the server's batching, limits, metrics and readiness like the built-in kinds; it only
has to score. Its protocol (docs/reward-server.md, "Your own scorer"):

    class MyScorer:
        def __init__(self, device: str, **options): ...      # load once; options from the config
        def score(self, images, prompts) -> list[float]: ...  # images: uint8 (B, H, W, 3) CPU tensor

A pairwise judge has `compare(first, second, prompts) -> list[float]` instead of `score`: two uint8
(B, H, W, 3) tensors, and per pair its preference for the first image, from 0 (the second is better)
through 0.5 (a tie) to 1; it serves `/v1/compare` with `judge`. Either class takes optionally
`check_prompt(prompt) -> str | None` (a reason the prompt cannot be scored: the
caller gets a 422 naming it), and attributes `scale` (what the numbers mean), `version` (which
weights) and `higher_is_better` (True). Images in one call have one size: the server groups them by
size, or resizes them all to `image_size` when the config sets it.

`check_prompt` runs on the server's preprocessing threads, several at once, while `score` or `compare`
runs on the device's worker: keep it free of shared mutable state. The class is imported only from the
config the operator starts the server with, never from a request. A scorer that breaks its protocol (a
wrong number of scores, a non-number) fails the request with a 500 that names it in the server log, as
does any exception from `score` or `compare`: the caller's own mistakes are for `check_prompt` to refuse
(a 422).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch

from pso.config.reward_server import PythonSpec
from reward_server.backends.base import ModelInfo, RewardInputError
from reward_server.backends.resizing import ResizingBackend


class ScorerError(RuntimeError):
    """The configured scorer broke its protocol (the server's fault, not the caller's)."""


def import_scorer(path: str) -> type:
    """The class `module:Class` names, with an error that says which part is missing."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"scorer {path}: cannot import {module_name} ({e}); is its package installed?") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ImportError(f"scorer {path}: {module_name} has no class {class_name}")
    scores, compares = (callable(getattr(cls, method, None)) for method in ("score", "compare"))
    if scores == compares:
        raise TypeError(
            f"scorer {path}: {class_name} has {'both' if scores else 'neither'} score(images, prompts) "
            f"{'and' if scores else 'nor'} compare(first, second, prompts): a scorer has one, a judge the other"
        )
    return cls


class PythonBackend(ResizingBackend):
    kind = "python"

    def __init__(self, spec: PythonSpec, device: torch.device):
        super().__init__(spec, device)
        self.scorer = import_scorer(spec.scorer)(device=str(self.device), **spec.options)
        self._check_prompt = getattr(self.scorer, "check_prompt", None)
        self.pairwise = callable(getattr(self.scorer, "compare", None))

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.model_name,
            kind=self.kind,
            version=f"{self.spec.scorer}@{getattr(self.scorer, 'version', 'unversioned')}",
            scale=str(getattr(self.scorer, "scale", f"defined by {self.spec.scorer}")),
            higher_is_better=bool(getattr(self.scorer, "higher_is_better", True)),
            weight=self.spec.weight,
            pairwise=self.pairwise,
        )

    def check_prompt(self, prompt: str) -> None:
        problem = self._check_prompt(prompt) if self._check_prompt else None
        if problem:
            raise RewardInputError(str(problem))

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = self._numbers(self.scorer.score(pixels, list(prompts)), len(pixels), "score")
        if not all(math.isfinite(x) for x in scores):
            raise ScorerError(f"{self.spec.scorer}.score returned a non-finite score")
        return torch.tensor(scores, dtype=torch.float32)

    def compare_batch(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        preferences = self._numbers(self.scorer.compare(first, second, list(prompts)), len(first), "compare")
        if not all(0.0 <= x <= 1.0 for x in preferences):  # NaN fails too
            raise ScorerError(f"{self.spec.scorer}.compare returned a preference outside [0, 1]")
        return torch.tensor(preferences, dtype=torch.float32)

    def _numbers(self, out, n: int, method: str) -> list[float]:
        """`out` as n floats, or a ScorerError naming the scorer and what it returned."""
        try:
            values = [float(x) for x in (out.tolist() if hasattr(out, "tolist") else out)]
        except (TypeError, ValueError) as e:
            raise ScorerError(f"{self.spec.scorer}.{method} must return numbers, one per image ({e})") from e
        if len(values) != n:
            raise ScorerError(f"{self.spec.scorer}.{method} returned {len(values)} scores for {n} images")
        return values
