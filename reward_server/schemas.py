"""Request and response bodies of the REST API (they make the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pso.config.reward_server import MAX_LIST, LimitsConfig
from reward_server.backends.base import ModelInfo


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Request):
    """One prompt per image; images as base64 PNG or JPEG (a `data:image/...;base64,` prefix is allowed)."""

    prompts: list[str] = Field(min_length=1, max_length=MAX_LIST, examples=[["a red circle on a blue background"]])
    images: list[str] = Field(
        min_length=1, max_length=MAX_LIST, description="base64-encoded PNG or JPEG, one per prompt"
    )
    models: list[str] | None = Field(
        None, max_length=64, description="models to score with (default: every served model)"
    )


class CompareRequest(_Request):
    """Two or more candidate images for one prompt."""

    prompt: str = Field(examples=["a red circle on a blue background"])
    images: list[str] = Field(min_length=2, max_length=MAX_LIST, description="base64-encoded PNG or JPEG candidates")
    models: list[str] | None = Field(
        None, max_length=64, description="models to score with (default: every served model)"
    )
    temperature: float = Field(1.0, gt=0, le=1e6, description="softmax temperature over the weighted totals")
    judge: str | None = Field(
        None,
        description="a pairwise judge (see /v1/models) to compare the images with instead of scoring them: every "
        "two in both orders, n (n - 1) judgements for n images",
    )


class ScoreResponse(BaseModel):
    scores: dict[str, list[float]] = Field(description="raw score of each image, per model")
    total: list[float] = Field(description="weighted sum of the models' scores per image (weights in /v1/models)")
    versions: dict[str, str] = Field(description="version of each model that scored")


class CompareResponse(ScoreResponse):
    probabilities: list[float] = Field(description="softmax of total / temperature over the candidates")
    winner: int = Field(description="index of the preferred image")


class Judgement(BaseModel):
    first: int = Field(description="index of the image shown first")
    second: int
    preference: float = Field(description="the judge's preference for the first: 0 (second better), 0.5 (tie), 1")


class JudgedResponse(BaseModel):
    judge: str
    version: str = Field(description="the judge's version")
    judgements: list[Judgement] = Field(description="every judgement, both orders of every two images")
    pairs: list[tuple[int, int]] = Field(description="(winner, loser): the judge preferred the winner in both orders")
    net_wins: list[int] = Field(description="per image: decided wins minus decided losses")
    ties: int = Field(description="pairs the judge called a tie in either order")
    inconsistent: int = Field(description="pairs where the judge preferred the same position in both orders")
    winner: int = Field(description="the image with the most net wins (the first of equals)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    devices: list[str]
    limits: LimitsConfig = Field(description="what one request may ask for")


class ReadyResponse(BaseModel):
    ready: bool
    models: list[str] = Field(description="models loaded so far")
    error: str | None = Field(None, description="why loading failed, if it did")


class ErrorDetail(BaseModel):
    code: str = Field(description="short machine-readable reason, e.g. bad_image, unknown_model")
    message: str = Field(description="what was wrong, in words")


class ErrorResponse(BaseModel):
    error: ErrorDetail
