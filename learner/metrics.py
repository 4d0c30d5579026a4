"""Where the learner's per-update figures go: the log, a JSON-lines file and Prometheus (TensorBoard and
W&B: learner/monitors.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("pso.learner")

GAUGES = {  # row key -> help; exported as pso_learner_<key>
    "version": "newest published weight version",
    "loss": "loss of the last update",
    "margin": "implicit-reward margin (winner minus loser log-ratio), last update",
    "accuracy": "share of pairs whose winner has the higher log-ratio, last update",
    "reward_mean": "mean reward of the samples trained on in the last update",
    "staleness": "mean age, in versions, of the records trained on in the last update",
    "backlog": "records in the experience queue, not yet acknowledged",
    "stale_share": "share of the records this rank read that were stale (the samples wasted, with stale: drop)",
    "actors_wanted": "actors the learner wants (the autoscaling signal; learner/scaling.py)",
}
# Counters besides pso_learner_updates, from each row's own amounts (what that update added), so they start at 0
# in every learner process and never go down, as Prometheus expects; pairs per second is rate(pairs_trained).
COUNTERS = {  # row key -> (name, help)
    "pairs": ("pso_learner_pairs_trained", "preference pairs trained on"),
    "wait_s": ("pso_learner_wait_seconds", "seconds spent waiting for experience"),
    "stale": ("pso_learner_stale_records", "records dropped or down-weighted as stale"),
    "lost": (
        "pso_learner_records_lost",
        "records lost with a Redis that restarted empty (those waiting unread at the last update)",
    ),
}


class MetricsSink:
    def __init__(self, file: Path | None):
        self.file = file
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        self.registry = CollectorRegistry()
        self.updates = Counter("pso_learner_updates", "updates done", registry=self.registry)
        self.counters = {key: Counter(name, doc, registry=self.registry) for key, (name, doc) in COUNTERS.items()}
        # made on first write: a series that does not exist yet (before the first update, or before
        # actors_wanted has a window) is absent, not 0, so an autoscaler holds instead of scaling down
        self.gauges: dict[str, Gauge] = {}

    def write(self, row: dict[str, float]) -> None:
        self._export(row)
        if self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        online = "reward_mean" in row  # offline rows say where in the data the update ended instead
        log.info(
            "update %d (version %d): loss %.4f, margin %.4g, accuracy %.2f, " + (
                "reward %.4f, staleness %.1f, " if online else "epoch %d, example %d, "
            ) + "%.1f pairs/s, waited %.1f s",
            row["updates"], row["version"], row.get("loss", float("nan")), row.get("margin", float("nan")),
            row.get("accuracy", float("nan")),
            *((row["reward_mean"], row["staleness"]) if online else (row["epoch"] + 1, row["position"])),
            row["pairs_per_s"], row["wait_s"],
        )  # fmt: skip

    def _export(self, row: dict[str, float]) -> None:
        """One update's row to Prometheus: gauges set, counters increased (see COUNTERS)."""
        self.updates.inc()
        for key, counter in self.counters.items():
            counter.inc(row.get(key, 0))  # the offline learner has no stale or lost records
        for key in GAUGES.keys() & row.keys():
            if key not in self.gauges:
                self.gauges[key] = Gauge(f"pso_learner_{key}", GAUGES[key], registry=self.registry)
            self.gauges[key].set(row[key])
