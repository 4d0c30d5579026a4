"""The GPU benchmark suite's CPU smoke mode (toy sizes): every stage it runs here must report a figure,
not a failure, so the suite a lent GPU runs has not rotted between device sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The suite skips a stage once its wall-time budget (170 s in smoke mode, ~25 s used on two idle cores) runs
# short: a GPU session's time box. Here a skip would only mean a busy machine, so the budget is generous.
BUDGET_S = 900


def run_smoke_suite(tmp_path: Path, *args: str) -> str:
    """Run the suite's smoke mode on the learner, broadcast and actor stages (the reward-server stage has its
    own test below); check every row reports a figure and return the table."""
    out = tmp_path / "suite.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", *args, "--stages", "learner",
         "broadcast", "actor", "--threads", "1", "--out", str(out), "--budget-s", str(BUDGET_S)],
        capture_output=True, text=True, timeout=BUDGET_S + 300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    assert "failed" not in table, table
    rows = json.loads(out.with_suffix(".json").read_text())
    print(table)
    assert {r["benchmark"] for r in rows["rows"]} == {"learner update", "weight broadcast", "actor"}, rows
    assert all(r["error"] is None and r["figure"] for r in rows["rows"]), rows["rows"]
    return table


@pytest.mark.slow
def test_the_gpu_suite_smoke_run_reports_every_stage(tmp_path):
    run_smoke_suite(tmp_path)


def test_the_gpu_suite_flux_smoke_run_reports_every_stage(tmp_path):
    """--arch flux: the FLUX.1 layout at toy widths (1 double + 1 single block), flux-schnell at eta 0.7 with
    gradient checkpointing and LoRA on both attention streams; ~15 s on two cores."""
    table = run_smoke_suite(tmp_path, "--arch", "flux", "--ranks", "16")
    assert "flux-schnell-format FLUX.1-class model" in table and "at eta 0.7" in table, table
    assert "to_add_out" in table and "gradient checkpointing" in table, table


@pytest.mark.slow
def test_the_reward_server_benchmark_reports_each_level_beside_raw(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_reward_server.py"), "--seconds", "1", "--rounds", "2",
         "--clients", "1", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    levels = json.loads(out.read_text())["levels"]
    assert [level["clients"] for level in levels] == [1, 4]
    for level in levels:
        assert len(level["slices"]) == 2 and level["requests"] > 0, level
        assert level["images_per_s"] > 0 and level["raw_images_per_s"] > 0, level
        assert level["ratio"] == pytest.approx(level["images_per_s"] / level["raw_images_per_s"])
