"""Dynamic batching: concurrent requests for one device are merged into shared forward passes.

Each device has a thread-safe queue of jobs (one per request, already decoded and preprocessed) and
one worker thread that collects batches and runs the models. It takes the first waiting job, then
keeps taking jobs for up to `window_ms` while other requests are still on their way (being
decoded), and stops early once a batch is full. Preprocessing threads queue their jobs directly,
and results go back to the event loop once per batch, so the worker never waits for the event loop
between batches: while a batch runs, new jobs queue up and form the next one.

Admission: a request reserves room for its images (`reserve`) before it decodes them, so a full
device answers 429 at once instead of after the work; the room is given back when the images
are scored, or when the request fails or times out.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from reward_server.backends.base import RewardBackend, shape_batches
from reward_server.errors import ApiError
from reward_server.metrics import ServerMetrics

log = logging.getLogger("pso.reward_server")
_STOP = None  # queued by `stop`: the worker ends
_GIL_SWITCH_S = 0.001


@dataclass
class Job:
    """One request's work: per model, the preprocessed inputs; one prompt per image; for a pairwise judge,
    the (first, second) image pairs to judge. `abandoned` is set when nobody waits for the scores any more
    (the worker then skips it)."""

    inputs: dict[str, list[torch.Tensor]]
    prompts: list[str]
    future: asyncio.Future = field(repr=False)
    pairs: list[tuple[int, int]] | None = None
    abandoned: bool = False

    @property
    def size(self) -> int:
        """The room the job takes in the queue: its images, or for a judge the two images of every pair."""
        return len(self.prompts) if self.pairs is None else 2 * len(self.pairs)


class InflightCounter:
    """Requests accepted but not yet queued (still decoding): the batcher waits for them only."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


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
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.pending = 0  # images reserved and not yet scored: preprocessing, queued or running
        self._lock = threading.Lock()  # `pending` changes on request threads and on the worker
        self._running: list[Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = threading.Thread(target=self._work, name=f"reward-{device}", daemon=True)
        # 0 from the start, not absent until the first request: an autoscaler reading it (KEDA's metrics-api
        # scaler, deploy/k8s/components/autoscaling-keda) sees an idle server rather than an error
        metrics.pending_images.labels(device).set(0)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The worker drops the GIL in every torch op and must wait for it back while the event loop and
        # the preprocessing threads run Python; a switch interval shorter than Python's default 5 ms
        # hands it back sooner (about 3% more served throughput with the tiny model on 2 cores).
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_S))
        self._worker.start()

    async def stop(self) -> None:
        """Stop the worker (after the batch in hand); requests still waiting, that batch's too, get a 503."""
        running, queued = list(self._running), []
        while True:
            try:
                queued.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self.queue.put(_STOP)
        self.release(sum(job.size for job in queued))
        _settle(running + queued, error=ApiError(503, "shutting_down", "the server is stopping; retry elsewhere"))

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
        """Queue a job whose images were reserved (from any thread)."""
        self.queue.put(job)

    def _work(self) -> None:
        while (jobs := self._collect()) is not None:
            try:
                self._score(jobs)
            except Exception:  # never let one bad batch end the worker
                log.exception("scoring a batch failed on %s", self.device)
                self._deliver(jobs, error=ApiError(500, "internal", "scoring failed; see the server log"))
            finally:
                self.release(sum(j.size for j in jobs))
                self._running = []

    def _collect(self) -> list[Job] | None:
        """The next batch of jobs; None once the batcher stops."""
        if (first := self.queue.get()) is _STOP:
            return None
        jobs, size = [first], first.size
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                if self.inflight.value == 0:
                    break  # nobody else is coming: waiting would only add latency
                try:
                    job = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
            if job is _STOP:
                self.queue.put(_STOP)  # ends the worker after this batch
                break
            jobs.append(job)
            size += job.size
        return jobs

    def _score(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if not j.abandoned]  # timed out or left meanwhile
        if not live:
            return
        self._running = live
        self.metrics.batch_requests.labels(self.device).observe(len(live))
        start = time.perf_counter()
        try:
            results = self._run(live)
        except Exception as e:
            # a remote scorer that is down (503) is no one request's fault: scoring each alone would only wait
            # out its retries once per request
            if len(live) == 1 or (isinstance(e, ApiError) and e.status == 503):
                self._deliver(live, error=_as_api_error(e, self.device))
                return
            # one request's input may have broken the batch: score each alone, so only it fails
            for job in live:
                try:
                    (result,) = self._run([job])
                except Exception as e:
                    self._deliver([job], error=_as_api_error(e, self.device))
                else:
                    self._deliver([job], [result])
            return
        self.metrics.forward_seconds.labels(self.device).observe(time.perf_counter() - start)
        self._deliver(live, results)

    def _deliver(self, jobs: list[Job], results: list | None = None, error: Exception | None = None) -> None:
        """Hand results (or an error) to the requests' futures, on the event loop, in one call per batch."""
        try:
            self._loop.call_soon_threadsafe(_settle, jobs, results, error)
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> list[dict[str, list[float]]]:
        """Score every job's images with every model it asked for; per job, model name -> n scores, or a
        judge's preferences for the job's pairs (plain floats, so the event loop does no tensor work)."""
        results: list[dict[str, list[float]]] = [{} for _ in jobs]
        for name, model in self.models.items():
            users = [k for k, j in enumerate(jobs) if name in j.inputs]
            if not users:
                continue
            if model.pairwise:
                for k in users:
                    results[k][name] = self._judge(name, model, jobs[k])
                continue
            inputs = [x for k in users for x in jobs[k].inputs[name]]
            prompts = [p for k in users for p in jobs[k].prompts]
            scores = torch.empty(len(inputs))
            for batch in shape_batches([x.shape for x in inputs], model.spec.max_batch):
                scores[batch] = model.score_batch(torch.stack([inputs[i] for i in batch]), [prompts[i] for i in batch])
                self.metrics.batch_images.labels(name).observe(len(batch))
            self.metrics.images.labels(name).inc(len(inputs))
            for k, part in zip(users, scores.split([jobs[k].size for k in users])):
                results[k][name] = part.tolist()
        return results

    def _judge(self, name: str, model: RewardBackend, job: Job) -> list[float]:
        """A judge's preferences for the job's pairs, `max_batch` pairs per call."""
        inputs, pairs, step = job.inputs[name], job.pairs or [], model.spec.max_batch
        preferences = torch.empty(len(pairs))
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            first, second = (torch.stack([inputs[p[side]] for p in chunk]) for side in (0, 1))
            preferences[start : start + len(chunk)] = model.compare_batch(
                first, second, [job.prompts[i] for i, _ in chunk]
            )
            self.metrics.batch_images.labels(name).observe(2 * len(chunk))
        self.metrics.images.labels(name).inc(len(inputs))
        return preferences.tolist()


def _settle(jobs: list[Job], results: list | None = None, error: Exception | None = None) -> None:
    """Set each job's future to its result or to `error`, unless it is done already (event loop only)."""
    for k, job in enumerate(jobs):
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results[k])


def _as_api_error(e: Exception, device: str) -> ApiError:
    if isinstance(e, ApiError):  # a back-end's own answer (a remote scorer's failure)
        return e
    if isinstance(e, torch.OutOfMemoryError):
        log.warning("out of memory on %s; the request gets 503", device)
        return ApiError(503, "overloaded", f"out of memory on {device}; retry with fewer images", {"Retry-After": "1"})
    log.error("scoring failed on %s", device, exc_info=e)
    return ApiError(500, "internal", "scoring failed; see the server log")
