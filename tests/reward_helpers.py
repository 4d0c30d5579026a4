"""Helpers the reward-server tests share: tiny-world images and prompts, and reading answers and metrics."""

from __future__ import annotations

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from pso.tiny.world import all_scenes, draw
from reward_server.client import png_base64


def scene_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n tiny-world images, uint8 (n, 32, 32, 3), and their prompts."""
    rng = np.random.default_rng(seed)
    scenes = [all_scenes()[i] for i in rng.integers(len(all_scenes()), size=n)]
    images = np.stack([draw(s, rng) for s in scenes])
    return torch.from_numpy(images), [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]


png_b64 = png_base64  # a uint8 (H, W, 3) image as base64 PNG, as the client sends it


def error_of(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]["code"]


def metric(url: str, sample: str, **labels: str) -> float:
    """Sum of a sample's values over label sets that include `labels` (0 before it first appears)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                total += s.value
    return total
