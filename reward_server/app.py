"""The reward server's FastAPI app: scoring endpoints over a pool of batched models.

`create_app(config)` builds the app; the models load in the background after startup, so
`/healthz` answers at once and `/readyz` turns 200 once every model is loaded.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import pso
from pso.config.reward_server import BackendSpec, RewardServerConfig
from reward_server import decode
from reward_server.backends import RewardBackend, build_backend
from reward_server.errors import ApiError, unprocessable
from reward_server.guard import RequestGuard
from reward_server.metrics import ServerMetrics
from reward_server.pool import ModelPool
from reward_server.schemas import (
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    ModelsResponse,
    ReadyResponse,
    ScoreRequest,
    ScoreResponse,
)

log = logging.getLogger("pso.reward_server")

CONTENT_TYPES = {
    "/v1/score": ("application/json",),
    "/v1/compare": ("application/json",),
    "/v1/score/safetensors": ("application/octet-stream", "application/x-safetensors"),
    "/v1/score/multipart": ("multipart/form-data",),
}
_FORM = {
    "type": "object",
    "required": ["images", "prompts"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "prompts": {"type": "string", "description": "JSON list of strings, one per image"},
        "models": {"type": "string", "description": "JSON list of model names"},
    },
}
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 429, 503)}


_bearer = HTTPBearer(auto_error=False, description="required when the server's token variable is set")


def authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Constant-time check of the bearer token, when the server has one."""
    token = request.app.state.token
    if token and not (credentials and hmac.compare_digest(credentials.credentials.encode(), token.encode())):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def create_app(
    config: RewardServerConfig,
    on_load_failure: Callable[[str], None] | None = None,
    builder: Callable[[BackendSpec, str], RewardBackend] = build_backend,
):
    """The ASGI app; `builder` loads one model on one device (the back-ends' own by default)."""
    metrics = ServerMetrics()
    pool = ModelPool(config, metrics, builder)
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(pool.load(on_load_failure))
        yield
        loading.cancel()
        await pool.close()

    app = FastAPI(
        title="PSO reward server",
        version=pso.__version__,
        description="Scores images against prompts with reward models, batching concurrent requests.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.token = os.environ.get(config.token_env, "")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        if any(err["type"] == "json_invalid" for err in e.errors()):
            return _error(400, "bad_json", "the body is not valid JSON")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:10]
        )  # fmt: skip
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "http_error", str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal", "internal error; see the server log")

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Every configured model is loaded", response_model=ReadyResponse)
    async def readyz():
        body = ReadyResponse(ready=pool.ready, models=pool.loaded, error=pool.error)
        return JSONResponse(body.model_dump(), status_code=200 if pool.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> ModelsResponse:
        pool.select(None)
        return ModelsResponse(models=pool.infos, devices=config.devices)

    async def score_images(read: Callable[[], tuple[list[torch.Tensor], list[str], list[str]]]) -> dict:
        """`read` (decode the request: images, prompts, model names) and preprocessing run together on a
        worker thread, counted as in flight so that batchers wait for them; then the batcher scores."""

        def prepare():
            images, prompts, names = read()
            return pool.prepare(images, prompts, names), prompts, names

        with _inflight(pool):
            inputs, prompts, names = await asyncio.get_running_loop().run_in_executor(pool.prepare_executor, prepare)
        return _scored(pool, await pool.score(inputs, prompts), names)

    @app.post(
        "/v1/score",
        dependencies=[Depends(authorized)],
        summary="Score images, one prompt each (JSON)",
        response_model=ScoreResponse,
    )
    async def score(body: ScoreRequest) -> JSONResponse:
        def read():
            names = pool.select(body.models)
            _check_counts(limits, body.prompts, len(body.images))
            return _decode_base64(body.images, limits), body.prompts, names

        return JSONResponse(await score_images(read))

    @app.post(
        "/v1/score/safetensors",
        dependencies=[Depends(authorized)],
        summary="Score a uint8 (N, H, W, 3) tensor (safetensors body)",
        description="Body: a safetensors file with tensor `images` (uint8, N x H x W x 3) and header metadata "
        "`prompts` (JSON list of N strings) and optionally `models` (JSON list of names).",
        openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
        response_model=ScoreResponse,
    )
    async def score_safetensors(request: Request) -> JSONResponse:
        raw = await request.body()

        def read():
            batch, prompts, wanted = decode.decode_safetensors(raw, limits)
            names = pool.select(wanted)
            _check_counts(limits, prompts, len(batch))
            return list(batch.unbind(0)), prompts, names

        return JSONResponse(await score_images(read))

    @app.post(
        "/v1/score/multipart",
        dependencies=[Depends(authorized)],
        summary="Score uploaded PNG/JPEG files (multipart form)",
        description="Form fields: `images` (one file part per image), `prompts` (JSON list of strings, one per "
        "image), optionally `models` (JSON list of names).",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM}}}},
        response_model=ScoreResponse,
    )
    async def score_multipart(request: Request) -> JSONResponse:
        try:
            form = await request.form(max_files=limits.max_images + 1, max_fields=8)
        except Exception as e:
            raise ApiError(400, "bad_form", f"cannot parse the multipart form: {e}") from None
        files = [f for f in form.getlist("images") if not isinstance(f, str)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        raws = [await f.read() for f in files]

        def read():
            if "prompts" not in fields:
                raise unprocessable("bad_field", "form field 'prompts' (a JSON list of strings) is missing")
            prompts = decode.parse_string_list(fields["prompts"], "prompts")
            names = pool.select(decode.parse_string_list(fields["models"], "models") if "models" in fields else None)
            _check_counts(limits, prompts, len(raws))
            return [decode.decode_image_bytes(r, limits, f"images[{i}]") for i, r in enumerate(raws)], prompts, names

        return JSONResponse(await score_images(read))

    @app.post(
        "/v1/compare",
        dependencies=[Depends(authorized)],
        summary="Which of two or more images fits a prompt",
        response_model=CompareResponse,
    )
    async def compare(body: CompareRequest) -> JSONResponse:
        def read():
            names = pool.select(body.models)
            prompts = [body.prompt] * len(body.images)
            _check_counts(limits, prompts, len(body.images))
            return _decode_base64(body.images, limits), prompts, names

        scored = await score_images(read)
        probabilities = torch.softmax(torch.tensor(scored["total"], dtype=torch.float64) / body.temperature, 0)
        return JSONResponse({**scored, "probabilities": probabilities.tolist(), "winner": int(probabilities.argmax())})

    return RequestGuard(app, max_body_bytes=limits.max_body_bytes, content_types=CONTENT_TYPES, metrics=metrics)


def _decode_base64(images: list[str], limits) -> list[torch.Tensor]:
    return [decode.decode_base64_image(s, limits, f"images[{i}]") for i, s in enumerate(images)]


def _check_counts(limits, prompts: list[str], n_images: int) -> None:
    if n_images == 0:
        raise unprocessable("no_images", "no images to score")
    if n_images > limits.max_images:
        raise ApiError(413, "too_many_images", f"{n_images} images is over the limit of {limits.max_images}")
    if len(prompts) != n_images:
        raise unprocessable("count_mismatch", f"got {len(prompts)} prompts for {n_images} images; give one each")
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise unprocessable(
                "prompt_too_long", f"prompts[{i}] has {len(p)} characters; at most {limits.max_prompt_chars}"
            )


class _inflight:
    """Counts a request as on its way to a batcher while it decodes, so batchers wait for it."""

    def __init__(self, pool: ModelPool):
        self.counter = pool.inflight

    def __enter__(self):
        self.counter.value += 1

    def __exit__(self, *exc):
        self.counter.value -= 1


def _scored(pool: ModelPool, scores: dict[str, torch.Tensor], names: list[str]) -> dict:
    """A ScoreResponse's content, built directly: it is the hot path, and its types are fixed here."""
    total = sum(pool.models[n].spec.weight * scores[n].double() for n in names)
    return {
        "scores": {n: scores[n].tolist() for n in names},
        "total": total.tolist(),
        "versions": {n: pool.versions[n] for n in names},
    }


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
