"""The reward server's section of the config (`reward_server:`): models, devices, batching, limits, auth.

Plain data only: each back-end in `reward_server/backends/` reads its own spec class from here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, JsonValue, field_validator, model_validator

from pso.config.loader import StrictModel

LAION_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L = "openai/clip-vit-large-patch14"


class BackendSpec(StrictModel):
    """Fields every reward model's config has; each back-end adds `kind` (its tag) and its own fields."""

    name: str | None = Field(None, description="name in requests and responses (default: derived from the kind)")
    weight: float = Field(
        1.0, allow_inf_nan=False, description="weight of this model's score in the weighted total (a finite number)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch: int = Field(64, ge=1, description="most images in one forward pass")

    @property
    def model_name(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


TinyReward = Literal[
    "fidelity", "large", "crispness", "sepia", "style_fidelity", "style_crispness", "subject"
]  # pso.tiny.rewards.REWARDS


class TinySpec(BackendSpec):
    """A built-in tiny-world reward (docs/tiny-model.md): prompts must be tiny-world prompts."""

    kind: Literal["tiny"] = "tiny"
    reward: TinyReward = "large"

    @property
    def model_name(self) -> str:
        return self.name or f"tiny-{self.reward}"


class TinyJudgeSpec(BackendSpec):
    """A pairwise judge for the tiny world (docs/tiny-model.md): prefers the image with the higher `reward`.
    `first_bias` is added to the first-shown image's reward, a judge's position bias: close calls then go to
    whichever image is shown first, which asking both orders reveals as inconsistent."""

    kind: Literal["tiny-judge"] = "tiny-judge"
    reward: TinyReward = "large"
    tie_margin: float = Field(0.0, ge=0, allow_inf_nan=False, description="reward differences up to this are ties")
    first_bias: float = Field(0.0, allow_inf_nan=False, description="added to the first-shown image's reward")

    @property
    def model_name(self) -> str:
        return self.name or f"tiny-judge-{self.reward}"


class ImageRewardSpec(BackendSpec):
    """ImageReward v1.0 (THUDM): BLIP ViT-L/16 + BERT-base + MLP, from the official ImageReward.pt."""

    kind: Literal["image-reward"] = "image-reward"
    checkpoint: str = Field(
        "THUDM/ImageReward", description="hub repo id, a folder holding ImageReward.pt, or the file itself"
    )
    med_config: str | None = Field(
        None,
        description="path to the text encoder's med_config.json (default: the one beside the checkpoint file, "
        "else the published values)",
    )
    vision_config: str | None = Field(
        None,
        description="path to a vision_config.json with BlipVisionConfig sizes (default: the one beside the "
        "checkpoint file, else the published ViT-L/16 at 224 px)",
    )
    tokenizer: str = Field("bert-base-uncased", description="hub id or local folder of a BERT tokenizer")


class PickScoreSpec(BackendSpec):
    """PickScore v1: a CLIP ViT-H/14 in transformers' format."""

    kind: Literal["pickscore"] = "pickscore"
    model: str = Field("yuvalkirstain/PickScore_v1", description="CLIPModel weights: hub repo id or local folder")
    processor: str = Field(LAION_VIT_H, description="tokenizer and preprocessor_config.json: hub repo id or folder")


class HPSv2Spec(BackendSpec):
    """HPSv2.1: an open_clip ViT-H-14 checkpoint, converted to transformers' CLIPModel on load."""

    kind: Literal["hpsv2"] = "hpsv2"
    checkpoint: str = Field(
        "xswu/HPSv2", description="open_clip ViT-H-14 checkpoint: a file, a folder holding checkpoint_file, or a hub id"
    )
    checkpoint_file: str = "HPS_v2.1_compressed.pt"
    processor: str = Field(
        LAION_VIT_H,
        description="config.json (the architecture, in transformers' layout), tokenizer and preprocessor_config.json",
    )


class ClipScoreSpec(BackendSpec):
    """CLIP score: max(100 x cosine, 0) of a CLIPModel's image and prompt features."""

    kind: Literal["clip-score"] = "clip-score"
    model: str = Field(OPENAI_VIT_L, description="CLIPModel weights: hub repo id or local folder")
    processor: str | None = Field(None, description="tokenizer and preprocessor_config.json (default: model)")


class AestheticSpec(BackendSpec):
    """The LAION improved aesthetic predictor (v2): an MLP on CLIP ViT-L/14 image features."""

    kind: Literal["aesthetic"] = "aesthetic"
    model: str = Field(OPENAI_VIT_L, description="CLIP ViT-L/14 weights: hub repo id or local folder")
    processor: str | None = Field(None, description="preprocessor_config.json source (default: model)")
    head: str = Field(
        "camenduru/improved-aesthetic-predictor",
        description="the MLP head: a file, a folder holding head_file, or a hub repo id",
    )
    head_file: str = "sac+logos+ava1-l14-linearMSE.pth"


SCORER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


class ResizingSpec(BackendSpec):
    """A back-end that takes images of any size: as sent (grouped by size into batches), or resized."""

    image_size: int | None = Field(
        None, ge=1, le=4096, description="resize every image to this square size before scoring (default: as sent)"
    )


class PythonSpec(ResizingSpec):
    """Your own scorer: a class named by import path, loaded from this config only (never from a request).
    Its protocol is in reward_server/backends/python.py and docs/reward-server.md ("Your own scorer")."""

    kind: Literal["python"] = "python"
    scorer: str = Field(description="the scorer class as module:Class, importable by the server (an installed package)")
    options: dict[str, JsonValue] = Field(
        default_factory=dict, description="keyword arguments for the scorer's constructor (plain data)"
    )

    @property
    def model_name(self) -> str:
        return self.name or self.scorer.rpartition(":")[2]

    @field_validator("scorer")
    @classmethod
    def _import_path(cls, path: str) -> str:
        if not SCORER_PATH.fullmatch(path):
            raise ValueError(f"scorer must be module:Class (e.g. my_package.rewards:OcrScore), got {path!r}")
        return path


DEFAULT_RUBRIC = (
    "You are judging an image generated for the prompt: {prompt!r}. Rate how well it matches the prompt and how good "
    "it looks, from {low:g} (bad) to {high:g} (excellent). Answer with the number only."
)
DEFAULT_PAIRWISE_RUBRIC = (
    "You are judging two images generated for the prompt: {prompt!r}. Which one matches the prompt better and "
    "looks better? Answer 1 for the first image, 2 for the second, or 0 if they are equally good. Answer with the "
    "number only."
)


class HttpSpec(ResizingSpec):
    """A scorer behind HTTP: another PSO reward server (`api: pso`), or a vision-language model behind an
    OpenAI-compatible chat API (vLLM, SGLang or a hosted API) turned into a judge by a rubric: of one image
    (`api: openai-chat`, a score) or of two (`api: openai-chat-pairwise`, a pairwise judge)."""

    kind: Literal["http"] = "http"
    url: str = Field(description="the remote's base URL: a reward server's root, or an OpenAI API's /v1")
    api: Literal["pso", "openai-chat", "openai-chat-pairwise"] = "pso"
    remote_model: str | None = Field(
        None,
        description="pso: the remote model whose score is used (default: the total); openai-chat: its model id",
    )
    token_env: str | None = Field(None, description="environment variable holding the remote's bearer token")
    timeout_s: float = Field(15.0, gt=0, le=600, description="per attempt")
    retries: int = Field(2, ge=0, le=10, description="more attempts on connection errors, timeouts, 429 and 5xx")
    max_concurrency: int = Field(
        8, ge=1, le=256, description="requests in flight to the remote at once, per model copy (one per device entry)"
    )
    rubric: str | None = Field(
        None,
        description="openai-chat: the question, with {prompt}, {low} and {high} filled in (default: DEFAULT_RUBRIC); "
        "openai-chat-pairwise: with {prompt}, answered 1, 2 or 0 (default: DEFAULT_PAIRWISE_RUBRIC)",
    )
    score_range: tuple[float, float] = Field((1.0, 10.0), description="openai-chat: the scores the rubric asks for")
    max_tokens: int = Field(16, ge=1, le=4096, description="openai-chat: the answer's length limit")
    scale: str | None = Field(None, description="what the numbers mean, for /v1/models")

    @property
    def model_name(self) -> str:
        return self.name or self.remote_model or "http"

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http:// or https://, got {url!r}")
        return url.rstrip("/")

    @property
    def question(self) -> str:
        return self.rubric or (DEFAULT_PAIRWISE_RUBRIC if self.api == "openai-chat-pairwise" else DEFAULT_RUBRIC)

    @model_validator(mode="after")
    def _judge_settings(self) -> HttpSpec:
        if self.api != "pso" and not self.remote_model:
            raise ValueError(f"api {self.api} needs remote_model: the model id the chat API serves")
        if self.api == "openai-chat":
            low, high = self.score_range
            if not low < high:
                raise ValueError(f"score_range must be (low, high) with low < high, got {self.score_range}")
        try:
            self.question.format(prompt="p", low=self.score_range[0], high=self.score_range[1])
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"rubric may use only {{prompt}}, {{low}} and {{high}}: {e!r}") from None
        return self


RewardModelSpec = Annotated[
    TinySpec
    | TinyJudgeSpec
    | ImageRewardSpec
    | PickScoreSpec
    | HPSv2Spec
    | ClipScoreSpec
    | AestheticSpec
    | PythonSpec
    | HttpSpec,
    Field(discriminator="kind"),
]


class BatchingConfig(StrictModel):
    """Dynamic batching: requests arriving within `window_ms` of the first are scored in one forward."""

    window_ms: float = Field(10.0, ge=0, le=1000)
    max_queue: int = Field(
        1024, ge=1, description="images accepted and not yet scored per device, beyond which requests get 429"
    )


MAX_LIST = 4096  # the request schemas' hard cap on list lengths, whatever the limits say


class LimitsConfig(StrictModel):
    """Bounds on what one request may ask for and how long it may take (docs/reward-server.md lists
    what each refusal looks like)."""

    max_header_bytes: int = Field(
        64 * 2**10, ge=8192, le=2**20, description="request line and headers; more get 431 and the connection closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a connection without a complete request header after this is closed"
    )
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_buffered_bytes: int = Field(
        1024 * 2**20, ge=1024, description="bodies held by all the requests in progress; more get 429"
    )
    max_images: int = Field(256, ge=1, le=MAX_LIST, description="images per request")
    max_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image (decompression bombs)")
    max_total_pixels: int = Field(256 * 512 * 512, ge=1, description="pixels of all the images of one request")
    max_prompt_chars: int = Field(2000, ge=1)
    max_judgements: int = Field(
        56, ge=2, le=MAX_LIST, description="judgements one /v1/compare with a judge may need: n (n - 1) for n images"
    )
    max_concurrent_requests: int = Field(256, ge=1, description="scoring requests in progress; more get 429")
    request_timeout_s: float = Field(
        60.0, gt=0, allow_inf_nan=False, description="a request not answered after this gets 503"
    )

    @model_validator(mode="after")
    def _buffer_fits_a_body(self) -> LimitsConfig:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or the largest bodies could never be read"
            )
        return self


class RewardServerConfig(StrictModel):
    """`pso reward-server`: which models to serve, where, and how."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    models: list[RewardModelSpec] = Field(default_factory=lambda: [TinySpec()], min_length=1)
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1, description="one model copy per device")
    workers: int = Field(1, ge=1, description="server processes; each loads its own copy of the models")
    token_env: str = Field(
        "PSO_REWARD_TOKEN",
        description="environment variable holding the bearer token; unset or empty: no auth (blank: an error)",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> RewardServerConfig:
        names = [m.model_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {dupes}; set `name` on each")
        return self

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> RewardServerConfig:
        if self.batching.max_queue < self.limits.max_images:
            raise ValueError(
                f"batching.max_queue ({self.batching.max_queue}) must be at least limits.max_images "
                f"({self.limits.max_images}), or the largest requests could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _remotes_answer_in_time(self) -> RewardServerConfig:
        """A remote scorer's attempts must fit in a request's time: the device's batch worker waits for them,
        and would otherwise go on waiting after the callers had their 503."""
        for spec in self.models:
            if isinstance(spec, HttpSpec):
                budget = spec.timeout_s * (spec.retries + 1)
                if budget > self.limits.request_timeout_s:
                    raise ValueError(
                        f"model {spec.model_name}: timeout_s x (retries + 1) = {budget:g} s is more than "
                        f"limits.request_timeout_s ({self.limits.request_timeout_s:g} s); lower them or raise it"
                    )
        return self

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, devices: list[str]) -> list[str]:
        for d in devices:
            if d != "cpu" and not d.startswith(("cuda", "mps", "xpu")):
                raise ValueError(f"unknown device {d!r}: use cpu, cuda, cuda:N, mps or xpu")
        return devices
