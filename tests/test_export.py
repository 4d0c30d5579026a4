"""Exported weights load in diffusers as they are, and behave as the project's own policy does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pso.codecs import encode_weights
from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.export import KOHYA_FILE, export_bundle
from pso.loading import load_pipeline
from pso.policy import DistilledPolicy

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def trained_policy(cfg: PSOConfig) -> DistilledPolicy:
    """The tiny policy with non-zero LoRA B factors (fresh adapters change nothing: B starts at zero)."""
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return policy


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2, 6, cfg.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 499]), encoder_hidden_states=text).sample


CONVS = "finetune.target_modules=[to_q, to_k, to_v, to_out.0, conv1, conv2]"  # the tiny tasks' adapters


# alpha == rank, and alpha != rank (adapter metadata); adapters on the ResNet convolutions too
@pytest.mark.parametrize("overrides", [[], ["finetune.alpha=16"], [CONVS]])
def test_a_diffusers_export_loads_with_load_lora_weights_and_matches_the_policy(tmp_path, overrides):
    cfg = load_config(PSOConfig, TINY, overrides=overrides)
    policy = trained_policy(cfg)
    bundle = policy.export_weights(7)
    path = export_bundle(bundle, cfg, tmp_path / "export")
    assert path == tmp_path / "export" / "pytorch_lora_weights.safetensors"
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "| weight version | 7 |" in card and "large" in card

    pipe = load_pipeline(cfg.model)[0].pipe  # a plain diffusers pipeline of the base model
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path / "export")
    tuned = unet_output(pipe.unet)
    want = unet_output(policy.backbone)
    assert not torch.allclose(tuned, base, atol=1e-4)  # the LoRA is applied ...
    torch.testing.assert_close(tuned, want, atol=1e-5, rtol=1e-4)  # ... at the policy's scale


def test_a_kohya_export_holds_every_adapter_with_its_alpha(tmp_path):
    cfg = load_config(PSOConfig, TINY, overrides=["finetune.alpha=4"])
    policy = trained_policy(cfg)
    path = export_bundle(policy.export_weights(3), cfg, tmp_path / "export", fmt="kohya")
    assert path.name == KOHYA_FILE
    tensors = load_file(path)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    n_adapters = sum("lora_A" in n for n, _ in policy.backbone.named_parameters())
    assert len(downs) == n_adapters and all(k.startswith("lora_unet_") for k in tensors)
    assert {float(tensors[k]) for k in tensors if k.endswith(".alpha")} == {4.0}
    assert len([k for k in tensors if k.endswith(".lora_up.weight")]) == n_adapters


def test_a_bundle_that_does_not_fit_the_model_is_refused(tmp_path):
    cfg = load_config(PSOConfig, TINY)
    other = load_config(PSOConfig, TINY, overrides=["finetune.rank=4"])
    bundle = DistilledPolicy.from_config(other.model, other.finetune).export_weights(1)
    with pytest.raises(ValueError):
        export_bundle(bundle, cfg, tmp_path / "export")
    assert encode_weights(bundle)  # a real bundle, refused for its shapes


def test_pso_export_writes_a_lora_diffusers_loads_from_a_bundle_alone(tmp_path, capsys):
    from pso.cli import main

    cfg = load_config(PSOConfig, TINY)
    policy = trained_policy(cfg)
    bundle_path = tmp_path / "weights.psow"
    bundle_path.write_bytes(encode_weights(policy.export_weights(5)))
    assert main(["export", str(bundle_path), "--out", str(tmp_path / "lora")]) == 0  # no config: the bundle's
    assert "exported weights version 5 (diffusers)" in capsys.readouterr().out
    pipe = load_pipeline(cfg.model)[0].pipe
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(policy.backbone), atol=1e-5, rtol=1e-4)
    assert main(["export", str(tmp_path / "missing.psow"), "--out", str(tmp_path / "x")]) == 1


def test_locate_weights_finds_the_newest_checkpoint_of_a_checkpoint_or_run_folder(tmp_path):
    from pso.export import CHECKPOINT_WEIGHTS, locate_weights

    run = tmp_path / "up"  # a `pso up` run folder: the learner's run folder inside, its checkpoints inside that
    checkpoints = run / "learner" / "checkpoints"
    for tag in ("global_step4", "global_step8"):
        (checkpoints / tag).mkdir(parents=True)
        (checkpoints / tag / CHECKPOINT_WEIGHTS).write_bytes(tag.encode())
    (checkpoints / "latest").write_text("global_step4")  # global_step8 was being written: not named yet
    want = checkpoints / "global_step4" / CHECKPOINT_WEIGHTS
    for source in (run, run / "learner", checkpoints, checkpoints / "global_step4", want):
        assert locate_weights(source) == want, source
    (checkpoints / "latest").write_text("global_step8")
    assert locate_weights(run).read_bytes() == b"global_step8"
    (checkpoints / "global_step8" / CHECKPOINT_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights.psow"):
        locate_weights(run)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        locate_weights(tmp_path / "up" / "learner" / "checkpoints" / "global_step8")
    with pytest.raises(FileNotFoundError, match="no such"):
        locate_weights(tmp_path / "nowhere")
    for tag in ("../../elsewhere", "/etc", ".."):  # `latest` names a folder beside it, nothing else
        (checkpoints / "latest").write_text(tag)
        with pytest.raises(ValueError, match="not a checkpoint folder beside it"):
            locate_weights(run)


@pytest.mark.parametrize("form", ["diffusers", "kohya", "safetensors-file", "bundle"])
def test_an_export_or_bundle_loads_as_the_tuned_model_with_the_base_as_its_reference(tmp_path, form):
    from pso.tuned import load_tuned

    cfg = load_config(PSOConfig, TINY, overrides=["finetune.alpha=4"])
    policy = trained_policy(cfg)
    bundle = policy.export_weights(2)
    if form == "bundle":
        source = tmp_path / "w.psow"
        source.write_bytes(encode_weights(bundle))
    else:
        path = export_bundle(bundle, cfg, tmp_path / "export", fmt="kohya" if form == "kohya" else "diffusers")
        source = path if form == "safetensors-file" else path.parent
    tuned = load_tuned(cfg.model, source)
    x = torch.randn(2, *tuned.latent_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([999, 499]), tuned.encode(["a red circle", "a blue square"])
    want = policy.model_output(x, t, cond)
    torch.testing.assert_close(tuned.model_output(x, t, cond), want, atol=1e-5, rtol=1e-4)
    base = DistilledPolicy.from_config(cfg.model, None).model_output(x, t, cond)
    torch.testing.assert_close(tuned.model_output(x, t, cond, reference=True), base)
    assert not torch.allclose(want, base, atol=1e-4)


def test_a_full_model_folder_is_refused_as_weights_with_the_way_to_evaluate_it(tmp_path):
    from pso.tuned import load_tuned

    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="--model"):
        load_tuned(load_config(PSOConfig, TINY).model, tmp_path)


def test_pso_eval_scores_an_exported_lora_folder_as_it_scores_the_bundle(tmp_path):
    import json

    from pso.cli import main

    cfg = load_config(PSOConfig, TINY)
    bundle = trained_policy(cfg).export_weights(3)
    (tmp_path / "w.psow").write_bytes(encode_weights(bundle))
    export_bundle(bundle, cfg, tmp_path / "lora")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    results = {}
    for name in ("w.psow", "lora"):
        out = tmp_path / f"eval-{name}"
        argv = ["eval", "-c", str(TINY), "--weights", str(tmp_path / name), "--prompts", str(prompts)]
        assert main([*argv, "--out", str(out)]) == 0
        results[name] = json.loads((out / "eval.json").read_text())["rewards"]
    for reward, scores in results["w.psow"].items():
        for key, value in scores.items():
            assert results["lora"][reward][key] == pytest.approx(value, abs=1e-4), (reward, key)
    assert any(s["mean"] != s["base_mean"] for s in results["lora"].values())  # the LoRA changes the images


def test_a_full_fine_tuning_export_is_the_pipeline_folder_with_the_trained_unet(tmp_path):
    from diffusers import DiffusionPipeline

    from pso.config.schema import FullFinetune

    cfg = load_config(PSOConfig, TINY)
    cfg.finetune = FullFinetune()
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    with torch.no_grad():
        policy.backbone.conv_out.bias.add_(0.5)  # a trained UNet differs from the base
    path = export_bundle(policy.export_weights(9), cfg, tmp_path / "export")
    assert path == tmp_path / "export" and (path / "model_index.json").is_file()
    assert "| weight version | 9 |" in (path / "README.md").read_text()
    loaded = DiffusionPipeline.from_pretrained(path).unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in policy.backbone.state_dict().items())
    base = load_pipeline(cfg.model)[0].pipe
    assert not torch.equal(base.unet.conv_out.bias, loaded["conv_out.bias"])
