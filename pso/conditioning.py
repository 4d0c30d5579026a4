"""Text conditioning for any denoiser, computed once per prompt and reused for every step.

A denoiser (pso/denoisers) encodes prompts into the keyword arguments its backbone takes; this
container only knows how to select and join samples, so the policy, the losses and the learner
handle every model kind alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

Tree = Any  # a Tensor (batch-first), a list with one entry per sample, None, or a dict of trees


def _map(tree: Tree, leaf: Callable[[Tensor | list], Tensor | list]) -> Tree:
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: _map(v, leaf) for k, v in tree.items()}
    return leaf(tree)


def _select(tree: Tree, idx: Tensor | slice) -> Tree:
    def leaf(x):
        if isinstance(x, Tensor):
            return x[idx]
        # per-sample lists (variable-length text embeddings)
        rows = range(len(x))[idx] if isinstance(idx, slice) else idx.tolist()
        return [x[i] for i in rows]

    return _map(tree, leaf)


def _join(trees: list[Tree]) -> Tree:
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: _join([t[k] for t in trees]) for k in first}
    if isinstance(first, Tensor):
        return torch.cat(trees)
    return [row for t in trees for row in t]


@dataclass
class Conditioning:
    """Backbone keyword arguments for a batch of prompts.

    `batched` holds one row per sample (tensors batch-first, or per-sample lists); `shared` is the same
    for every sample (e.g. FLUX's text position ids). `uncond` is set when classifier-free guidance is
    on, and the guided prediction is uncond + guidance_scale * (cond - uncond).
    """

    batched: dict[str, Tree]
    shared: dict[str, Any] = field(default_factory=dict)
    uncond: Conditioning | None = None
    guidance_scale: float = 0.0

    def index(self, idx: Tensor | slice) -> Conditioning:
        """Select rows (e.g. repeat each prompt G times, or take a micro-batch)."""
        return replace(
            self, batched=_select(self.batched, idx), uncond=None if self.uncond is None else self.uncond.index(idx)
        )

    @classmethod
    def cat(cls, items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension (all items share guidance settings and `shared`)."""
        first = items[0]
        return replace(
            first,
            batched=_join([c.batched for c in items]),
            uncond=None if first.uncond is None else cls.cat([c.uncond for c in items]),
        )
