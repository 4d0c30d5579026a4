"""The reward server's FastAPI app: scoring endpoints over a pool of batched models.

`create_app(config)` builds the app; the models load in the background after startup, so
`/healthz` answers at once and `/readyz` turns 200 once every model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

import pso
from pso.config.reward_server import BackendSpec, LimitsConfig, RewardServerConfig
from pso.judging import decide, round_robin
from reward_server import decode
from reward_server.backends import RewardBackend, build_backend
from reward_server.errors import ApiError, describe_validation, error_body, unprocessable
from reward_server.guard import CLIENT_GONE, RequestGuard, bearer_token
from reward_server.metrics import ServerMetrics, mark_worker_gone
from reward_server.pool import ModelPool, Pairing, Reader
from reward_server.schemas import (
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    JudgedResponse,
    ModelsResponse,
    ReadyResponse,
    ScoreRequest,
    ScoreResponse,
)

log = logging.getLogger("pso.reward_server")

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
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
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 408, 413, 415, 422, 429, 503)}
_SCORE_REQUEST, _COMPARE_REQUEST = TypeAdapter(ScoreRequest), TypeAdapter(CompareRequest)


def _json_body(model) -> dict:
    """OpenAPI for a JSON body the route parses itself (off the event loop, bounded: see decode.parse_json)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# Enforced by RequestGuard before the body is read; declared here so the OpenAPI schema shows the scheme.
_bearer = HTTPBearer(auto_error=False, description="required when the server's token variable is set")
_SECURED = [Depends(_bearer)]


def create_app(
    config: RewardServerConfig,
    on_load_failure: Callable[[str], None] | None = None,
    builder: Callable[[BackendSpec, str], RewardBackend] = build_backend,
):
    """The ASGI app; `builder` loads one model on one device (the back-ends' own by default)."""
    metrics = ServerMetrics()
    pool = ModelPool(config, metrics, builder)
    limits = config.limits
    token = bearer_token(config)
    if not token and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: set $%s to require one", config.host, config.token_env)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(pool.load(on_load_failure))
        yield
        loading.cancel()
        await pool.close()
        mark_worker_gone()
        log.info("shut down")

    app = FastAPI(
        title="PSO reward server",
        version=pso.__version__,
        description="Scores images against prompts with reward models, batching concurrent requests.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.pool = pool
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err["type"] == "json_invalid" for err in errors):
            return _error(400, "bad_json", "the body is not valid JSON")
        return _error(422, "invalid_request", describe_validation(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = "bad_request" if e.status_code == 400 else "http_error"
        return _error(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # logged once, by RequestGuard, with the traceback
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

    @app.get("/v1/models", dependencies=_SECURED)
    async def models() -> ModelsResponse:
        pool.check_ready()
        return ModelsResponse(models=pool.infos, devices=config.devices, limits=limits)

    async def scored(request: Request, read: Reader, pairing: Pairing | None = None) -> dict:
        """A ScoreResponse's content, built directly: it is the hot path, and its types are fixed here. With a
        `pairing` that gives pairs, the one model is a judge: its preferences come back as its scores."""
        scores, names = await pool.run(read, request.scope.get(CLIENT_GONE), pairing)
        if pool.models[names[0]].pairwise:
            return {"scores": scores, "versions": {n: pool.versions[n] for n in names}}
        weights = [pool.models[n].spec.weight for n in names]
        total = [sum(w * scores[n][i] for w, n in zip(weights, names)) for i in range(len(scores[names[0]]))]
        if not all(math.isfinite(x) for x in total):  # a non-finite score makes a non-finite total
            raise ApiError(500, "non_finite_score", "a model returned a non-finite score; see /v1/models for dtypes")
        return {
            "scores": {n: scores[n] for n in names},
            "total": total,
            "versions": {n: pool.versions[n] for n in names},
        }

    def judged_response(judge: str, n: int, result: dict) -> dict:
        """A judged comparison of n images: every judgement, and the round-robin's decided pairs, ties and
        inconsistencies."""
        preferences = result["scores"][judge]
        if not all(0.0 <= p <= 1.0 for p in preferences):  # NaN fails too
            raise ApiError(500, "bad_judgement", f"the judge {judge} returned a preference outside [0, 1]")
        orders = round_robin(n)
        tournament = decide(n, preferences)
        return {
            "judge": judge,
            "version": result["versions"][judge],
            "judgements": [{"first": i, "second": j, "preference": p} for (i, j), p in zip(orders, preferences)],
            "pairs": [list(p) for p in tournament.decided],
            "net_wins": tournament.net_wins,
            "ties": tournament.ties,
            "inconsistent": tournament.inconsistent,
            "winner": max(range(n), key=tournament.net_wins.__getitem__),
        }

    # each judgement takes two images' room in a device's queue
    most_judgements = min(limits.max_judgements, config.batching.max_queue // 2)

    def base64_images(images: list[str]) -> list:
        """The JSON endpoints' base64 images, opened from their headers."""
        return decode.open_images([decode.base64_bytes(s, f"images[{i}]") for i, s in enumerate(images)], limits)

    @app.post(
        "/v1/score",
        dependencies=_SECURED,
        summary="Score images, one prompt each (JSON)",
        response_model=ScoreResponse,
        openapi_extra=_json_body(ScoreRequest),
    )
    async def score(request: Request) -> JSONResponse:
        raw = await request.body()

        def read():
            body = decode.parse_json(raw, _SCORE_REQUEST)
            names = pool.select(body.models)
            _check_request(limits, body.prompts, len(body.images))
            return base64_images(body.images), body.prompts, names

        return JSONResponse(await scored(request, read))

    @app.post(
        "/v1/score/safetensors",
        dependencies=_SECURED,
        summary="Score a uint8 (N, H, W, 3) tensor (safetensors body)",
        description="Body: a safetensors file with tensor `images` (uint8, N x H x W x 3) and header metadata "
        "`prompts` (JSON list of N strings) and optionally `models` (JSON list of names).",
        openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
        response_model=ScoreResponse,
    )
    async def score_safetensors(request: Request) -> JSONResponse:
        raw = await request.body()

        def read():
            images, prompts, wanted = decode.decode_safetensors(raw, limits)
            names = pool.select(wanted)
            _check_request(limits, prompts, len(images))
            return images, prompts, names

        return JSONResponse(await scored(request, read))

    @app.post(
        "/v1/score/multipart",
        dependencies=_SECURED,
        summary="Score uploaded PNG/JPEG files (multipart form)",
        description="Form fields: `images` (one file part per image), `prompts` (JSON list of strings, one per "
        "image), optionally `models` (JSON list of names).",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM}}}},
        response_model=ScoreResponse,
    )
    async def score_multipart(request: Request) -> JSONResponse:
        raw = await request.body()

        def read():
            raws, fields = decode.parse_form(raw, request.headers["content-type"], limits.max_images, max_fields=8)
            if "prompts" not in fields:
                raise unprocessable("bad_field", "form field 'prompts' (a JSON list of strings) is missing")
            prompts = decode.parse_string_list(fields["prompts"], "prompts")
            names = pool.select(decode.parse_string_list(fields["models"], "models") if "models" in fields else None)
            _check_request(limits, prompts, len(raws))
            return decode.open_images(raws, limits), prompts, names

        return JSONResponse(await scored(request, read))

    @app.post(
        "/v1/compare",
        dependencies=_SECURED,
        summary="Which of two or more images fits a prompt",
        response_model=CompareResponse | JudgedResponse,
        openapi_extra=_json_body(CompareRequest),
    )
    async def compare(request: Request) -> JSONResponse:
        raw = await request.body()
        body: CompareRequest | None = None

        def read():
            nonlocal body
            body = decode.parse_json(raw, _COMPARE_REQUEST)
            n = len(body.images)
            if body.judge is None:
                names = pool.select(body.models)
            elif body.models is not None:
                raise unprocessable("bad_field", "give either judge (a pairwise judge) or models (scorers), not both")
            else:
                names = pool.select_judge(body.judge)
                if n * (n - 1) > most_judgements:
                    raise ApiError(
                        413, "too_many_images",
                        f"{n} images need {n * (n - 1)} judgements; at most {most_judgements}",
                    )  # fmt: skip
            prompts = [body.prompt] * n
            _check_request(limits, prompts, n)
            return base64_images(body.images), prompts, names

        def pairing(n: int) -> list[tuple[int, int]] | None:  # called after read(): body is parsed
            return round_robin(n) if body.judge is not None else None

        result = await scored(request, read, pairing)
        if body.judge is not None:
            return JSONResponse(judged_response(body.judge, len(body.images), result))
        total = result["total"]
        top = max(total)
        # softmax of total / temperature, shifted by the top: the exponents are <= 0, and -inf gives 0
        odds = [math.exp((t - top) / body.temperature) for t in total]
        norm = sum(odds)
        probabilities = [o / norm for o in odds]
        return JSONResponse({**result, "probabilities": probabilities, "winner": total.index(top)})

    return RequestGuard(
        app, token=token, limits=limits, content_types=CONTENT_TYPES, metrics=metrics, open_paths=OPEN_PATHS
    )


def _check_request(limits: LimitsConfig, prompts: list[str], n_images: int) -> None:
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


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(code, message), status_code=status, headers=headers, media_type="application/json")
