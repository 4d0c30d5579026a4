"""The `pso` command and the shipped configs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pso.cli import main
from pso.codecs import decode_weights, encode_weights
from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.families import get_family
from pso.objectives import PairBatch, compute_loss
from pso.policy import DistilledPolicy
from pso.sampling import sample_groups
from pso.tiny.flow import FLOW_ARCHS

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# the presets that name a model (not the service-only files, nor the bases presets extend)
MODEL_CONFIGS = [p for p in CONFIGS if "family" in (yaml.safe_load(p.read_text()).get("model") or {})]


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_train_in_their_dtype(path, tiny_models, tiny_flow_models):
    """Each shipped recipe, on a tiny model of its architecture, on CPU, in its own dtype: sample, one
    update, and everything stays finite."""
    cfg = load_config(PSOConfig, path)
    arch = get_family(cfg.model.family).arch[0]
    if arch in FLOW_ARCHS:
        model, resolution = tiny_flow_models(arch), 32
    else:
        model, resolution = tiny_models["sdxl" if "sdxl" in cfg.model.pretrained or "xl" in path.name else "sd"], None
    cfg.model = cfg.model.model_copy(
        update={
            "pretrained": str(model),
            "device": "cpu",
            "unet": None,
            "distill_lora": None,
            "variant": None,
            "resolution": resolution,
        }
    )
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune.model_copy(update={"rank": 4}))
    traj = sample_groups(policy, ["a red circle", "a blue square"], 2, seed=0, decode=False)
    assert traj.states.dtype == getattr(torch, cfg.model.dtype)
    batch = PairBatch.from_trajectories(traj, [(0, 1), (3, 2)], policy.encode(["a red circle", "a blue square"]))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    for _ in range(2):
        out = compute_loss(policy, cfg.loss, batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p).all() for p in policy.trainable_parameters())
    bundle = decode_weights(encode_weights(policy.export_weights(1)), expected=policy.weight_spec())
    policy.load_weights(bundle)


def test_help_lists_the_subcommands():
    command = [sys.executable, "-m", "pso.cli", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    for command in ("demo", "families", "config", "sample", "tiny"):
        assert command in out.stdout


def test_config_prints_resolved_yaml_with_overrides(capsys):
    assert main(["config", "--config", str(CONFIGS[0]), "--set", "loss.beta=20"]) == 0
    assert "beta: 20.0" in capsys.readouterr().out


def test_config_errors_name_the_key_and_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  familly: sd-turbo\nloss:\n  name: online-pso\n  beta: lots\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.familly: unknown key" in err and str(bad) in err
    assert "loss.beta: expected a number, got 'lots'" in err


def test_unknown_family_is_a_config_error(capsys):
    assert main(["config", "--set", "model.family=sd-9"]) == 2
    assert "unknown model family 'sd-9'" in capsys.readouterr().err


def test_families_lists_every_recipe(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-dmd2" in out and "flux-schnell     flux     sampler=flow_euler" in out


def test_sample_writes_a_grid(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "sample",
        "--set",
        "model.family=lcm",
        "--set",
        f"model.pretrained={tiny_models['sd-lcm']}",
        "-p",
        "a red circle",
        "-p",
        "a blue square",
        "-g",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    info = json.loads((out / "trajectories.json").read_text())
    assert info["timesteps"] == [999, 759, 499, 259] and len(info["seeds"]) == 6
    assert (out / "samples.png").stat().st_size > 0


def test_tiny_random_and_missing_model(tmp_path, capsys):
    assert main(["tiny", "random", "--out", str(tmp_path / "m"), "--arch", "sdxl"]) == 0
    assert (tmp_path / "m" / "model_index.json").exists()
    assert (
        main(
            [
                "sample",
                "--set",
                f"model.pretrained={tmp_path / 'nothing'}",
                "--set",
                "model.local_files_only=true",
                "-p",
                "x",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rounds", "3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["log"]) == 3 and all(r["pairs"] > 0 for r in summary["log"])
    assert set(summary["steps"]) == {"1", "4"} and "win_rate" in summary["steps"]["1"]["large"]
    assert Path(summary["grid"]).exists() and Path(summary["weights"]).stat().st_size > 0
    assert "before/after picture" in capsys.readouterr().out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# eval set\na red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        "builtin:tiny",
        "--family",
        "tiny",
        "--weights",
        summary["weights"],
        "--prompts",
        str(prompts),
        "--rewards",
        "fidelity,large",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 2 and result["num_steps"] == 1
    assert set(result["rewards"]) == {"fidelity", "large"} and 0 <= result["rewards"]["large"]["win_rate"] <= 1
    assert (out / "eval.md").exists() and (out / "grid.png").exists()
    assert main([*args[:-2], "--rewards", "beauty", "--out", str(out)]) == 1
    assert "unknown reward(s) ['beauty']" in capsys.readouterr().err


ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_carry_an_iso_8601_date_and_json_gives_one_object_per_line(fmt):
    code = (
        "import logging, os; from pso.logs import setup_logging; setup_logging(quiet_libraries=False); "
        "logging.getLogger('pso.t').warning('hello %s', 'there'); print(os.environ['PSO_LOG_FORMAT'])"
    )
    env = {**os.environ, "PSO_LOG_FORMAT": fmt}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = run.stderr.strip().splitlines()[-1]
    if fmt == "json":
        record = json.loads(line)
        assert ISO_8601.match(record["time"]) and (record["level"], record["logger"], record["message"]) == (
            "WARNING",
            "pso.t",
            "hello there",
        )
    else:
        stamp, rest = line.split(" ", 1)
        assert ISO_8601.match(stamp) and rest == "WARNING pso.t: hello there", line
    assert run.stdout.strip() == fmt  # what the process starts inherits the format


def test_eval_scores_with_the_models_of_a_running_reward_server(tmp_path, capsys):
    from reward_server.app import create_app
    from reward_server.main import serve_in_background

    cfg = load_config(PSOConfig, Path(__file__).parents[1] / "configs" / "tiny.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    args = ["eval", "--model", "builtin:tiny", "--family", "tiny", "--prompts", str(prompts), "--steps", "1"]
    with serve_in_background(create_app(cfg.reward_server)) as url:
        assert main([*args, "--reward-url", url, "--rewards", "tiny-large", "--out", str(tmp_path / "e")]) == 0
        result = json.loads((tmp_path / "e" / "eval.json").read_text())
        assert set(result["rewards"]) == {"tiny-large"} and result["prompts"] == 2
        assert main([*args, "--reward-url", url, "--out", str(tmp_path / "all")]) == 0  # every model it serves
        assert len(json.loads((tmp_path / "all" / "eval.json").read_text())["rewards"]) == 3
        assert main([*args, "--reward-url", url, "--rewards", "pickscore", "--out", str(tmp_path / "x")]) == 1
    assert "serves ['tiny-large', 'tiny-fidelity', 'tiny-crispness'], not ['pickscore']" in capsys.readouterr().err


def test_eval_compares_an_exported_lora_with_its_base_on_a_named_set_with_a_reward_server_model(tmp_path):
    """The issue's "done when": a tuned LoRA folder against the base, on PartiPrompts, scored by a CLIP model
    that a running reward server serves (a tiny random CLIP here, loaded as a real local one is)."""
    from pso.config.reward_server import ClipScoreSpec, RewardServerConfig
    from pso.export import export_bundle
    from reward_server.app import create_app
    from reward_server.backends.clip_rewards import build_random
    from reward_server.main import serve_in_background

    cfg = load_config(PSOConfig, Path(__file__).parents[1] / "configs" / "tiny.yaml")
    policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
    with torch.no_grad():  # trained adapters: fresh ones (B = 0) would change nothing
        for name, param in policy.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    export_bundle(policy.export_weights(4), cfg, tmp_path / "lora")
    server = RewardServerConfig(models=[ClipScoreSpec(model=str(build_random("clip-score", tmp_path / "clip")))])
    args = ["eval", "-c", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), "--weights", str(tmp_path / "lora")]
    args += ["--prompts", "parti:Animals", "--max-prompts", "3", "--out", str(tmp_path / "eval")]
    with serve_in_background(create_app(server)) as url:
        assert main([*args, "--reward-url", url]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (name, scores), *others = result["rewards"].items()
    assert result["prompts"] == 3 and not others and name.startswith("clip")
    assert scores["mean"] != scores["base_mean"]  # the LoRA's images, not the base model's


FLOW_PIPELINES = {
    "flux": "FluxPipeline",
    "flux2": "Flux2KleinPipeline",
    "zimage": "ZImagePipeline",
    "sd3": "StableDiffusion3Pipeline",
    "qwenimage": "QwenImagePipeline",
    "sana": "SanaSprintPipeline",
}


@pytest.mark.parametrize("arch", sorted(FLOW_PIPELINES))
def test_tiny_random_writes_each_flow_matching_architecture_as_its_diffusers_pipeline(tmp_path, arch):
    from diffusers import DiffusionPipeline

    from pso.tiny.flow import FLOW_ARCHS, flow_builders

    assert set(FLOW_ARCHS) == set(flow_builders()) == set(FLOW_PIPELINES)
    assert main(["tiny", "random", "--out", str(tmp_path / arch), "--arch", arch]) == 0
    assert type(DiffusionPipeline.from_pretrained(tmp_path / arch)).__name__ == FLOW_PIPELINES[arch]
    assert main(["tiny", "random", "--out", str(tmp_path / "lcm"), "--arch", arch, "--lcm"]) == 1
