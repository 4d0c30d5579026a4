"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reward_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "reward_request_seconds", "time from request to response", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.images = Counter("reward_images_scored", "images scored, per model", ["model"], registry=r)
        self.batch_images = Histogram(
            "reward_batch_images", "images in one model forward pass", ["model"], registry=r, buckets=_SIZES
        )
        self.batch_requests = Histogram(
            "reward_batch_requests", "requests merged into one batch", ["device"], registry=r, buckets=_SIZES
        )
        self.forward_seconds = Histogram(
            "reward_forward_seconds", "time of one batch on a device", ["device"], registry=r
        )
        self.pending_images = Gauge(
            "reward_pending_images", "images accepted and not yet scored", ["device"], registry=r
        )
        self.body_bytes = Gauge("reward_body_bytes", "request body bytes held by the requests in progress", registry=r)
        self.ready = Gauge("reward_ready", "1 once every configured model is loaded", registry=r)
