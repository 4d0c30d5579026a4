"""Trained weights out of the project, in the formats other tools load.

    diffusers  `pytorch_lora_weights.safetensors`, written by the pipeline class's own `save_lora_weights`
               from peft's state dict converted with diffusers' utilities, as diffusers' LoRA training
               scripts do (adapter metadata when alpha differs from the rank): `pipe.load_lora_weights(DIR)`
    kohya      the same adapters under the key convention ComfyUI and A1111-style tools load
               (`lora_unet_..._lora_down.weight` + `.alpha`; transformers `lora_transformer_...`), converted with
               diffusers' utility
    full fine-tuning: the whole pipeline folder (`save_pretrained`), whatever the format

Beside the weights, a model card (`README.md` with the Hugging Face metadata block).

What `pso export` reads: a weight bundle (.psow), a learner checkpoint (each holds its weights as a bundle,
`weights.psow`, beside DeepSpeed's pickled files, which are never read here), or a run folder (its newest
checkpoint): `locate_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

from pso.codecs import WeightBundle
from pso.config.schema import PSOConfig
from pso.families import get_family
from pso.policy import DistilledPolicy

Format = Literal["diffusers", "kohya"]
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora_weights writes, load_lora_weights reads
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
CHECKPOINT_WEIGHTS = "weights.psow"  # in each learner checkpoint's folder


def export_bundle(
    bundle: WeightBundle, cfg: PSOConfig, out: Path, fmt: Format = "diffusers", evaluation: dict | None = None
) -> Path:
    """Write `bundle` (weights of `cfg.model`, trained as `cfg.finetune`) to the folder `out` in `fmt`,
    with a model card; returns the weights' path."""
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    policy.load_weights(bundle)  # checks the bundle fits this model and fine-tuning
    return export_policy(policy, bundle.version, cfg, out, fmt, evaluation, updates=bundle.metadata.get("updates"))


def export_policy(
    policy: DistilledPolicy,
    version: int,
    cfg: PSOConfig,
    out: Path,
    fmt: Format = "diffusers",
    evaluation: dict | None = None,
    tensors: dict[str, Tensor] | None = None,
    updates: int | None = None,
) -> Path:
    """`export_bundle` for a policy that holds the weights of `version` already (`pso up`'s evaluated one).
    With LoRA, `tensors` (the trainable state dict) stand in for the policy's own adapters: the learner's
    float32 master weights, complete under any ZeRO stage. `updates`: the learner updates in them, when known
    (a checkpoint may hold updates after its weight version was published)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.finetune.mode == "full":
        policy.pipe.save_pretrained(out)
        path = out
    else:
        state = get_peft_model_state_dict(policy.backbone, state_dict=tensors)  # peft's names, no adapter name
        rank, alpha = cfg.finetune.rank, cfg.finetune.alpha or cfg.finetune.rank
        if fmt == "diffusers":
            # diffusers reads alpha from this metadata; without it it assumes alpha == rank
            metadata = None
            if alpha != rank:
                metadata = {"r": rank, "lora_alpha": alpha, "target_modules": policy.lora_targets}
            policy.denoiser.save_lora(out, state, metadata)
            path = out / DIFFUSERS_FILE
        else:
            from diffusers.utils import convert_state_dict_to_kohya

            prefix = policy.denoiser.kohya_prefix
            kohya = convert_state_dict_to_kohya({f"{prefix}{k}": v for k, v in state.items()})
            for key in [k for k in kohya if k.endswith(".alpha")]:  # the utility writes alpha = rank
                kohya[key] = kohya[key].new_tensor(float(alpha), dtype=kohya[key].dtype)
            path = out / KOHYA_FILE
            save_file({k: v.contiguous() for k, v in kohya.items()}, path, metadata={"ss_network_dim": str(rank)})
    (out / "README.md").write_text(model_card(version, cfg, fmt, path.name, evaluation, updates))
    return path


def locate_weights(path: Path) -> Path:
    """The weight bundle `path` names: a .psow file; a learner checkpoint (a tag folder holding
    `weights.psow`, or the checkpoint folder whose `latest` names the newest); or a learner's or `pso up`'s
    run folder (its newest checkpoint)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such weight bundle or folder")
    if (path / CHECKPOINT_WEIGHTS).is_file():
        return path / CHECKPOINT_WEIGHTS
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or tag != Path(tag).name or tag in (".", ".."):
            raise ValueError(f"{latest} names {tag!r}, not a checkpoint folder beside it")
        if not (path / tag / CHECKPOINT_WEIGHTS).is_file():
            raise FileNotFoundError(f"checkpoint {path / tag} holds no {CHECKPOINT_WEIGHTS}")
        return path / tag / CHECKPOINT_WEIGHTS
    for folder in (path / "checkpoints", path / "learner" / "checkpoints"):  # learner.run_dir, pso up's run folder
        if (folder / "latest").is_file():
            return locate_weights(folder)
    raise FileNotFoundError(
        f"{path}: no weights found (a .psow bundle, a learner checkpoint folder with `latest`, or a run folder "
        "with checkpoints/ or learner/checkpoints/)"
    )


def model_card(
    version: int, cfg: PSOConfig, fmt: Format, file: str, evaluation: dict | None, updates: int | None = None
) -> str:
    """A Hugging Face model card: the metadata block, what the weights are, how to load them."""
    recipe = get_family(cfg.model.family)
    steps = cfg.model.num_steps or recipe.default_steps
    rewards = ", ".join(f"{m.kind}" + (f" ({m.reward})" if getattr(m, "reward", None) else "") + f" x {m.weight:g}"
                        for m in cfg.reward_server.models)  # fmt: skip
    lora = cfg.finetune.mode == "lora"
    tags = ["text-to-image", "diffusers", "few-step", "pso"] + (["lora"] if lora else [])
    meta = {"base_model": cfg.model.pretrained, "library_name": "diffusers", "tags": tags}
    rows = [
        ("base model", f"`{cfg.model.pretrained}`"),
        ("family", f"{cfg.model.family} ({recipe.description})"),
        ("steps", str(steps)),
        ("sampler", cfg.model.sampler or recipe.sampler),
        ("rewards", rewards),
        ("loss", f"{cfg.loss.name}, beta {getattr(cfg.loss, 'beta', 'n/a')}"),
        ("fine-tuning", f"LoRA rank {cfg.finetune.rank}, alpha {cfg.finetune.alpha or cfg.finetune.rank}"
         if lora else "full"),
        ("weight version", str(version)),
        *([("updates", str(updates))] if updates is not None else []),
    ]  # fmt: skip
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items()), "---", ""]
    lines += [f"# {'LoRA' if lora else 'Fine-tuned'} {cfg.model.pretrained}, tuned with PSO", ""]
    lines += ["Pairwise Sample Optimization of a few-step model toward a reward; it keeps its step count.", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if evaluation:
        lines += ["## Evaluation", "", "| reward | base | tuned | gain | win rate |", "|---|---:|---:|---:|---:|"]
        for name, m in evaluation.get("models", {}).items():
            lines.append(
                f"| {name} | {m['base']:.4f} | {m['tuned']:.4f} | {m['gain']:+.4f} +- {m['gain_stderr']:.4f} "
                f"| {m['win_rate']:.0%} |"
            )
        lines.append("")
    lines += ["## Use", "", "```python", "from diffusers import AutoPipelineForText2Image", ""]
    if lora and fmt == "diffusers":
        lines += [f'pipe = AutoPipelineForText2Image.from_pretrained("{cfg.model.pretrained}")',
                  'pipe.load_lora_weights("path/to/this/folder")']  # fmt: skip
    elif lora:
        lines += [f'pipe = AutoPipelineForText2Image.from_pretrained("{cfg.model.pretrained}")',
                  f'pipe.load_lora_weights("path/to/this/folder", weight_name="{file}")']  # fmt: skip
    else:
        lines += ['pipe = AutoPipelineForText2Image.from_pretrained("path/to/this/folder")']
    guidance = cfg.model.guidance_scale if cfg.model.guidance_scale is not None else recipe.guidance_scale
    lines += [f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance}).images[0]', "```", ""]
    return "\n".join(lines)
