"""The reward server's Prometheus metrics.

A server that `reward_server.main.serve` started uses prometheus_client's multiprocess mode, whatever
its number of workers: each worker process writes its figures to files in a folder of that server's own
($PROMETHEUS_MULTIPROC_DIR, set by `serve`), and /metrics, in whichever worker answers, reads them all
(counters and histograms summed over every worker that ran, gauges as their `multiprocess_mode` says
over the live ones). Without the variable (the embedded server of `serve_in_background`, in a process
that did not set it) they are kept in a registry of its own.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        shared = os.environ.get(MULTIPROC_ENV)
        if shared:  # this process's figures are in its files, read there with the other workers'
            MultiProcessCollector(self.registry, shared)
        r = None if shared else self.registry
        self.requests = Counter(
            "pso_reward_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "pso_reward_request_seconds", "time from request to response", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.images = Counter("pso_reward_images_scored", "images scored, per model", ["model"], registry=r)
        self.batch_images = Histogram(
            "pso_reward_batch_images", "images in one model forward pass", ["model"], registry=r, buckets=_SIZES
        )
        self.batch_requests = Histogram(
            "pso_reward_batch_requests", "requests merged into one batch", ["device"], registry=r, buckets=_SIZES
        )
        self.forward_seconds = Histogram(
            "pso_reward_forward_seconds", "time of one batch on a device", ["device"], registry=r
        )
        self.pending_images = Gauge(
            "pso_reward_pending_images", "images accepted and not yet scored", ["device"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.body_bytes = Gauge(
            "pso_reward_body_bytes", "request body bytes held by the requests in progress", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.ready = Gauge(
            "pso_reward_ready", "1 once every configured model is loaded (in every worker)", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip


def mark_worker_gone() -> None:
    """Drop this worker's gauges from the live ones, as it exits (its counts stay in the sums)."""
    if shared := os.environ.get(MULTIPROC_ENV):
        mark_process_dead(os.getpid(), shared)
