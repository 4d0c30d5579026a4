"""Reward back-ends, one module per model family, chosen by the `kind` of a model's config."""

from __future__ import annotations

import importlib

import torch

from pso.config.reward_server import BackendSpec
from reward_server.backends.base import ModelInfo, RewardBackend, RewardInputError

# kind -> "module:class"; imported on use so a server pays only for the models it serves
BACKENDS = {
    "tiny": "reward_server.backends.tiny:TinyBackend",
    "tiny-judge": "reward_server.backends.tiny:TinyJudgeBackend",
    "image-reward": "reward_server.backends.image_reward:ImageRewardBackend",
    "pickscore": "reward_server.backends.clip_rewards:PickScoreBackend",
    "hpsv2": "reward_server.backends.clip_rewards:HPSv2Backend",
    "clip-score": "reward_server.backends.clip_rewards:ClipScoreBackend",
    "aesthetic": "reward_server.backends.clip_rewards:AestheticBackend",
    "python": "reward_server.backends.python:PythonBackend",
    "http": "reward_server.backends.http:HttpBackend",
}


def build_backend(spec: BackendSpec, device: str | torch.device = "cpu") -> RewardBackend:
    """Load the model `spec` describes onto `device`."""
    module, _, cls = BACKENDS[spec.kind].partition(":")  # type: ignore[attr-defined]
    return getattr(importlib.import_module(module), cls)(spec, torch.device(device))


__all__ = ["BACKENDS", "ModelInfo", "RewardBackend", "RewardInputError", "build_backend"]
