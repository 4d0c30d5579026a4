"""The GPU online presets (configs/sd-turbo.yaml, sdxl-turbo.yaml, sdxl-dmd2.yaml, and the flow-matching
ones on configs/online-flow.yaml): the reference settings, and each UNet preset building its model on a
random-initialised, full-size architecture of its family through the same loading code as a real run (only
the hub ids swapped for local folders)."""

import gc
from pathlib import Path

import pytest
import torch

from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.families import get_family
from pso.hub import planned_downloads
from pso.prompts import load_prompts
from pso.random_arch import ARCHS, build_random_pipeline
from pso.sampling import sample_groups

CONFIGS = Path(__file__).parents[1] / "configs"
PRESETS = {"sd-turbo.yaml": "sd2", "sdxl-turbo.yaml": "sdxl", "sdxl-dmd2.yaml": "sdxl"}
FLOW_PRESETS = {  # preset -> its family (online-flow.yaml's settings)
    "flux-schnell.yaml": "flux-schnell",
    "flux2-klein.yaml": "flux2-klein",
    "z-image-turbo.yaml": "z-image-turbo",
    "sd35-turbo.yaml": "sd35-turbo",
    "qwen-image-lightning.yaml": "qwen-image-lightning",
    "sana-sprint.yaml": "sana-sprint",
}
ATTENTION = {"to_q", "to_k", "to_v", "to_out.0"}


def preset(name: str) -> PSOConfig:
    return load_config(PSOConfig, CONFIGS / name, env={})


@pytest.mark.parametrize("name", PRESETS)
def test_presets_carry_the_reference_settings(name):
    cfg = preset(name)
    assert cfg.finetune.mode == "lora" and 16 <= cfg.finetune.rank <= 32
    assert set(cfg.finetune.target_modules) == ATTENTION
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.clip_eps) == ("online-pso", 50.0, 0.1)
    assert (cfg.optim.lr, cfg.optim.max_grad_norm) == (1e-5, 1.0)
    trained_on = {m.kind for m in cfg.reward_server.models if m.weight > 0}
    assert trained_on and trained_on <= {"pickscore", "image-reward"}
    assert (cfg.model.device, cfg.model.dtype, cfg.learner.precision) == ("cuda", "bfloat16", "fp32")
    assert get_family(cfg.model.family).name == cfg.model.family
    assert len(load_prompts(cfg.actor.prompts, [])) >= 100
    repos = {d.repo for d in planned_downloads(cfg)}
    assert cfg.model.pretrained in repos and "yuvalkirstain/PickScore_v1" in repos


@pytest.mark.parametrize("name", FLOW_PRESETS)
def test_flow_presets_carry_the_reference_settings_for_large_transformers(name):
    cfg = preset(name)
    recipe = get_family(cfg.model.family)
    assert cfg.model.family == FLOW_PRESETS[name] and cfg.model.num_steps in recipe.steps
    # the denoiser's own targets (both attention streams), float32 adapters on bfloat16 weights, checkpointing
    assert cfg.finetune.mode == "lora" and cfg.finetune.target_modules is None and cfg.finetune.gradient_checkpointing
    assert (cfg.model.device, cfg.model.dtype, cfg.learner.precision) == ("cuda", "bfloat16", "fp32")
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.clip_eps) == ("online-pso", 50.0, 0.1)
    # online PSO needs stochastic transitions: flow_euler at eta > 0; the scm sampler is stochastic at any eta
    assert cfg.model.eta > 0 if recipe.sampler == "flow_euler" else recipe.sampler == "scm"
    assert cfg.optim.pairs_per_step * cfg.learner.gradient_accumulation_steps == 16
    trained_on = {m.kind for m in cfg.reward_server.models if m.weight > 0}
    assert trained_on == {"pickscore"}
    repos = {d.repo for d in planned_downloads(cfg)}
    assert {cfg.model.pretrained, "yuvalkirstain/PickScore_v1"} <= repos
    assert cfg.model.distill_lora is None or cfg.model.distill_lora in repos


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Full-size random pipelines, built once per architecture and weight-file variant."""
    root, built = tmp_path_factory.mktemp("random-arch"), {}

    def get(arch: str, variant: str | None) -> Path:
        key = (arch, variant)
        if key not in built:
            built[key] = build_random_pipeline(root / f"{arch}-{variant}", arch, variant=variant, text_layers=2)
        return built[key]

    return get


def write_random_distill_lora(folder: Path, pipeline_dir: Path, weight_name: str) -> Path:
    """A distillation LoRA in diffusers' format for the pipeline's UNet (DMD2's published one is r64)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pipeline_dir / "unet"))
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=sorted(ATTENTION)))
    gen = torch.Generator().manual_seed(0)
    lora = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float16) * 1e-3
        for k, v in get_peft_model_state_dict(unet).items()
    }
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=lora, weight_name=weight_name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_its_model_on_a_full_size_random_architecture(name, random_models, tmp_path):
    from pso.policy import DistilledPolicy

    cfg = preset(name)
    arch = PRESETS[name]
    folder = random_models(arch, cfg.model.variant)
    swap = {"pretrained": str(folder), "device": "cpu", "resolution": 64}  # 8x8 latents: a CPU-sized forward
    if cfg.model.distill_lora:
        lora_dir = write_random_distill_lora(tmp_path / "lora", folder, cfg.model.distill_lora_weight_name)
        swap["distill_lora"] = str(lora_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = DistilledPolicy.from_config(cfg.model.model_copy(update=swap), cfg.finetune)
        unet = policy.backbone
        base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
        assert base == ARCHS[arch].unet_params
        assert unet.dtype == getattr(torch, cfg.model.dtype)
        targets = [m for n, m in unet.named_modules() if _is_target(n)]
        expected = sum(cfg.finetune.rank * (m.in_features + m.out_features) for m in targets)
        assert sum(p.numel() for p in policy.trainable_parameters()) == expected > 0
        recipe = get_family(cfg.model.family)
        traj = sample_groups(policy, ["a red fox in the snow"], 2, seed=0, decode=False)
        assert traj.timesteps.tolist() == [999, 749, 499, 249] and recipe.name == cfg.model.family
        assert torch.isfinite(traj.states.float()).all()
    finally:
        torch.set_num_threads(threads)
        gc.collect()


def _is_target(module_name: str) -> bool:
    """A LoRA-wrapped attention projection (its own name, not its lora_A/lora_B children)."""
    return any(module_name.endswith("." + t) for t in ATTENTION) and "lora_" not in module_name
