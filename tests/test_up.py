"""`pso up`, the README's first command, end to end on the built-in tiny model (a short run)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSED = re.compile(r"no grid for (\d+) weight versions \(([^)]*)\)")


def expand(ranges: str) -> set[int]:
    """ "1-3, 7" -> {1, 2, 3, 7}."""
    out = set()
    for part in ranges.split(", "):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


@pytest.mark.slow
def test_pso_up_trains_and_leaves_a_grid_for_every_weight_version(tmp_path):
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
    # one grid per version, in order as published; a version pruned before it was drawn is named in the log
    drawn = {int(p.stem[1:]) for p in (run_dir / "grids").glob("v*.png")}
    missed = MISSED.search(run.stderr)
    skipped = expand(missed[2]) if missed else set()
    assert drawn | skipped == set(range(updates + 1)) and not drawn & skipped, (drawn, skipped)
    assert updates in drawn  # the final weights, published as the learner finished
    if missed:
        assert int(missed[1]) == len(skipped)
