"""Pairs from a pairwise judge instead of scalar scores: a round-robin within each group.

Every two candidates of a group are shown to the judge in both orders, n (n - 1) judgements for n candidates
(2 for the default group of 2, 12 for a group of 4). A judgement is the judge's preference for the image shown
first, from 0 (the second is better) through 0.5 (a tie) to 1. Both orders must agree for a pair to count:
- the same candidate preferred in both orders: a (winner, loser) pair;
- a tie in either order: a tie;
- the first-shown (or the second-shown) image preferred both times: inconsistent, a judge voting by position.
Ties and inconsistent judgements never make pairs; both are counted and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def round_robin(n: int) -> list[tuple[int, int]]:
    """The (first, second) orders a group of n candidates is judged in: both orders of every two."""
    if n < 2:
        raise ValueError(f"a group needs at least 2 candidates, got {n}")
    return [(i, j) for i in range(n) for j in range(n) if i != j]


@dataclass
class Tournament:
    pairs: list[tuple[int, int]]  # (winner, loser), as the pairing strategy picks them among the decided ones
    decided: list[tuple[int, int]]  # every (winner, loser) both orders agreed on
    ties: int
    inconsistent: int
    net_wins: list[int]  # per candidate: decided wins minus decided losses

    @property
    def scores(self) -> torch.Tensor:
        """Per candidate, net wins over the n - 1 others: -1 (lost to all) to 1 (beat all)."""
        n = len(self.net_wins)
        return torch.tensor(self.net_wins, dtype=torch.float32) / (n - 1)


def _side(preference: float) -> int:
    """+1 the first shown is preferred, -1 the second, 0 a tie."""
    return (preference > 0.5) - (preference < 0.5)


def decide(n: int, preferences: Sequence[float], strategy: str = "all-pairs") -> Tournament:
    """The tournament of n candidates from the judge's preferences for round_robin(n), in that order.
    `strategy` "all-pairs" keeps every decided pair; "best-vs-worst" keeps the pair of the candidates with the
    most and the fewest net wins, when the judge decided it (else none)."""
    orders = round_robin(n)
    if len(preferences) != len(orders):
        raise ValueError(f"{n} candidates need {len(orders)} judgements, got {len(preferences)}")
    side = {order: _side(float(p)) for order, p in zip(orders, preferences)}
    decided, ties, inconsistent = [], 0, 0
    net = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            a, b = side[(i, j)], -side[(j, i)]  # each: +1 when i is preferred, -1 when j is
            if side[(i, j)] and side[(i, j)] == side[(j, i)]:
                inconsistent += 1
            elif a == 0 or b == 0:
                ties += 1
            else:
                winner, loser = (i, j) if a > 0 else (j, i)
                decided.append((winner, loser))
                net[winner] += 1
                net[loser] -= 1
    if strategy == "all-pairs":
        pairs = decided
    elif strategy == "best-vs-worst":
        best, worst = max(range(n), key=net.__getitem__), min(range(n), key=net.__getitem__)
        pairs = [(best, worst)] if (best, worst) in decided else []
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}")
    return Tournament(pairs, decided, ties, inconsistent, net)
