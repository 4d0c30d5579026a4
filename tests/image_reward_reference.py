"""The `image-reward` 1.5 package's own model code, importable on transformers 5, for the parity tests.

Install it without its dependencies: `pip install --no-deps image-reward==1.5`. The package's `__init__`
imports everything it ships (CLIP, BLIP and aesthetic scores, ReFL), which needs `clip`, torchvision,
timm and fairscale, none of which import here. `load()` therefore executes only the model files
(ImageReward.py and models/BLIP/{blip,blip_pretrain,med,vit}.py) of the installed package, unchanged,
under a private package name whose `__init__` files never run. It replaces exactly these names:

transformers, used by med.py (BLIP's BERT, written for transformers 4.15):
- `apply_chunking_to_forward`, `prune_linear_layer` moved from transformers.modeling_utils to
  transformers.pytorch_utils: the same functions are put back there while med.py is imported.
- `find_pruneable_heads_and_indices` is gone: only head pruning calls it, so a stub that raises.
- `PreTrainedModel.init_weights` of transformers 5 needs attributes that `post_init` sets, which med.py
  never calls: med's BertPreTrainedModel gets transformers 4's `self.apply(self._init_weights)`.
- `get_head_mask`, `invert_attention_mask` are gone from PreTrainedModel: transformers 4's code
  (`get_head_mask` only for no head mask, the only case ImageReward uses).
timm 0.6.13 and fairscale, used by vit.py and blip.py (timm imports torchvision):
- `PatchEmbed` (its Conv2d and flatten, copied), `DropPath` (copied; identity in eval),
  `trunc_normal_` (torch.nn.init.trunc_normal_, the algorithm timm's is a copy of);
- `_cfg`, `register_model`, `named_apply`, `adapt_input_conv`, `download_cached_file`,
  `checkpoint_wrapper`: used only to load .npz/URL checkpoints or for gradient checkpointing, so stubs
  that raise.
torchvision.transforms, used by ImageReward.py to build its PIL transform in `__init__`: inert stand-ins.
The tests feed tensors to the package's `score_gard`; preprocessing is checked against PIL separately.
blip.init_tokenizer downloads bert-base-uncased and reads `additional_special_tokens_ids` (gone in
transformers 5): `build()` passes a local tokenizer folder and adds the same two tokens.
Construction on the meta device keeps `torch.linspace` on the CPU: vit.py reads drop-path rates with
`.item()`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import transformers.modeling_utils
import transformers.pytorch_utils
from torch import nn
from transformers import BertTokenizer

PACKAGE = "_image_reward_reference"
INSTALL = "pip install --no-deps image-reward==1.5"


def _unused(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{name} is not available in the image-reward reference shim")

    return stub


class PatchEmbed(nn.Module):
    """timm 0.6.13's PatchEmbed without a norm layer, as vit.py uses it."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.img_size, f"input size {tuple(x.shape[2:])} != {self.img_size}"
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class DropPath(nn.Module):
    """timm's stochastic depth: drops whole samples' residual branches in training."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


class _InertTransform:
    def __init__(self, *args, **kwargs):
        pass

    __call__ = _unused("the package's PIL transform")


def _stub_modules() -> dict[str, types.ModuleType]:
    transforms = {n: _InertTransform for n in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize")}
    return {
        "timm": _module("timm"),
        "timm.models": _module("timm.models"),
        "timm.models.vision_transformer": _module(
            "timm.models.vision_transformer", _cfg=_unused("_cfg"), PatchEmbed=PatchEmbed
        ),
        "timm.models.registry": _module("timm.models.registry", register_model=_unused("register_model")),
        "timm.models.layers": _module("timm.models.layers", trunc_normal_=nn.init.trunc_normal_, DropPath=DropPath),
        "timm.models.helpers": _module(
            "timm.models.helpers", named_apply=_unused("named_apply"), adapt_input_conv=_unused("adapt_input_conv")
        ),
        "timm.models.hub": _module("timm.models.hub", download_cached_file=_unused("download_cached_file")),
        "fairscale": _module("fairscale"),
        "fairscale.nn": _module("fairscale.nn"),
        "fairscale.nn.checkpoint": _module("fairscale.nn.checkpoint"),
        "fairscale.nn.checkpoint.checkpoint_activations": _module(
            "fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=_unused("checkpoint_wrapper")
        ),
        "torchvision": _module("torchvision"),
        "torchvision.transforms": _module("torchvision.transforms", **transforms),
    }


def _init_weights(self):
    self.apply(self._init_weights)


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported by the image-reward reference shim")
    return [None] * num_hidden_layers


def _invert_attention_mask(self, encoder_attention_mask):
    if encoder_attention_mask.dim() == 3:
        encoder_extended_attention_mask = encoder_attention_mask[:, None, :, :]
    if encoder_attention_mask.dim() == 2:
        encoder_extended_attention_mask = encoder_attention_mask[:, None, None, :]
    encoder_extended_attention_mask = encoder_extended_attention_mask.to(dtype=self.dtype)  # fp16 compatibility
    return (1.0 - encoder_extended_attention_mask) * torch.finfo(self.dtype).min


def _restore_modules(stubs: dict[str, types.ModuleType], saved: dict[str, types.ModuleType]) -> None:
    for name in stubs:
        del sys.modules[name]
    sys.modules.update(saved)


@functools.cache
def load() -> types.SimpleNamespace:
    """The package's modules: `.ImageReward` (ImageReward.py), `.blip_pretrain`, `.blip`, `.med`, `.vit`."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the parity tests need the original package: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("", ".models", ".models.BLIP"):  # package objects whose __init__.py is never executed
        folder = root.joinpath(*sub.split(".")[1:])
        sys.modules[PACKAGE + sub] = _module(PACKAGE + sub, __path__=[str(folder)], __package__=PACKAGE + sub)
    stubs = _stub_modules()
    saved = {n: sys.modules[n] for n in stubs if n in sys.modules}
    with ExitStack() as stack:
        # the stand-ins replace any real timm/fairscale/torchvision only while the package's files import
        # (and only those names: modules imported meanwhile stay imported)
        sys.modules.update(stubs)
        stack.callback(_restore_modules, stubs, saved)
        for name in ("apply_chunking_to_forward", "prune_linear_layer"):
            value = getattr(transformers.pytorch_utils, name)
            stack.enter_context(mock.patch.object(transformers.modeling_utils, name, value, create=True))
        stack.enter_context(
            mock.patch.object(
                transformers.modeling_utils,
                "find_pruneable_heads_and_indices",
                _unused("find_pruneable_heads_and_indices"),
                create=True,
            )
        )
        ns = types.SimpleNamespace(
            ImageReward=importlib.import_module(f"{PACKAGE}.ImageReward"),
            blip_pretrain=importlib.import_module(f"{PACKAGE}.models.BLIP.blip_pretrain"),
            blip=importlib.import_module(f"{PACKAGE}.models.BLIP.blip"),
            med=importlib.import_module(f"{PACKAGE}.models.BLIP.med"),
            vit=importlib.import_module(f"{PACKAGE}.models.BLIP.vit"),
        )
    bert = ns.med.BertPreTrainedModel
    bert.init_weights = _init_weights
    bert.get_head_mask = _get_head_mask
    bert.invert_attention_mask = _invert_attention_mask
    return ns


def _init_tokenizer(folder: str):
    """blip.init_tokenizer with a local folder for bert-base-uncased."""
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def build(med_config: Path, tokenizer: str | Path, vision: dict[str, int] | None = None, device=None):
    """The package's `ImageReward(med_config)`, in eval mode. With `vision` (BlipVisionConfig sizes), its
    hard-wired ViT-L/16 at 224 px and MLP(768) become BLIP's VisionTransformer of those sizes and the
    package's MLP on the text encoder's width; otherwise the published architecture is built.
    `device="meta"` builds it without memory."""
    ref = load()
    with ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(ref.blip_pretrain, "init_tokenizer", lambda: _init_tokenizer(str(tokenizer)))
        )
        if vision is not None:
            width = vision["hidden_size"]

            def create_vit(vit, image_size, *args):
                encoder = ref.vit.VisionTransformer(
                    img_size=vision["image_size"],
                    patch_size=vision["patch_size"],
                    embed_dim=width,
                    depth=vision["num_hidden_layers"],
                    num_heads=vision["num_attention_heads"],
                    mlp_ratio=vision["intermediate_size"] / width,
                )
                return encoder, width

            mlp = ref.ImageReward.MLP
            text_width = ref.med.BertConfig.from_json_file(str(med_config)).hidden_size
            stack.enter_context(mock.patch.object(ref.blip_pretrain, "create_vit", create_vit))
            stack.enter_context(mock.patch.object(ref.ImageReward, "MLP", lambda input_size: mlp(text_width)))
        if device is not None:
            stack.enter_context(torch.device(device))
            stack.enter_context(mock.patch.object(torch, "linspace", functools.partial(torch.linspace, device="cpu")))
        model = ref.ImageReward.ImageReward(med_config=str(med_config))
    return model.eval()
