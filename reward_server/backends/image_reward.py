"""ImageReward (THUDM, v1.0): BLIP ViT-L/16 image encoder, a BERT-base text encoder that cross-attends to
the image, and an MLP on the text's [CLS] state, standardised with the published mean and std.

The `image-reward` package does not import on transformers 5, so this is a port onto transformers' BLIP
classes with a converter from the official `ImageReward.pt` key layout; tests/test_image_reward.py proves
that it scores exactly as the package's own model code does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import is_offline_mode
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from pso.config.reward_server import ImageRewardSpec

from .base import (
    ModelInfo,
    RewardBackend,
    load_state_dict,
    resolve_file,
    tensor_digest,
)
from .clip_preprocess import ImageTransform

CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
VISION_CONFIG_FILE = "vision_config.json"

# The text encoder's config as published with the checkpoint (med_config.json of BLIP and THUDM/ImageReward).
PUBLISHED_MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
# The image encoder the package builds for the checkpoint (BLIP's create_vit("large", 224)); it has no config file.
PUBLISHED_VISION_CONFIG: dict[str, int] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
}

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35  # the package pads and truncates every prompt to 35 tokens
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the MLP's layers; its ReLUs are commented out in the package

# Official key prefix -> this model's; "{i}" stands for a layer number.
_RENAMES = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "vision.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.layers.0.", "head.0."),  # the Dropouts between the Linears hold the odd indices
    ("mlp.layers.2.", "head.1."),
    ("mlp.layers.4.", "head.2."),
    ("mlp.layers.6.", "head.3."),
    ("mlp.layers.7.", "head.4."),
)
# Official keys that scoring does not use: BLIP's contrastive projections (ImageReward reads the text
# encoder's [CLS] state instead) and the text position ids, which transformers keeps as a non-saved buffer.
IGNORED_KEYS = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
)


def _prefix_rules(pairs) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(re.escape(src).replace(r"\{i\}", r"(\d+)")), dst.replace("{i}", r"\1")) for src, dst in pairs]


_TO_MODEL = _prefix_rules(_RENAMES)
_TO_OFFICIAL = _prefix_rules((dst, src) for src, dst in _RENAMES)


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return m.expand(repl) + key[m.end() :]
    raise KeyError(key)


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ImageReward.pt state dict -> `ImageRewardModel` state dict (drops only `IGNORED_KEYS`)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in IGNORED_KEYS:
            continue
        try:
            out[_rename(key, _TO_MODEL)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint: {len(unknown)} unknown keys, e.g. {unknown[:3]}")
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ImageRewardModel` state dict -> the official ImageReward.pt key layout."""
    return {_rename(key, _TO_OFFICIAL): value for key, value in state.items()}


def vision_config(fields: dict[str, int]) -> BlipVisionConfig:
    """BLIP's ViT as transformers' BlipVisionConfig; activation and norm epsilon are fixed in the package."""
    unknown = set(fields) - set(PUBLISHED_VISION_CONFIG)
    if unknown:
        raise ValueError(f"unknown vision config fields {sorted(unknown)}; known: {sorted(PUBLISHED_VISION_CONFIG)}")
    return BlipVisionConfig(**{**PUBLISHED_VISION_CONFIG, **fields}, hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med: dict[str, Any], encoder_width: int) -> BlipTextConfig:
    """A med_config.json (BLIP's BERT) as BlipTextConfig; as in the package, the cross-attention width is the
    image encoder's width whatever `encoder_width` the file says."""
    if not med.get("add_cross_attention"):
        raise ValueError("ImageReward's text encoder needs add_cross_attention: true in its med config")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "layer_norm_eps",
        "pad_token_id",
        "initializer_range",
    )
    # is_decoder makes transformers build the cross-attention layers; forward still attends bidirectionally.
    # The generation token ids are unused by an encoder (and BLIP's defaults lie outside a tiny vocabulary).
    return BlipTextConfig(
        **{k: med[k] for k in keys},
        encoder_hidden_size=encoder_width,
        is_decoder=True,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )


class ImageRewardModel(nn.Module):
    """Images (B, 3, S, S) normalised with CLIP's mean/std and tokenised prompts -> (B,) standardised rewards."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size, *HEAD_WIDTHS)
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        # every image token is attended to, as the package's all-ones encoder_attention_mask says
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image)
        head_dtype = self.head[0].weight.dtype
        reward = self.head(text.last_hidden_state[:, 0].to(head_dtype)).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def build_model(vision: dict[str, int], med: dict[str, Any]) -> ImageRewardModel:
    vcfg = vision_config(vision)
    return ImageRewardModel(vcfg, text_config(med, vcfg.hidden_size))


def full_size_model() -> ImageRewardModel:
    """The published architecture (ViT-L/16 at 224 px + BERT-base) on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return build_model(PUBLISHED_VISION_CONFIG, PUBLISHED_MED_CONFIG)


def load_model(path: Path, vision: dict[str, int], med: dict[str, Any]) -> ImageRewardModel:
    """Builds the model without initialising it and takes every parameter from the checkpoint at `path`."""
    with torch.device("meta"):
        model = build_model(vision, med)
    model.load_state_dict(convert_checkpoint(load_state_dict(path)), strict=True, assign=True)
    # the one non-saved buffer; it is still on the meta device
    emb = model.text.embeddings
    emb.position_ids = torch.arange(emb.position_ids.shape[-1]).expand(1, -1)
    return model.eval()


def load_tokenizer(source: str) -> BertTokenizer:
    """BERT's tokenizer with the two tokens BLIP adds (so the ids match the 30524-row embedding)."""
    tokenizer = BertTokenizer.from_pretrained(source, local_files_only=is_offline_mode())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _config(explicit: str | None, beside: Path, default: dict[str, Any]) -> dict[str, Any]:
    path = Path(explicit).expanduser() if explicit else beside
    if explicit and not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    return json.loads(path.read_text()) if path.is_file() else dict(default)


class ImageRewardBackend(RewardBackend):
    kind = "image-reward"

    def __init__(self, spec: ImageRewardSpec, device: torch.device):
        super().__init__(spec, device)
        path = resolve_file(spec.checkpoint, CHECKPOINT_FILE)
        vision = _config(spec.vision_config, path.parent / VISION_CONFIG_FILE, PUBLISHED_VISION_CONFIG)
        med = _config(spec.med_config, path.parent / MED_CONFIG_FILE, PUBLISHED_MED_CONFIG)
        model = load_model(path, vision, med)
        self._version = f"{spec.checkpoint}@{tensor_digest(model)}"
        self.image_size = model.vision.config.image_size
        # the package's torchvision transform: Resize(image_size, bicubic), CenterCrop, ToTensor, Normalize
        self.transform = ImageTransform(self.image_size, (self.image_size,) * 2, round_crop=True)
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.model.head.float()  # the package casts the [CLS] state to float32 before the MLP
        self.tokenizer = load_tokenizer(spec.tokenizer)
        if len(self.tokenizer) > med["vocab_size"]:
            raise ValueError(
                f"tokenizer {spec.tokenizer} has {len(self.tokenizer)} tokens, the model reads only {med['vocab_size']}"
            )

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.model_name,
            kind=self.kind,
            version=self._version,
            scale="ImageReward: standardised, about -2..2 (higher is better)",
            weight=self.spec.weight,
        )

    def check_size(self, width: int, height: int) -> None:
        self.transform.check_size(width, height)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform.crop(image)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask as the package makes them: padded and truncated to 35 tokens."""
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts)
        scores = self.model(
            self.transform.normalize(pixels.to(self.device)).to(self.dtype),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
        return scores.float().cpu()


# A WordPiece vocabulary for tiny test models: BERT's special tokens, single characters (so that any
# lower-case ASCII text tokenises) and some common prompt words.
_TINY_WORDS = (
    "the of and in on with at to from by for under over near behind a an is are photo painting drawing "
    "picture image portrait landscape close up view cat dog bird horse cow fish man woman child people "
    "car bus boat house tree flower mountain river sea sky sun moon city street forest field beach snow "
    "red green blue yellow black white orange purple pink brown gray big small tall old young happy "
    "beautiful dark bright sitting standing running flying walking eating playing sleeping table chair "
    "window door room garden park road bridge night day morning evening cloud rain light shadow water "
    "stone wood glass metal style detailed realistic cartoon oil digital art high quality"
).split()


def tiny_vocab() -> list[str]:
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["##" + c for c in chars if c.isalnum()]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *pieces, *dict.fromkeys(_TINY_WORDS)]


TINY_VISION_CONFIG = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "image_size": 32,
    "patch_size": 16,
}
TINY_MED_CONFIG = {
    **PUBLISHED_MED_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "encoder_width": 48,
}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Gives every parameter random values that keep activations near unit scale (so tiny random models
    score images and prompts apart): matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    for _, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1:
            p.copy_(noise * 0.1 + (1.0 if id(p) in norm_scales else 0.0))
        else:
            fan_in = p[0].numel() if p.ndim == 4 else p.shape[-1]
            p.copy_(noise * fan_in**-0.5)
    return module


def build_random(out_dir: str | Path, *, seed: int = 0, full: bool = False) -> Path:
    """A folder that `ImageRewardSpec(checkpoint=folder, tokenizer=folder)` loads offline: a random model as
    ImageReward.pt (official key layout; tiny, or with `full` the published size in float16, for benchmarks)
    with its med_config.json and vision_config.json, and a tiny BERT tokenizer."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    vision = PUBLISHED_VISION_CONFIG if full else TINY_VISION_CONFIG
    med = PUBLISHED_MED_CONFIG if full else {**TINY_MED_CONFIG, "vocab_size": len(vocab) + 2}  # + [DEC], [ENC]
    (folder / MED_CONFIG_FILE).write_text(json.dumps(med, indent=2))
    (folder / VISION_CONFIG_FILE).write_text(json.dumps(vision, indent=2))
    model = randomize_(build_model(vision, med), seed)
    torch.save(to_official((model.half() if full else model).state_dict()), folder / CHECKPOINT_FILE)
    return folder
