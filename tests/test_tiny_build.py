"""`pso tiny build` end to end with tiny step counts, and its reproducibility from the seed."""

import json

import pytest
from safetensors.torch import load_file

from pso.cli import main


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,parts",
    [([], ("unet", "vae", "text_encoder")), (["--flow"], ("transformer", "text_encoder_2"))],
    ids=["unet", "flow"],
)
def test_quick_build_is_complete_and_reproducible(tmp_path, capsys, flags, parts):
    for name in ("a", "b"):
        assert main(["tiny", "build", "--out", str(tmp_path / name), "--seed", "3", "--quick", *flags]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert {"data", "teacher_1_step", "student_1_step", "student_4_step"} <= set(report["scores"])
    assert report["scores"]["data"]["accuracy"] == 1.0
    for part in parts:
        a = load_file(next((tmp_path / "a" / "student" / part).glob("*.safetensors")))
        b = load_file(next((tmp_path / "b" / "student" / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), part
    assert "student_4_step" in capsys.readouterr().out
