"""`kind: http`: a scorer behind HTTP, served as if it were local.

- `api: pso`: another PSO reward server (or anything speaking its API): each batch goes as one safetensors
  request to `/v1/score/safetensors`, and the score of `remote_model` (default: the remote total) comes back.
- `api: openai-chat`: a vision-language model behind an OpenAI-compatible chat API (vLLM, SGLang or a hosted
  one) as a judge: one chat completion per image, asking the rubric about the image and its prompt, and the
  number in the answer is the score. An answer without a number in `score_range`, a refusal or a filtered
  answer fails the request with a 502 that names the image's prompt and quotes the answer: never a silent 0.
- `api: openai-chat-pairwise`: the same model as a pairwise judge: one chat completion per pair, both images
  shown, answered 1 (the first is better), 2 (the second) or 0 (a tie); anything else is a 502 as above.

Requests to the remote carry the bearer token from `token_env`, run at most `max_concurrency` at once, and
are retried on connection errors, timeouts, 429 and 5xx (honouring Retry-After). The remote's failures map
onto the server's own error envelope: unreachable or overloaded after the retries is a 503, a refusal of the
caller's input (422 from a PSO remote) stays a 422, any other error status or a malformed answer is a 502.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import torch

from pso.config.reward_server import HttpSpec
from pso.secrets import read_secret
from reward_server.backends.base import ModelInfo
from reward_server.backends.resizing import ResizingBackend
from reward_server.client import (
    RETRY_STATUSES,
    RewardServerError,
    png_base64,
    request_with_retries,
    safetensors_body,
)
from reward_server.errors import ApiError, shorten

log = logging.getLogger("pso.reward_server")
# The whole answer must be the number, optionally labelled ("Score: 7") or over a scale ("7/10"): in prose, the
# first number may be the scale's ("on a scale of 1 to 10 I'd give it 7"), so prose is refused, never guessed.
ANSWER = re.compile(
    r"\s*(?:(?:score|rating|answer|image)\s*[:=]?\s*)?([-+]?\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?)?\s*\.?\s*",
    re.IGNORECASE,
)
CALLER_INPUT_ERRORS = {"bad_prompt", "bad_image", "prompt_too_long"}  # a remote reward server's 422s about the input
PAIRWISE_ANSWERS = {1.0: 1.0, 2.0: 0.0, 0.0: 0.5}  # a pairwise judge's answer -> its preference for the first


class HttpBackend(ResizingBackend):
    kind = "http"

    def __init__(self, spec: HttpSpec, device: torch.device):
        super().__init__(spec, device)
        token = bearer_token(spec)
        self.http = httpx.Client(
            base_url=spec.url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=spec.timeout_s,
            limits=httpx.Limits(max_connections=spec.max_concurrency),
        )
        self.judges = ThreadPoolExecutor(spec.max_concurrency, thread_name_prefix=f"judge-{spec.model_name}")
        self.remote = self._remote_info() if spec.api == "pso" else None
        self.pairwise = spec.api == "openai-chat-pairwise"

    def _remote_info(self) -> dict:
        """The remote reward server's description of `remote_model` (a stand-in for its total), which also
        checks at start that it answers and serves that model as a scorer."""
        models = self._call("GET", "/v1/models").json()["models"]
        named = {m["name"]: m for m in models}
        if self.spec.remote_model and self.spec.remote_model not in named:
            raise ValueError(f"{self.spec.url} serves {sorted(named)}, not remote_model {self.spec.remote_model!r}")
        if self.spec.remote_model and named[self.spec.remote_model].get("pairwise"):
            raise ValueError(f"remote_model {self.spec.remote_model!r} is a pairwise judge there; it scores no image")
        return named[self.spec.remote_model] if self.spec.remote_model else {"version": "total", "scale": "total"}

    @property
    def info(self) -> ModelInfo:
        spec = self.spec
        if spec.api == "pso":
            version, scale = f"{spec.remote_model or 'total'}@{self.remote['version']}", self.remote["scale"]
        elif self.pairwise:
            version, scale = f"{spec.remote_model}@openai-chat-pairwise", "preference for the first image: 1, 0.5 or 0"
        else:
            version, scale = (
                f"{spec.remote_model}@openai-chat",
                "the judge's rating, {:g} to {:g}".format(*spec.score_range),
            )
        return ModelInfo(
            name=spec.model_name,
            kind=self.kind,
            version=version,
            scale=spec.scale or scale,
            higher_is_better=bool(self.remote.get("higher_is_better", True)) if self.remote else True,
            weight=spec.weight,
            pairwise=self.pairwise,
        )

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        deadline = self._deadline()
        if self.spec.api == "pso":
            scores = self._remote_scores(pixels, list(prompts), deadline)
        else:
            scores = list(self.judges.map(partial(self._judge, deadline=deadline), pixels, prompts))
        return torch.tensor(scores, dtype=torch.float32)

    def _deadline(self) -> float:
        """When a batch's calls must end, waits and retries included: the budget the config checked against the
        request timeout, so that the device's worker never waits on the remote longer than its callers do."""
        return time.monotonic() + self.spec.timeout_s * (self.spec.retries + 1)

    def _remote_scores(self, pixels: torch.Tensor, prompts: list[str], deadline: float) -> list[float]:
        body = safetensors_body(pixels, prompts, [self.spec.remote_model] if self.spec.remote_model else None)
        headers = {"Content-Type": "application/octet-stream"}
        data = self._call("POST", "/v1/score/safetensors", deadline, content=body, headers=headers).json()
        try:
            scores = data["scores"][self.spec.remote_model] if self.spec.remote_model else data["total"]
            scores = [float(x) for x in scores]
        except (KeyError, TypeError, ValueError):
            raise self._bad_answer("its answer holds no scores") from None
        if len(scores) != len(prompts) or not all(math.isfinite(x) for x in scores):
            raise self._bad_answer(f"it returned {len(scores)} scores for {len(prompts)} images, or a non-finite one")
        return scores

    def compare_batch(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        compare = partial(self._compare, deadline=self._deadline())
        return torch.tensor(list(self.judges.map(compare, first, second, prompts)), dtype=torch.float32)

    def _judge(self, image: torch.Tensor, prompt: str, deadline: float) -> float:
        low, high = self.spec.score_range
        return judgement(self._ask([image], prompt, deadline), prompt, low, high)

    def _compare(self, first: torch.Tensor, second: torch.Tensor, prompt: str, deadline: float) -> float:
        """The judge's preference for `first`: its answer 1 (first), 2 (second) or 0 (a tie)."""
        answer = judgement(self._ask([first, second], prompt, deadline), prompt, -math.inf, math.inf)
        if answer not in PAIRWISE_ANSWERS:
            raise ApiError(502, "judge_unparseable", f"the judge's answer for prompt {shorten(prompt)}, {answer:g}, "
                           "is not 1 (first), 2 (second) or 0 (a tie)")  # fmt: skip
        return PAIRWISE_ANSWERS[answer]

    def _ask(self, images: list[torch.Tensor], prompt: str, deadline: float) -> dict:
        """One chat completion: the rubric about `prompt`, then the images."""
        low, high = self.spec.score_range
        content = [{"type": "text", "text": self.spec.question.format(prompt=prompt, low=low, high=high)}]
        content += [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images]
        body = {
            "model": self.spec.remote_model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.spec.max_tokens,
            "temperature": 0.0,
        }
        return self._call("POST", "/chat/completions", deadline, json=body).json()

    def _call(self, method: str, path: str, deadline: float | None = None, **kwargs) -> httpx.Response:
        try:
            return request_with_retries(
                self.http, method, path, retries=self.spec.retries, backoff=0.5, max_backoff=10.0, deadline=deadline,
                **kwargs,
            )  # fmt: skip
        except RewardServerError as e:
            log.warning("remote scorer %s at %s%s: %s", self.spec.model_name, self.spec.url, path, e)
            raise upstream_error(self.spec, e) from None

    def _bad_answer(self, why: str) -> ApiError:
        return ApiError(502, "bad_upstream_answer", f"the remote scorer {self.spec.model_name}: {why}")


def bearer_token(spec: HttpSpec) -> str | None:
    """The remote's token from the environment variable the spec names (secrets never sit in configs)."""
    if spec.token_env is None:
        return None
    token = (read_secret(spec.token_env) or "").strip()
    if not token:
        raise ValueError(f"{spec.model_name}: token_env names {spec.token_env}, which is unset or blank")
    return token


def upstream_error(spec: HttpSpec, e: RewardServerError) -> ApiError:
    """The remote's failure in the reward server's own terms. Only a remote reward server's refusal of the
    caller's own input is passed on in its words; anything else (an API's message may quote a masked key, a
    model id or a proxy's host) goes to the log only."""
    name = spec.model_name
    if e.status is None or e.status in RETRY_STATUSES:
        return ApiError(503, "upstream_unavailable", f"the remote scorer {name} is unavailable", {"Retry-After": "5"})
    if e.status == 422 and spec.api == "pso" and e.code in CALLER_INPUT_ERRORS:
        # its "prompts[i] for MODEL: " counts within the batch forwarded to it, not the caller's request
        detail = re.sub(r"^422 (prompts|images)\[\d+\] for [^:]+: ", "", str(e))
        return ApiError(422, "upstream_rejected", f"the remote scorer {name} refused the input ({e.code}): {detail}")
    return ApiError(502, "upstream_error", f"the remote scorer {name} failed with HTTP {e.status}; see the server log")


def png_data_url(image: torch.Tensor) -> str:
    """A uint8 (H, W, 3) image as a data: URL of a PNG, the form chat APIs take images in."""
    return "data:image/png;base64," + png_base64(image)


def judgement(completion: dict, prompt: str, low: float, high: float) -> float:
    """The score a chat completion's answer is (ANSWER), which must lie in [low, high]. A refusal, a filtered
    or cut-off answer, or anything else is a 502 naming the image's prompt and quoting the answer."""
    where = f"the judge's answer for the image of prompt {shorten(prompt)}"
    try:
        choice = completion["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise ApiError(502, "bad_upstream_answer", f"{where} is not a chat completion") from None
    refusal = message.get("refusal") if isinstance(message, dict) else None
    if refusal or choice.get("finish_reason") == "content_filter":
        raise ApiError(502, "judge_refused", f"{where} is a refusal: {shorten(str(refusal or 'content filter'), 200)}")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise ApiError(502, "judge_unparseable", f"{where} has no text")
    if choice.get("finish_reason") == "length":
        raise ApiError(502, "judge_unparseable", f"{where} was cut off at max_tokens: {shorten(text, 200)}")
    found = ANSWER.fullmatch(text)
    if found is None or not low <= float(found[1]) <= high:
        raise ApiError(
            502, "judge_unparseable", f"{where}, {shorten(text, 200)}, holds no score from {low:g} to {high:g}"
        )
    return float(found[1])
