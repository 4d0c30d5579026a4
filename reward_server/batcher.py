"""Dynamic batching: concurrent requests for one device are merged into shared forward passes.

Each device has a queue of jobs (one per request, already decoded and preprocessed) and one worker
thread that runs the models. The collector takes the first waiting job, then keeps taking jobs for
up to `window_ms` while other requests are still on their way (being decoded), and stops early
once a batch is full. While a batch runs, new jobs queue up and form the next one.

Admission: a request reserves room for its images (`reserve`) before it decodes them, so a full
device answers 429 at once instead of after the work; the room is given back when the images
are scored, or when the request fails or times out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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


class InflightCounter:
    """Requests accepted but not yet queued (still decoding): the batcher waits for them only."""

    def __init__(self) -> None:
        self.value = 0


class DeviceBatcher:
    def __init__(
        self,
        device: str,
        models: dict[str, RewardBackend],
        metrics: ServerMetrics,
        window_s: float,
        max_pending: int,
        inflight: InflightCounter,
    ):
        self.device, self.models, self.metrics = device, models, metrics
        self.window_s, self.max_pending, self.inflight = window_s, max_pending, inflight
        self.max_batch = max(m.spec.max_batch for m in models.values())
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pending = 0  # images reserved and not yet scored: preprocessing, queued or running
        self._lock = threading.Lock()  # `pending` changes on request threads and on the event loop
        self._running: list[Job] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{device}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name=f"batcher-{self.device}")

    async def stop(self) -> None:
        """Stop collecting; requests still waiting, the running batch's too, get a 503."""
        running = list(self._running)  # cancelling the collector clears it
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        waiting = running + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "the server is stopping; retry elsewhere"))

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if self.pending + n > self.max_pending:
                return False
            self.pending += n
        self.metrics.pending_images.labels(self.device).set(self.pending)
        return True

    def release(self, n: int) -> None:
        with self._lock:
            self.pending -= n
        self.metrics.pending_images.labels(self.device).set(self.pending)

    def enqueue(self, job: Job) -> None:
        """Queue a job whose images were reserved (event-loop thread only)."""
        self.queue.put_nowait(job)

    async def _collect_forever(self) -> None:
        while True:
            jobs = await self._collect()
            try:
                await self._score(jobs)
            except Exception:  # never let one bad batch end the collector
                log.exception("scoring a batch failed on %s", self.device)
                _fail(jobs, ApiError(500, "internal", "scoring failed; see the server log"))
            finally:
                self.release(sum(j.size for j in jobs))
                self._running = []

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
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
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            size += job.size
        return jobs

    async def _score(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if not j.future.done()]  # timed out or abandoned meanwhile
        if not live:
            return
        self._running = live
        self.metrics.batch_requests.labels(self.device).observe(len(live))
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self._run, live)
        except Exception as e:
            if len(live) == 1:
                _fail(live, _as_api_error(e, self.device))
                return
            # one request's input may have broken the batch: score each alone, so only it fails
            for job in live:
                try:
                    (result,) = await loop.run_in_executor(self.executor, self._run, [job])
                except Exception as e:
                    _fail([job], _as_api_error(e, self.device))
                else:
                    _succeed(job, result)
            return
        self.metrics.forward_seconds.labels(self.device).observe(time.perf_counter() - start)
        for job, result in zip(live, results):
            _succeed(job, result)

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


def _succeed(job: Job, result: dict[str, torch.Tensor]) -> None:
    if not job.future.done():
        job.future.set_result(result)


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


def _as_api_error(e: Exception, device: str) -> ApiError:
    if isinstance(e, torch.OutOfMemoryError):
        log.warning("out of memory on %s; the request gets 503", device)
        return ApiError(503, "overloaded", f"out of memory on {device}; retry with fewer images", {"Retry-After": "1"})
    log.error("scoring failed on %s", device, exc_info=e)
    return ApiError(500, "internal", "scoring failed; see the server log")
