"""The served models: loaded once per device in the background, then reached through batchers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pso.config.reward_server import BackendSpec, RewardServerConfig
from reward_server.backends import ModelInfo, RewardBackend, RewardInputError, build_backend
from reward_server.batcher import DeviceBatcher, InflightCounter, Job
from reward_server.errors import ApiError, unprocessable
from reward_server.metrics import ServerMetrics

log = logging.getLogger("pso.reward_server")


class ModelPool:
    def __init__(
        self,
        config: RewardServerConfig,
        metrics: ServerMetrics,
        builder: Callable[[BackendSpec, str], RewardBackend] = build_backend,
    ):
        self.config, self.metrics, self.builder = config, metrics, builder
        self.loaded: list[str] = []
        self.error: str | None = None
        self.ready = False
        self.inflight = InflightCounter()
        self.batchers: list[DeviceBatcher] = []
        self.models: dict[str, RewardBackend] = {}  # the first device's copies: preprocessing and info
        self.versions: dict[str, str] = {}
        # decoding and preprocessing: a few threads do it as fast as many, with less contention for the GIL
        self.prepare_executor = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="reward-prepare")

    @property
    def infos(self) -> list[ModelInfo]:
        return [m.info for m in self.models.values()]

    async def load(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Load every model on every device (off the event loop), then start one batcher per device."""
        try:
            per_device = []
            for device in _replica_names(self.config.devices):
                models = {}
                for spec in self.config.models:
                    log.info("loading %s (%s) on %s", spec.model_name, spec.kind, device)
                    models[spec.model_name] = await asyncio.to_thread(self.builder, spec, device.split("#")[0])
                    self.loaded.append(f"{spec.model_name}@{device}")
                per_device.append((device, models))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("loading the reward models failed: %s", self.error)
            if on_failure:
                on_failure(self.error)
            return
        self.models = per_device[0][1]
        self.versions = {name: m.info.version for name, m in self.models.items()}
        window = self.config.batching.window_ms / 1000
        for device, models in per_device:
            batcher = DeviceBatcher(device, models, self.metrics, window, self.config.batching.max_queue, self.inflight)
            batcher.start()
            self.batchers.append(batcher)
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: %s on %s", ", ".join(self.models), ", ".join(self.config.devices))

    async def close(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.batchers))
        self.prepare_executor.shutdown(wait=False, cancel_futures=True)

    def select(self, names: list[str] | None) -> list[str]:
        if not self.ready:
            raise ApiError(503, "not_ready", self.error or "models are still loading", {"Retry-After": "5"})
        if names is None:
            return list(self.models)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise unprocessable("unknown_model", f"unknown model(s) {unknown}; served: {list(self.models)}")
        if not names:
            raise unprocessable("bad_field", "models must name at least one model (or be left out for all)")
        return list(dict.fromkeys(names))

    def prepare(self, images: list[torch.Tensor], prompts: list[str], names: list[str]) -> dict[str, list]:
        """Check prompts and preprocess every image for every model (runs on a request thread)."""
        inputs: dict[str, list[torch.Tensor]] = {}
        for name in names:
            model = self.models[name]
            for i, prompt in enumerate(prompts):
                try:
                    model.check_prompt(prompt)
                except RewardInputError as e:
                    raise unprocessable("bad_prompt", f"prompts[{i}] for {name}: {e}") from None
            batch = []
            for i, image in enumerate(images):
                try:
                    batch.append(model.preprocess(image))
                except RewardInputError as e:
                    raise unprocessable("bad_image", f"images[{i}] for {name}: {e}") from None
            inputs[name] = batch
        return inputs

    async def score(self, inputs: dict[str, list[torch.Tensor]], prompts: list[str]) -> dict[str, torch.Tensor]:
        future = asyncio.get_running_loop().create_future()
        batcher = min(self.batchers, key=lambda b: b.queued)
        batcher.submit(Job(inputs, prompts, future))
        try:
            return await asyncio.wait_for(future, self.config.limits.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                503, "timeout", f"not scored within {self.config.limits.request_timeout_s} s", {"Retry-After": "1"}
            ) from None


def _replica_names(devices: list[str]) -> list[str]:
    """Devices named once each: a second copy on the same device is "cpu#1", and so on (metrics labels)."""
    seen: dict[str, int] = {}
    names = []
    for d in devices:
        names.append(d if d not in seen else f"{d}#{seen[d]}")
        seen[d] = seen.get(d, 0) + 1
    return names
