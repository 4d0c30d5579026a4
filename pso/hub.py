"""Hugging Face hub sources: telling a repo id from a path, and `pso preload`, which fetches every
hub weight a config names into the cache once (HF_HOME), so services start without downloading."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pso.config.reward_server import (
    AestheticSpec,
    ClipScoreSpec,
    HPSv2Spec,
    ImageRewardSpec,
    PickScoreSpec,
    RewardModelSpec,
)
from pso.config.schema import ModelConfig, PSOConfig

CONFIG_FILES = ["*.json", "*.txt", "*.model"]  # configs, tokenizers, preprocessors
WEIGHTS = ["*.safetensors"]  # transformers and diffusers load these first


def is_hub_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _on_hub(source: str | None) -> bool:
    """A source that is not on this machine and names a hub repository: "owner/name", or a legacy
    name without an owner such as "bert-base-uncased"."""
    if not source or Path(source).expanduser().exists():
        return False
    return is_hub_repo_id(source) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", source) is not None


@dataclass(frozen=True)
class HubDownload:
    repo: str
    what: str  # who needs it, for the operator
    files: tuple[str, ...] = ()  # exact files; empty: the patterns below
    patterns: tuple[str, ...] = ()
    pipeline_variant: str | None = None  # a diffusers pipeline: diffusers chooses its files
    revision: str | None = None
    is_pipeline: bool = False


def planned_downloads(cfg: PSOConfig) -> list[HubDownload]:
    """What `pso preload` fetches: the hub sources among the model's and the reward models' (local
    paths and built-in models need nothing)."""
    plan = _model_downloads(cfg.model)
    for spec in cfg.reward_server.models:
        plan += _reward_downloads(spec)
    unique: dict[tuple, HubDownload] = {}
    for d in plan:
        unique.setdefault((d.repo, d.files, d.patterns, d.is_pipeline, d.pipeline_variant), d)
    return list(unique.values())


def _model_downloads(m: ModelConfig) -> list[HubDownload]:
    plan = []
    if _on_hub(m.pretrained):
        plan.append(
            HubDownload(m.pretrained, "model", pipeline_variant=m.variant, revision=m.revision, is_pipeline=True)
        )
    if m.unet and m.unet.endswith(".safetensors") and not Path(m.unet).is_file():
        repo, _, filename = m.unet.rpartition("/")
        if is_hub_repo_id(repo):
            plan.append(HubDownload(repo, "model.unet", files=(filename,)))
    elif _on_hub(m.unet):
        plan.append(HubDownload(m.unet, "model.unet", patterns=tuple(CONFIG_FILES + WEIGHTS)))
    if _on_hub(m.distill_lora):
        files = (m.distill_lora_weight_name,) if m.distill_lora_weight_name else ()
        plan.append(HubDownload(m.distill_lora, "model.distill_lora", files=files, patterns=tuple(WEIGHTS)))
    return plan


def _reward_downloads(spec: RewardModelSpec) -> list[HubDownload]:
    what = f"reward model {spec.model_name}"
    full, configs = tuple(CONFIG_FILES + WEIGHTS), tuple(CONFIG_FILES)
    sources: list[tuple[str | None, tuple[str, ...], tuple[str, ...]]] = []  # (source, files, patterns)
    if isinstance(spec, ImageRewardSpec):
        sources = [(spec.checkpoint, ("ImageReward.pt", "med_config.json"), ()), (spec.tokenizer, (), configs)]
    elif isinstance(spec, PickScoreSpec):
        sources = [(spec.model, (), full), (spec.processor, (), configs)]
    elif isinstance(spec, HPSv2Spec):
        sources = [(spec.checkpoint, (spec.checkpoint_file,), ()), (spec.processor, (), configs)]
    elif isinstance(spec, ClipScoreSpec):
        sources = [(spec.model, (), full), (spec.processor, (), configs)]
    elif isinstance(spec, AestheticSpec):
        sources = [(spec.model, (), full), (spec.processor, (), configs), (spec.head, (spec.head_file,), ())]
    return [
        HubDownload(source, what, files=files, patterns=patterns)
        for source, files, patterns in sources
        if _on_hub(source)
    ]


def download(d: HubDownload) -> Path:
    """Fetch one planned download into the hub cache (a no-op for what is cached already)."""
    if d.is_pipeline:
        from diffusers import DiffusionPipeline

        return Path(DiffusionPipeline.download(d.repo, variant=d.pipeline_variant, revision=d.revision))
    from huggingface_hub import hf_hub_download, snapshot_download

    if d.files:
        paths = [Path(hf_hub_download(d.repo, f, revision=d.revision)) for f in d.files]
        return paths[0].parent
    return Path(snapshot_download(d.repo, revision=d.revision, allow_patterns=list(d.patterns)))


def describe(d: HubDownload) -> str:
    if d.is_pipeline:
        return f"{d.repo} (diffusers pipeline{f', variant {d.pipeline_variant}' if d.pipeline_variant else ''})"
    return f"{d.repo}: {', '.join(d.files or d.patterns)}"
