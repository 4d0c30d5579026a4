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
        for name, param in policy.unet.named_parameters():
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


@pytest.mark.parametrize("alpha", [None, 16])  # alpha == rank, and alpha != rank (adapter metadata)
def test_a_diffusers_export_loads_with_load_lora_weights_and_matches_the_policy(tmp_path, alpha):
    cfg = load_config(PSOConfig, TINY, overrides=[f"finetune.alpha={alpha}"] if alpha else [])
    policy = trained_policy(cfg)
    bundle = policy.export_weights(7)
    path = export_bundle(bundle, cfg, tmp_path / "export")
    assert path == tmp_path / "export" / "pytorch_lora_weights.safetensors"
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "| updates (weight version) | 7 |" in card and "large" in card

    pipe, _ = load_pipeline(cfg.model)  # a plain diffusers pipeline of the base model
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path / "export")
    tuned = unet_output(pipe.unet)
    want = unet_output(policy.unet)
    assert not torch.allclose(tuned, base, atol=1e-4)  # the LoRA is applied ...
    torch.testing.assert_close(tuned, want, atol=1e-5, rtol=1e-4)  # ... at the policy's scale


def test_a_kohya_export_holds_every_adapter_with_its_alpha(tmp_path):
    cfg = load_config(PSOConfig, TINY, overrides=["finetune.alpha=4"])
    policy = trained_policy(cfg)
    path = export_bundle(policy.export_weights(3), cfg, tmp_path / "export", fmt="kohya")
    assert path.name == KOHYA_FILE
    tensors = load_file(path)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    n_adapters = sum("lora_A" in n for n, _ in policy.unet.named_parameters())
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
    pipe, _ = load_pipeline(cfg.model)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(policy.unet), atol=1e-5, rtol=1e-4)
    assert main(["export", str(tmp_path / "missing.psow"), "--out", str(tmp_path / "x")]) == 1
