"""How many actors the learner wants: the autoscaling signal (`pso_learner_actors_wanted`).

Actors produce experience, the learner consumes it. Over a window of recent updates:

    C  records the learner consumes per second of busy (not waiting) time, times its ranks
    P  records the actors produced per second (the queue's `produced` counter)
    A  actors seen in that window (distinct ids on the records read)
    deficit = (target_backlog - backlog) / horizon_s   records per second to refill (or drain) the queue

    actors_wanted = A * (C + deficit) / P

A starved learner (P below C, backlog near zero) asks for proportionally more actors; a learner
behind its backlog (actors paused by back-pressure, so P is about C and the deficit negative)
asks for fewer. An autoscaler with target "1 per replica" (HPA AverageValue 1, KEDA threshold 1)
turns it into a replica count.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class _Sample:
    at: float
    produced: int
    busy_s: float
    consumed: int


class ActorDemand:
    def __init__(self, target_backlog: int, horizon_s: float, ranks: int = 1, window: int = 10):
        self.target_backlog, self.horizon_s, self.ranks = target_backlog, horizon_s, ranks
        self.samples: deque[_Sample] = deque(maxlen=window + 1)
        self.actors: deque[set[str]] = deque(maxlen=window)
        self.backlog = 0

    def observe(
        self, produced: int, backlog: int, consumed: int, busy_s: float, actors: set[str], at: float | None = None
    ) -> None:
        """After an update: the queue's produced counter and backlog, the records this rank consumed
        (trained or dropped) and the seconds it was busy since the last observation, the actor ids read."""
        self.samples.append(_Sample(time.monotonic() if at is None else at, produced, busy_s, consumed))
        self.actors.append(set(actors))
        self.backlog = backlog

    def rates(self) -> dict[str, float]:
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0], self.samples[-1]
        span = last.at - first.at
        later = list(self.samples)[1:]
        busy = sum(s.busy_s for s in later)
        if span <= 0 or busy <= 0:
            return {}
        return {
            "produced_per_s": (last.produced - first.produced) / span,
            "capacity_per_s": sum(s.consumed for s in later) / busy * self.ranks,
            "actors_seen": float(len(set().union(*self.actors))),
        }

    def wanted(self) -> float | None:
        """Actors wanted, or None before there is a window to measure over (or while nothing is produced)."""
        r = self.rates()
        if not r or r["produced_per_s"] <= 0 or r["actors_seen"] == 0:
            return None
        per_actor = r["produced_per_s"] / r["actors_seen"]
        deficit = (self.target_backlog - self.backlog) / self.horizon_s
        return max(0.0, (r["capacity_per_s"] + deficit) / per_actor)

    def report(self) -> dict:
        """The JSON of the learner's /v1/scaling route."""
        wanted = self.wanted()
        return {
            "actors_wanted": None if wanted is None else round(wanted, 3),
            "backlog": self.backlog,
            "target_backlog": self.target_backlog,
            "horizon_s": self.horizon_s,
            **{k: round(v, 4) for k, v in self.rates().items()},
        }
