"""Dynamic batching: concurrent requests for one device are merged into shared forward passes.

Each device has a queue of jobs (one per request, already decoded and preprocessed) and one worker
thread that runs the models. The collector takes the first waiting job, then keeps taking jobs for
up to `window_ms` while other requests are still on their way (being decoded), and stops early
once a batch is full. While a batch runs, new jobs queue up and form the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from reward_server.backends.base import RewardBackend, shape_batches
from reward_server.errors import ApiError
from reward_server.metrics import ServerMetrics

log = logging.getLogger("pso.reward_server")


@dataclass
class Job:
    """One request's work: per model, the preprocessed inputs; one prompt per image."""

    inputs: dict[str, list[torch.Tensor]]
    prompts: list[str]
    future: asyncio.Future = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.prompts)


class DeviceBatcher:
    def __init__(
        self,
        device: str,
        models: dict[str, RewardBackend],
        metrics: ServerMetrics,
        window_s: float,
        max_queue: int,
        inflight: InflightCounter,
    ):
        self.device, self.models, self.metrics = device, models, metrics
        self.window_s, self.max_queue, self.inflight = window_s, max_queue, inflight
        self.max_batch = max(m.spec.max_batch for m in models.values())
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.queued = 0  # images waiting, for back-pressure and least-loaded dispatch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{device}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name=f"batcher-{self.device}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        if self.queued + job.size > self.max_queue:
            raise ApiError(
                429, "busy", f"{self.queued} images are waiting on {self.device}; retry shortly", {"Retry-After": "1"}
            )
        self.queued += job.size
        self.metrics.queued_images.labels(self.device).set(self.queued)
        self.queue.put_nowait(job)

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = jobs[0].size
            deadline = loop.time() + self.window_s
            while size < self.max_batch:
                if not self.queue.empty():
                    job = self.queue.get_nowait()
                elif self.inflight.value == 0:
                    break  # nobody else is coming: waiting would only add latency
                else:
                    try:
                        job = await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0))
                    except TimeoutError:
                        break
                jobs.append(job)
                size += job.size
            self.queued -= size
            self.metrics.queued_images.labels(self.device).set(self.queued)
            jobs = [j for j in jobs if not j.future.done()]  # timed out or disconnected meanwhile
            if not jobs:
                continue
            self.metrics.batch_requests.labels(self.device).observe(len(jobs))
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self._run, jobs)
            except Exception as e:  # a model failed: those requests get a 500, the server keeps serving
                log.exception("scoring failed on %s", self.device)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.metrics.forward_seconds.labels(self.device).observe(time.perf_counter() - start)
            for j, r in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(r)

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> list[dict[str, torch.Tensor]]:
        """Score every job's images with every model it asked for; per job, model name -> (n,) scores."""
        results: list[dict[str, torch.Tensor]] = [{} for _ in jobs]
        for name, model in self.models.items():
            users = [k for k, j in enumerate(jobs) if name in j.inputs]
            if not users:
                continue
            inputs = [x for k in users for x in jobs[k].inputs[name]]
            prompts = [p for k in users for p in jobs[k].prompts]
            scores = torch.empty(len(inputs))
            for batch in shape_batches([x.shape for x in inputs], model.spec.max_batch):
                scores[batch] = model.score_batch(torch.stack([inputs[i] for i in batch]), [prompts[i] for i in batch])
                self.metrics.batch_images.labels(name).observe(len(batch))
            self.metrics.images.labels(name).inc(len(inputs))
            for k, part in zip(users, scores.split([jobs[k].size for k in users])):
                results[k][name] = part
        return results


class InflightCounter:
    """Requests accepted but not yet queued (still decoding): the batcher waits for them only."""

    def __init__(self) -> None:
        self.value = 0
