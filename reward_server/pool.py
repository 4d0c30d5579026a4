"""The served models: loaded once per device in the background, then reached through batchers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from pso.config.reward_server import BackendSpec, RewardServerConfig
from reward_server import decode
from reward_server.backends import ModelInfo, RewardBackend, RewardInputError, build_backend
from reward_server.batcher import DeviceBatcher, InflightCounter, Job
from reward_server.errors import ApiError, client_gone, shorten, unprocessable
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
        self._turn = 0
        self.prepare_executor = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="reward-prepare")

    @property
    def infos(self) -> list[ModelInfo]:
        return [m.info for m in self.models.values()]

    async def load(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Load every model on every device (off the event loop), then start one batcher per device."""
        per_device = []
        for device in _replica_names(self.config.devices):
            models = {}
            for spec in self.config.models:
                log.info("loading %s (%s) on %s", spec.model_name, spec.kind, device)
                try:
                    models[spec.model_name] = await asyncio.to_thread(self.builder, spec, device.split("#")[0])
                except Exception as e:
                    # the details (paths, hub ids) go to the log only: /readyz is unauthenticated
                    self.error = f"{spec.model_name} failed to load on {device} ({type(e).__name__}); see the log"
                    log.error("loading the reward models failed: %s: %s", type(e).__name__, e)
                    if on_failure:
                        on_failure(f"{type(e).__name__}: {e}")
                    return
                self.loaded.append(f"{spec.model_name}@{device}")
            per_device.append((device, models))
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

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "not_ready", self.error or "models are still loading", {"Retry-After": "5"})

    def select(self, names: list[str] | None) -> list[str]:
        """The scoring models a request names (default: every one served); pairwise judges are refused."""
        self.check_ready()
        scorers = [n for n, m in self.models.items() if not m.pairwise]
        if names is None:
            if not scorers:
                raise unprocessable("pairwise_judge", "this server serves only pairwise judges: POST /v1/compare")
            return scorers
        self._check_known(names)
        if not names:
            raise unprocessable("bad_field", "models must name at least one model (or be left out for all)")
        judges = [shorten(n) for n in names if n not in scorers]
        if judges:
            raise unprocessable(
                "pairwise_judge",
                f"{', '.join(judges[:3])}: pairwise judges compare images: POST /v1/compare with judge",
            )
        return list(dict.fromkeys(names))

    def select_judge(self, name: str) -> list[str]:
        """The pairwise judge a /v1/compare request names, as a one-model selection."""
        self.check_ready()
        self._check_known([name])
        if not self.models[name].pairwise:
            raise unprocessable("not_a_judge", f"{shorten(name)} scores images; judges: {self._judges()}")
        return [name]

    def _judges(self) -> list[str]:
        return [n for n, m in self.models.items() if m.pairwise]

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.models]
        if unknown:
            named = ", ".join(shorten(n) for n in unknown[:3])
            named += f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise unprocessable("unknown_model", f"unknown model(s) {named}; served: {list(self.models)}")

    def reserve(self, n: int) -> DeviceBatcher:
        """Room for `n` images on the device with the fewest pending (ties in turn); 429 if none has room."""
        self._turn += 1
        order = sorted(
            range(len(self.batchers)), key=lambda i: (self.batchers[i].pending, (i - self._turn) % len(self.batchers))
        )
        for i in order:
            if self.batchers[i].try_reserve(n):
                return self.batchers[i]
        raise ApiError(429, "busy", f"every device has {self.config.batching.max_queue} images pending; retry shortly",
                       {"Retry-After": "1"})  # fmt: skip

    def prepare(self, work: _Work) -> list[str]:
        """Read the request, check its prompts and image sizes against every model asked for, reserve room,
        decode and preprocess one image at a time, and queue the job on the device (runs on a preprocessing
        thread); returns the model names. Stops between images once the work is abandoned (the request
        answered already, or its client gone)."""
        try:
            return self._prepare(work)
        finally:
            self.inflight.add(-1)

    def _prepare(self, work: _Work) -> list[str]:
        read = work.read
        if read is None:
            raise _Abandoned
        images, prompts, names = read()
        del read
        pairs = work.pairing(len(images)) if work.pairing else None
        for name in names:
            model = self.models[name]
            for i, prompt in enumerate(prompts):
                try:
                    model.check_prompt(prompt)
                except RewardInputError as e:
                    raise unprocessable("bad_prompt", f"prompts[{i}] for {name}: {e}") from None
            for i, size in enumerate(decode.image_sizes(images)):  # an image no model can take is never decoded
                try:
                    model.check_size(*size)
                except RewardInputError as e:
                    raise unprocessable("bad_image", f"images[{i}] for {name}: {e}") from None
        room = len(images) if pairs is None else 2 * len(pairs)  # as Job.size counts it
        batcher = self.reserve(room)
        try:
            if isinstance(images, torch.Tensor):  # a uint8 batch, decoded already: each model takes it at once
                inputs = {name: self._preprocess(name, images, "images") for name in names}
            else:
                inputs = {name: [] for name in names}
                for i, item in enumerate(images):
                    if work.read is None:
                        raise _Abandoned
                    image = decode.to_tensor(item, f"images[{i}]")[None]
                    for name in names:
                        inputs[name] += self._preprocess(name, image, f"images[{i}]")
            if pairs is not None and len({tuple(x.shape) for xs in inputs.values() for x in xs}) > 1:
                raise unprocessable("bad_image", "a judge compares images of one size; these differ")
            work.job = Job(inputs, prompts, work.future, pairs)
            if work.read is None:
                raise _Abandoned
        except BaseException:
            batcher.release(room)
            raise
        batcher.enqueue(work.job)  # from here the batcher gives the room back
        return names

    def _preprocess(self, name: str, images: torch.Tensor, where: str) -> list[torch.Tensor]:
        try:
            return self.models[name].preprocess_batch(images)
        except RewardInputError as e:
            raise unprocessable("bad_image", f"{where} for {name}: {e}") from None

    async def run(
        self, read: Reader, gone: asyncio.Future | None = None, pairing: Pairing | None = None
    ) -> tuple[dict[str, list[float]], list[str]]:
        """Prepare (counted as in flight until queued, so batchers wait for it) and await the scores, all
        within the request timeout; returns per-model scores and the model names. Once the request times
        out or its client is `gone`, its work stops: preparation at the next image, and a queued job is
        skipped. Where `pairing` (called with the number of images, once they are read) gives pairs, the
        models are pairwise judges, and each returns its preferences for those pairs."""
        loop = asyncio.get_running_loop()
        timeout = self.config.limits.request_timeout_s
        deadline = loop.time() + timeout
        work = _Work(read, loop.create_future(), pairing)
        del read
        self.inflight.add(1)
        preparing = loop.run_in_executor(self.prepare_executor, self.prepare, work)
        try:
            names = await _first(preparing, deadline, gone, timeout)
            return await _first(work.future, deadline, gone, timeout), names
        finally:
            work.abandon()
            if not preparing.done():
                preparing.add_done_callback(_retrieve)


Pairing = Callable[[int], "list[tuple[int, int]] | None"]
"""The pairs a request's images are judged in, given how many images it has (None: scored, not judged)."""

Reader = Callable[[], tuple[Sequence[Image.Image] | torch.Tensor, list[str], list[str]]]
"""Reads a request on a preprocessing thread: its images (opened from their headers, or decoded already as
one uint8 (N, H, W, 3) batch), prompts and model names."""


class _Work:
    """A request on its way to the batcher: its reader (and through it, its body) until the request is
    abandoned; then `read` is None, so a preprocessing thread skips or stops it (the body is freed even
    before a thread takes it), and its job, if queued already, is marked for the batcher to skip."""

    def __init__(self, read: Reader, future: asyncio.Future, pairing: Pairing | None = None):
        self.read: Reader | None = read
        self.future = future  # the scores, set by the batcher
        self.pairing = pairing
        self.job: Job | None = None

    def abandon(self) -> None:
        self.read = None
        if self.job is not None:
            self.job.abandoned = True
        self.future.cancel()  # a no-op once scored; else what the batcher may still deliver is dropped


def _retrieve(preparing: asyncio.Future) -> None:
    """Take the outcome of preparation nobody awaits any more, so that asyncio does not log it as lost."""
    if not preparing.cancelled():
        preparing.exception()


class _Abandoned(Exception):
    """Raised on a preprocessing thread to stop the work of a request nobody waits for."""


async def _first(future: asyncio.Future, deadline: float, gone: asyncio.Future | None, timeout: float):
    """`future`'s result, or a 503 at the deadline, or a 499 once the client is `gone` (the future is left
    running: the caller stops its work)."""
    waiting = {future} if gone is None else {future, gone}
    remaining = max(deadline - asyncio.get_running_loop().time(), 0)
    done, _ = await asyncio.wait(waiting, timeout=remaining, return_when="FIRST_COMPLETED")
    if future in done:
        return future.result()
    if gone is not None and gone.done():
        raise client_gone()
    raise ApiError(503, "timeout", f"not scored within {timeout} s", {"Retry-After": "1"})


def _replica_names(devices: list[str]) -> list[str]:
    """Devices named once each: a second copy on the same device is "cpu#1", and so on (metrics labels)."""
    seen: dict[str, int] = {}
    names = []
    for d in devices:
        names.append(d if d not in seen else f"{d}#{seen[d]}")
        seen[d] = seen.get(d, 0) + 1
    return names
