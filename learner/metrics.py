"""Where the learner's per-update figures go: the log, a JSON-lines file, Prometheus and TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("pso.learner")

GAUGES = {
    "updates": "updates done",
    "version": "newest published weight version",
    "loss": "loss of the last update",
    "margin": "implicit-reward margin (winner minus loser log-ratio), last update",
    "accuracy": "share of pairs whose winner has the higher log-ratio, last update",
    "reward_mean": "mean reward of the samples trained on in the last update",
    "staleness": "mean age, in versions, of the records trained on in the last update",
    "pairs_per_s": "pairs trained per second over the last update (waiting included)",
    "wait_s": "seconds the last update waited for experience",
    "backlog": "records in the experience queue, not yet acknowledged",
    "stale_total": "records dropped or down-weighted as stale",
    "stale_share": "share of the records this rank read that were stale (the samples wasted, with stale: drop)",
    "records_lost": "records lost with a Redis that restarted empty (those waiting unread at the last update)",
    "actors_wanted": "actors the learner wants (the autoscaling signal; learner/scaling.py)",
}


class MetricsSink:
    def __init__(self, file: Path | None, tensorboard_dir: Path | None):
        self.file = file
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        self.registry = CollectorRegistry()
        # made on first write: a series that does not exist yet (before the first update, or before
        # actors_wanted has a window) is absent, not 0, so an autoscaler holds instead of scaling down
        self.gauges: dict[str, Gauge] = {}
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "learner.tensorboard_dir needs the tensorboard package: pip install 'pso-service[tensorboard]'"
                ) from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict[str, float]) -> None:
        for key, value in row.items():
            if key in GAUGES:
                if key not in self.gauges:
                    self.gauges[key] = Gauge(f"pso_learner_{key}", GAUGES[key], registry=self.registry)
                self.gauges[key].set(value)
        if self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                self.tb.add_scalar(f"learner/{key}", value, int(row["updates"]))
        log.info(
            "update %d (version %d): loss %.4f, margin %.4g, accuracy %.2f, reward %.4f, staleness %.1f, "
            "%.1f pairs/s, waited %.1f s",
            row["updates"], row["version"], row.get("loss", float("nan")), row.get("margin", float("nan")),
            row.get("accuracy", float("nan")), row["reward_mean"], row["staleness"], row["pairs_per_s"], row["wait_s"],
        )  # fmt: skip

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
