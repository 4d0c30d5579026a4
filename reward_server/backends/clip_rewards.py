"""The CLIP-family reward back-ends: PickScore, HPSv2.1, CLIP score and the LAION aesthetic predictor.

All four run on transformers' CLIPModel through one `ClipTower` (unit-norm image and text
features) and one torch-only image transform. HPSv2.1 ships as an open_clip checkpoint, which
`clip_convert` maps onto CLIPModel's keys. `build_random` writes tiny random instances of each,
laid out like the real models, so that everything is testable offline.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from pso.config.reward_server import AestheticSpec, BackendSpec, ClipScoreSpec, HPSv2Spec, PickScoreSpec
from reward_server.backends.base import (
    DTYPES,
    ModelInfo,
    RewardBackend,
    load_state_dict,
    local_or_hub,
    resolve_file,
    tensor_digest,
)
from reward_server.backends.clip_convert import openclip_shapes, openclip_to_transformers
from reward_server.backends.clip_preprocess import ImageTransform


class ClipTower:
    """A CLIPModel with its processor's image transform and tokenizer; gives unit-norm float32 features.

    Prompts are cut to the text model's context (77 tokens) as CLIP's tokenizers do. Padding does
    not matter: text attention is causal, so the end-of-text position, where CLIP pools, never
    sees the padding after it.
    """

    def __init__(self, model: CLIPModel, processor: str, *, text: bool = True, round_crop: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.transform = ImageTransform.from_source(processor, round_crop)
        self.tokenizer = CLIPTokenizer.from_pretrained(local_or_hub(processor)) if text else None
        self.context = model.config.text_config.max_position_embeddings

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm features of uint8 crops (B, 3, h, w), as `transform.crop` makes them."""
        pixels = self.transform.normalize(pixels.to(self.model.device)).to(self.model.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.context, return_tensors="pt"
        ).input_ids
        return F.normalize(
            self.model.get_text_features(input_ids=ids.to(self.model.device)).pooler_output.float(), dim=-1
        )

    def cosine(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.image_features(pixels) * self.text_features(prompts)).sum(-1)


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor v2's MLP (state-dict keys layers.0 ... layers.7)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ClipBackend(RewardBackend):
    """What the four share: load a CLIPModel (`_load`), wrap it in a ClipTower, and digest the weights."""

    scale: ClassVar[str]
    uses_text: ClassVar[bool] = True
    round_crop: ClassVar[bool] = False  # published with torchvision's CenterCrop (see ImageTransform)

    def __init__(self, spec: BackendSpec, device: torch.device):
        super().__init__(spec, device)
        model, processor, source = self._load()
        self.tower = ClipTower(
            model.to(self.device, self.dtype), processor, text=self.uses_text, round_crop=self.round_crop
        )
        self._version = f"{source}@{tensor_digest(self._weights())}"

    @abstractmethod
    def _load(self) -> tuple[CLIPModel, str, str]:
        """The CLIPModel, its processor source, and the source named in `info.version`."""

    def _weights(self) -> nn.Module:
        return self.tower.model

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.model_name, kind=self.kind, version=self._version, scale=self.scale, weight=self.spec.weight
        )

    def check_size(self, width: int, height: int) -> None:
        self.tower.transform.check_size(width, height)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return self.tower.transform.crop(image)

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._score(pixels, prompts).float().cpu()

    @abstractmethod
    def _score(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def _pretrained(source: str, dtype: str) -> CLIPModel:
    return CLIPModel.from_pretrained(local_or_hub(source), dtype=DTYPES[dtype])


class PickScoreBackend(ClipBackend):
    kind = "pickscore"
    scale = "PickScore: logit_scale.exp() x cosine of image and prompt features (100 x cosine); usually 18-24"
    spec: PickScoreSpec

    def _load(self):
        return _pretrained(self.spec.model, self.spec.dtype), self.spec.processor, self.spec.model

    def _score(self, pixels, prompts):
        return self.tower.model.logit_scale.float().exp() * self.tower.cosine(pixels, prompts)


class HPSv2Backend(ClipBackend):
    kind = "hpsv2"
    scale = "HPSv2.1: cosine of image and prompt features; usually 0.2-0.35"
    round_crop = True
    spec: HPSv2Spec

    def _load(self):
        from accelerate import init_empty_weights

        state = load_state_dict(resolve_file(self.spec.checkpoint, self.spec.checkpoint_file))
        config = CLIPConfig.from_pretrained(local_or_hub(self.spec.processor))
        with init_empty_weights():  # parameters on the meta device, replaced by the checkpoint's below
            model = CLIPModel(config)
        model.load_state_dict(openclip_to_transformers(state), strict=True, assign=True)
        return model, self.spec.processor, self.spec.checkpoint

    def _score(self, pixels, prompts):
        return self.tower.cosine(pixels, prompts)


class ClipScoreBackend(ClipBackend):
    kind = "clip-score"
    scale = "CLIP score: max(100 x cosine of image and prompt features, 0); 0-100, usually 15-35"
    spec: ClipScoreSpec

    def _load(self):
        return _pretrained(self.spec.model, self.spec.dtype), self.spec.processor or self.spec.model, self.spec.model

    def _score(self, pixels, prompts):
        return (100 * self.tower.cosine(pixels, prompts)).clamp(min=0)


class AestheticBackend(ClipBackend):
    kind = "aesthetic"
    scale = "LAION aesthetic predictor v2 rating of the image alone (prompt ignored); about 1-10"
    uses_text = False
    round_crop = True
    spec: AestheticSpec

    def _load(self):
        model = _pretrained(self.spec.model, self.spec.dtype)
        # the head is tiny and stays in float32 whatever the tower's dtype
        self.head = AestheticHead(model.config.projection_dim)
        self.head.load_state_dict(load_state_dict(resolve_file(self.spec.head, self.spec.head_file)))
        self.head.to(self.device).eval().requires_grad_(False)
        return model, self.spec.processor or self.spec.model, f"{self.spec.model}+{self.spec.head}"

    def _weights(self):
        return nn.ModuleDict({"clip": self.tower.model, "head": self.head})

    def _score(self, pixels, prompts):
        return self.head(self.tower.image_features(pixels)).squeeze(-1)


CLIP_BACKENDS: dict[str, type[ClipBackend]] = {
    cls.kind: cls for cls in (PickScoreBackend, HPSv2Backend, ClipScoreBackend, AestheticBackend)
}

# Tiny random models. The vision tower is wider than the text tower and both differ from the
# projection, so a transposed or swapped matrix cannot go unnoticed.
TINY_VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_IMAGE, TINY_PATCH, TINY_PROJECTION = 32, 8, 40
# distinct from CLIP's, to show that a folder's preprocessor_config.json is read
TINY_MEAN, TINY_STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.35)


# The published architectures: open_clip's ViT-H-14 (PickScore's and HPSv2's base) and OpenAI's ViT-L/14.
VIT_H14 = dict(
    vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                patch_size=14, image_size=224, hidden_act="gelu"),
    text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip
VIT_L14 = dict(
    vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                patch_size=14, image_size=224, hidden_act="quick_gelu"),
    text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    projection_dim=768,
)  # fmt: skip


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden_act: str = "quick_gelu") -> CLIPConfig:
    """A 2-layer CLIP whose text side is the tiny pipelines' text encoder and whose special ids are the tokenizer's.

    OpenAI's CLIPs use quick_gelu, open_clip's ViT-H-14 (PickScore's and HPSv2's base) exact gelu.
    """
    from pso.tiny.pipelines import text_config  # imported here: it pulls in diffusers, which scoring never needs

    text = text_config(tokenizer)
    text.hidden_act = hidden_act
    vision = CLIPVisionConfig(**TINY_VISION, image_size=TINY_IMAGE, patch_size=TINY_PATCH, hidden_act=hidden_act)
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION, logit_scale_init_value=math.log(100)
    )


def _random_openclip(config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Random tensors in open_clip's layout (from the architecture, not from a CLIPModel): fan-in scaled
    matrices, layer-norm weights near 1, small vectors; stored in float16."""
    state = {}
    for name, shape in openclip_shapes(config).items():
        if name == "logit_scale":
            value = torch.tensor(math.log(100))
        elif len(shape) >= 2:
            value = torch.randn(shape) / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.1 * torch.randn(shape) + (1.0 if ".ln_" in f".{name}" and name.endswith(".weight") else 0.0)
        state[name] = value.half()
    return state


def full_clip_config(kind: str, tokenizer: CLIPTokenizer) -> CLIPConfig:
    """The published architecture for `kind`, with the tokenizer's special token ids."""
    arch = VIT_H14 if kind in ("pickscore", "hpsv2") else VIT_L14
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    return CLIPConfig(
        text_config={**arch["text"], **ids},
        vision_config=arch["vision"],
        projection_dim=arch["projection_dim"],
        logit_scale_init_value=math.log(100),
    )


def build_random(kind: str, out_dir: str | Path, seed: int = 0, full: bool = False) -> Path:
    """Write a random model of `kind` to `out_dir` and return it: tiny, or with `full` the published
    architecture (weights stored in float16; for benchmarks).

    The folder loads through the same spec fields as a real model in a local folder: `model` and
    `processor` (pickscore, clip-score, aesthetic), `checkpoint` and `processor` (hpsv2: an
    open_clip checkpoint named like HPSv2.1's plus config.json), `head` (aesthetic: a head file
    named like the LAION one). Each folder also has a tiny CLIP tokenizer and a preprocessor_config.json.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pso.tiny.tokenizer import build_clip_tokenizer

    if kind not in CLIP_BACKENDS:
        raise ValueError(f"unknown kind {kind!r}; one of {sorted(CLIP_BACKENDS)}")
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir)
    if full:
        config = full_clip_config(kind, tokenizer)
        CLIPImageProcessorPil().save_pretrained(out_dir)  # CLIP's 224 px and mean/std
    else:
        config = tiny_clip_config(tokenizer, "gelu" if kind in ("pickscore", "hpsv2") else "quick_gelu")
        CLIPImageProcessorPil(
            size={"shortest_edge": TINY_IMAGE},
            crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE},
            image_mean=list(TINY_MEAN),
            image_std=list(TINY_STD),
        ).save_pretrained(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "hpsv2":
            config.save_pretrained(out_dir)
            torch.save({"state_dict": _random_openclip(config)}, out_dir / HPSv2Spec().checkpoint_file)
        else:
            model = CLIPModel(config)
            (model.half() if full else model).save_pretrained(out_dir)
        if kind == "aesthetic":
            torch.save(AestheticHead(config.projection_dim).state_dict(), out_dir / AestheticSpec().head_file)
    return out_dir
