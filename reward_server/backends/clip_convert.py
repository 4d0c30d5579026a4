"""open_clip <-> transformers CLIPModel: the open_clip key layout and a converter onto CLIPModel's keys.

open_clip keeps a fused `attn.in_proj_weight` (q, k and v stacked along dim 0), stores the vision
and text projections as (width, embed) matrices used as `x @ proj`, and names the text tower's
modules at the top level. transformers splits q/k/v, uses `nn.Linear` (embed, width) projections
and nests the towers under `vision_model` / `text_model`. The converter is strict: a key it does
not know is an error, so a checkpoint of another architecture cannot load half-way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import CLIPConfig

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


def openclip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT towers) with the keys and layouts of transformers' CLIPModel."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _RESBLOCK.fullmatch(key):
            visual, layer, rest = match.groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}"
            module, _, kind = rest.rpartition(".")
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part
            elif module in _BLOCK and kind in ("weight", "bias"):
                out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP checkpoint; unexpected keys: {sorted(unknown)[:10]}")
    return out


def openclip_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of open_clip's state dict for the ViT CLIP that `config` describes."""
    vision, text, embed = config.vision_config, config.text_config, config.projection_dim
    grid = vision.image_size // vision.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (vision.hidden_size, vision.num_channels, vision.patch_size, vision.patch_size),
        "visual.class_embedding": (vision.hidden_size,),
        "visual.positional_embedding": (grid * grid + 1, vision.hidden_size),
        "visual.ln_pre.weight": (vision.hidden_size,),
        "visual.ln_pre.bias": (vision.hidden_size,),
        "visual.ln_post.weight": (vision.hidden_size,),
        "visual.ln_post.bias": (vision.hidden_size,),
        "visual.proj": (vision.hidden_size, embed),
        "token_embedding.weight": (text.vocab_size, text.hidden_size),
        "positional_embedding": (text.max_position_embeddings, text.hidden_size),
        "ln_final.weight": (text.hidden_size,),
        "ln_final.bias": (text.hidden_size,),
        "text_projection": (text.hidden_size, embed),
        "logit_scale": (),
    }
    for prefix, tower in (("visual.", vision), ("", text)):
        width, mlp = tower.hidden_size, tower.intermediate_size
        for i in range(tower.num_hidden_layers):
            block = f"{prefix}transformer.resblocks.{i}."
            shapes |= {
                block + "ln_1.weight": (width,),
                block + "ln_1.bias": (width,),
                block + "attn.in_proj_weight": (3 * width, width),
                block + "attn.in_proj_bias": (3 * width,),
                block + "attn.out_proj.weight": (width, width),
                block + "attn.out_proj.bias": (width,),
                block + "ln_2.weight": (width,),
                block + "ln_2.bias": (width,),
                block + "mlp.c_fc.weight": (mlp, width),
                block + "mlp.c_fc.bias": (mlp,),
                block + "mlp.c_proj.weight": (width, mlp),
                block + "mlp.c_proj.bias": (width,),
            }
    return shapes
