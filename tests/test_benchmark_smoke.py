"""The GPU benchmark suite's CPU smoke mode (toy sizes): every stage it runs here must report a figure,
not a failure, so the suite a lent GPU runs has not rotted between device sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_suite_smoke_run_reports_every_stage(tmp_path):
    out = tmp_path / "suite.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--stages", "learner", "broadcast",
         "actor", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    assert "failed" not in table, table
    rows = json.loads(out.with_suffix(".json").read_text())
    print(table)
    assert {r["benchmark"] for r in rows["rows"]} == {"learner update", "weight broadcast", "actor"}, rows
    assert all(r["error"] is None and r["figure"] for r in rows["rows"]), rows["rows"]
