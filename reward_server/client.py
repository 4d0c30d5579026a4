"""A small synchronous client for the reward server, as the actors use it.

Images go as one safetensors body (uint8, no PNG encoding); 429, 5xx and connection errors are
retried with exponential backoff (honouring Retry-After); other errors raise at once.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import httpx
import torch
from PIL import Image
from safetensors.torch import save

from pso.secrets import read_secret

log = logging.getLogger("pso.reward_client")
RETRY_STATUSES = {429, 500, 502, 503, 504}


class RewardServerError(RuntimeError):
    """The server refused the request (status and its JSON error), or stayed unreachable through every retry."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class NotARewardServer(RewardServerError):
    """Something answers at the URL, but not as a reward server: waiting will not help."""


@dataclass
class Scores:
    per_model: dict[str, list[float]]
    total: list[float]
    versions: dict[str, str]


RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images, prompts -> one score per image


class RewardClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
    ):
        """`token` defaults to $PSO_REWARD_TOKEN (or the file $PSO_REWARD_TOKEN_FILE names); `retries` counts
        attempts after the first; `timeout` (per attempt) should exceed the server's request timeout (60 s by
        default), which answers 503 first."""
        token = ((read_secret("PSO_REWARD_TOKEN") or "") if token is None else token).strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, images: torch.Tensor, prompts: Sequence[str], models: Sequence[str] | None = None) -> Scores:
        """Score images: uint8 (N, H, W, 3), or float (N, 3, H, W) in [0, 1] as a decoder outputs them."""
        body = safetensors_body(as_uint8(images), prompts, models)
        data = self._request(
            "POST", "/v1/score/safetensors", content=body, headers={"Content-Type": "application/octet-stream"}
        ).json()
        return Scores(data["scores"], data["total"], data["versions"])

    def judge(self, images: torch.Tensor, prompt: str, judge: str) -> dict:
        """A pairwise judge's round-robin over two or more images of one prompt (POST /v1/compare with judge):
        every judgement, the decided pairs, ties and inconsistencies (reward_server.schemas.JudgedResponse)."""
        body = {"prompt": prompt, "judge": judge, "images": [png_base64(im) for im in as_uint8(images)]}
        return self._request("POST", "/v1/compare", json=body).json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def limits(self) -> dict:
        """What one request may ask for (the server's `limits` section)."""
        return self._request("GET", "/v1/models").json()["limits"]

    def reward_fns(
        self, names: Sequence[str] | None = None
    ) -> dict[str, Callable[[torch.Tensor, list[str]], torch.Tensor]]:
        """The server's models `names` (default: all) as functions (images, prompts) -> scores, the form
        `pso eval` scores with; ValueError naming what the server has for a name it does not serve."""
        served = [m["name"] for m in self.models() if not m.get("pairwise")]  # judges score no single image
        names = list(served if names is None else names)
        unknown = [n for n in names if n not in served]
        if unknown or not names:
            raise ValueError(f"the reward server at {self.http.base_url} serves {served}, not {unknown or 'nothing'}")

        def score(name: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return torch.tensor(self.score(images, prompts, [name]).per_model[name])

        return {name: partial(score, name) for name in names}

    def ready(self) -> bool:
        """Whether a reward server answers /readyz as ready right now (no retries)."""
        try:
            r = self.http.get("/readyz")
        except httpx.TransportError:
            return False
        readiness = _readiness(r)
        return r.status_code == 200 and readiness is not None and readiness["ready"]

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Block until /readyz answers 200; RewardServerError if it does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.http.get("/readyz")
            except httpx.TransportError as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                readiness = _readiness(r)
                if readiness is None and r.status_code not in (502, 503, 504):  # a proxy's gateway errors pass
                    raise NotARewardServer(
                        f"{self.http.base_url} answers, but not as a PSO reward server: GET /readyz gave "
                        f"{r.status_code} {r.text[:200]!r}; check actor.reward_url"
                    )
                if readiness is None:
                    reason = f"{r.status_code} from a gateway"
                elif readiness["ready"] and r.status_code == 200:
                    return
                else:
                    reason = readiness.get("error") or "models still loading"
            if time.monotonic() > deadline:
                raise RewardServerError(f"reward server at {self.http.base_url} not ready after {timeout} s: {reason}")
            time.sleep(interval)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return request_with_retries(
            self.http, method, path, retries=self.retries, backoff=self.backoff, max_backoff=self.max_backoff, **kwargs
        )


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) images, from those or from float (N, 3, H, W) in [0, 1] as a decoder outputs them."""
    if images.is_floating_point():
        images = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return images


def safetensors_body(images: torch.Tensor, prompts: Sequence[str], models: Sequence[str] | None = None) -> bytes:
    """The body of POST /v1/score/safetensors: uint8 (N, H, W, 3) images, their prompts, the models to use."""
    metadata = {"prompts": json.dumps(list(prompts))}
    if models is not None:
        metadata["models"] = json.dumps(list(models))
    return save({"images": images.cpu().contiguous()}, metadata=metadata)


def png_base64(image: torch.Tensor) -> str:
    """A uint8 (H, W, 3) image as base64 PNG, the form JSON bodies carry images in."""
    buf = io.BytesIO()
    Image.fromarray(image.cpu().numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request_with_retries(
    http: httpx.Client,
    method: str,
    path: str,
    *,
    retries: int,
    backoff: float,
    max_backoff: float,
    deadline: float | None = None,
    **kwargs,
) -> httpx.Response:
    """One request, retried with exponential backoff and jitter (honouring Retry-After) on connection
    errors, timeouts, 429 and 5xx; RewardServerError for any other error status at once, or for the last
    failure once `retries` more attempts have failed. With a `deadline` (time.monotonic()), no attempt
    runs past it, waits included: the last failure is raised instead."""
    attempt = 0
    while True:
        status = code = None
        if deadline is not None:
            kwargs["timeout"] = max(min(http.timeout.read or math.inf, deadline - time.monotonic()), 0.001)
        try:
            r = http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            problem, wait = f"{type(e).__name__}: {e}", None
        else:
            if r.status_code < 400:
                return r
            problem, wait, status, code = _describe(r), _retry_after(r), r.status_code, _code(r)
            if r.status_code not in RETRY_STATUSES:
                raise RewardServerError(problem, status, code)
        if attempt == retries:
            raise RewardServerError(f"{method} {path} failed after {attempt + 1} attempts: {problem}", status, code)
        delay = wait if wait is not None else min(max_backoff, backoff * 2**attempt)
        delay *= random.uniform(0.8, 1.2)  # jitter, so many callers do not retry in lockstep
        if deadline is not None and time.monotonic() + delay >= deadline:
            problem = f"{method} {path} out of time after {attempt + 1} attempts: {problem}"
            raise RewardServerError(problem, status, code)
        log.warning("%s %s: %s; retrying in %.1f s", method, path, problem, delay)
        time.sleep(delay)
        attempt += 1


def _code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _describe(r: httpx.Response) -> str:
    try:
        return f"{r.status_code} {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {r.text[:200]}"


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return min(float(r.headers["Retry-After"]), 60.0)
    except (KeyError, ValueError):
        return None


def _readiness(r: httpx.Response) -> dict | None:
    """The body of a reward server's /readyz ({"ready": bool, "models": [...], "error": ...}), or None."""
    try:
        body = r.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("ready"), bool) and isinstance(body.get("models"), list):
        return body
    return None
