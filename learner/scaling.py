"""How many actors the learner wants: the autoscaling signal (`pso_learner_actors_wanted`).

Actors produce experience, the learner consumes it. Over a window of recent updates:

    capacity     records the learner trains per second of busy (not waiting) time, times its ranks
    per_actor    records one actor produces per second of producing: the run's `produced` counter
                 over its `actor_busy_ms` counter (every actor adds the time it spent sampling,
                 scoring and pushing, not the time it was paused by back-pressure)
    deficit      (target_backlog - waiting) / horizon_s: records per second that refill (or drain)
                 the queue's unread records to the target within the horizon

    actors_wanted = (capacity + deficit) / per_actor

Both counters are the whole run's, so the estimate does not depend on which records this rank
read, on how many ranks there are, or on how long actors were held back: a starved learner asks
for more actors, one with more waiting than its target asks for fewer. An autoscaler with the
target "1 per replica" (HPA AverageValue 1) turns it into a replica count.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class _Sample:
    at: float
    produced: int  # the run's counter
    actor_busy_s: float  # the run's counter
    trained: int  # this rank, since the previous sample
    busy_s: float  # this rank, since the previous sample


class ActorDemand:
    def __init__(self, target_backlog: int, horizon_s: float, ranks: int = 1, window: int = 10):
        self.target_backlog, self.horizon_s, self.ranks = target_backlog, horizon_s, ranks
        self.samples: deque[_Sample] = deque(maxlen=window + 1)
        self.waiting = 0

    def observe(
        self, produced: int, actor_busy_s: float, waiting: int, trained: int, busy_s: float, at: float | None = None
    ) -> None:
        """After an update: the run's produced and actor-busy counters, the records waiting unread,
        and the records this rank trained on and the seconds it was busy since the last observation."""
        at = time.monotonic() if at is None else at
        self.samples.append(_Sample(at, produced, actor_busy_s, trained, busy_s))
        self.waiting = waiting

    def rates(self) -> dict[str, float]:
        """Over the window; empty until it spans some production and some training."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0], self.samples[-1]
        later = list(self.samples)[1:]
        busy = sum(s.busy_s for s in later)
        actor_busy = last.actor_busy_s - first.actor_busy_s
        produced = last.produced - first.produced
        if busy <= 0 or actor_busy <= 0 or produced <= 0 or last.at <= first.at:
            return {}
        return {
            "capacity_per_s": sum(s.trained for s in later) / busy * self.ranks,
            "per_actor_per_s": produced / actor_busy,
            "produced_per_s": produced / (last.at - first.at),
        }

    def wanted(self, rates: dict[str, float] | None = None) -> float | None:
        """Actors wanted, or None before there is a window to measure over."""
        r = self.rates() if rates is None else rates
        if not r:
            return None
        deficit = (self.target_backlog - self.waiting) / self.horizon_s
        return max(0.0, (r["capacity_per_s"] + deficit) / r["per_actor_per_s"])

    def report(self) -> dict:
        """The JSON of the learner's /v1/scaling route."""
        rates = self.rates()
        wanted = self.wanted(rates)
        return {
            "actors_wanted": None if wanted is None else round(wanted, 3),
            "waiting": self.waiting,
            "target_backlog": self.target_backlog,
            "horizon_s": self.horizon_s,
            **{k: round(v, 4) for k, v in rates.items()},
        }
