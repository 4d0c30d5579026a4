"""`pso up`, the README's first command, end to end on the built-in tiny model (a short run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pso.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pso_up_trains_and_leaves_its_pictures_and_weights_for_diffusers(tmp_path):
    updates, run_dir = 12, tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "pso.cli", "up", "-c", str(ROOT / "configs" / "tiny.yaml"), "--updates", str(updates),
         "--out", str(run_dir), "--set", "up.eval_prompts=16"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"weights version {updates} against the base model on 16 prompts" in run.stdout, run.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["version"] == updates and summary["prompts"] == 16, summary
    e = summary["experience"]  # every record produced is accounted for, and the waste is reported
    assert e["produced"] == e["trained"] + e["stale"] + e["corrupt"] + e["left"] and e["trained"] > 0, e
    assert f"experience: {e['produced']} records produced, {e['trained']} trained" in run.stdout, run.stdout
    lora = run_dir / "lora"  # the final weights, as diffusers loads them, with a model card and the evaluation
    assert summary["export"] == str(lora / "pytorch_lora_weights.safetensors") and (lora / "README.md").is_file()
    assert "## Evaluation" in (lora / "README.md").read_text()
    for picture in ("reward_curve.png", "versions.png", "before_after.png"):
        assert (run_dir / picture).stat().st_size > 0, picture
    # the learner's own pictures and export in its run folder: its grids (its own weights, nothing to miss),
    # its reward curve, and its final weights as diffusers loads them
    learner = run_dir / "learner"
    grids = {0, 5, 10, updates}  # every grid_every-th version (5 by default) and the last
    assert {int(p.stem[1:]) for p in (learner / "grids").glob("v*.png")} == grids
    assert (learner / "reward_curve.png").stat().st_size > 0
    assert (learner / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (learner / "lora" / "README.md").read_text()
    assert f"| weight version | {updates} |" in card and f"| updates | {updates} |" in card
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})  # installed: TensorBoard too
    events.Reload()
    assert len(events.Images("learner/samples")) == len(grids) and events.Images("learner/reward_curve")
    # pso export finds the run's newest weights (its final checkpoint): the same adapters as the learner's export
    assert main(["export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    assert_same_tensors(tmp_path / "exported" / "pytorch_lora_weights.safetensors",
                        learner / "lora" / "pytorch_lora_weights.safetensors")  # fmt: skip


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
