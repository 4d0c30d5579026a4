"""Progress bars: `pso sample` and `pso eval` show one over their sampling batches on stderr, the
services' sampling shows none, and `pso preload` lets huggingface_hub show its download bars while
every other command keeps them off."""

import json
import re
from pathlib import Path

from huggingface_hub.utils import are_progress_bars_disabled

import pso.hub
from pso.cli import main
from pso.sampling import sample_groups

CONFIGS = Path(__file__).parents[1] / "configs"
BAR = r"{}: 100%\|[^|]*\| {n}/{n} "  # tqdm's finished bar: description, percentage, bar, count


def test_sample_shows_a_bar_over_its_batches_and_the_library_call_none(tiny_models, make_policy, tmp_path, capsys):
    args = ["sample", "--set", "model.family=lcm", "--set", f"model.pretrained={tiny_models['sd-lcm']}"]
    args += ["--set", "sampling.batch_size=2", "-p", "a red circle", "-p", "a blue square", "-g", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert re.search(BAR.format("sampling", n=3), err), err  # 6 images in batches of 2
    sample_groups(make_policy("lcm", "sd-lcm"), ["a red circle"], 2, seed=0, decode=False)
    assert "sampling" not in capsys.readouterr().err  # actors and the learner: no bar in their logs


def test_eval_shows_a_bar_for_the_model_and_one_for_the_base(tiny_models, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_models["sd"]), "--family", "sd-turbo", "--steps", "1", "--rewards", "crispness"]
    assert main([*args, "--prompts", "parti:Abstract", "--max-prompts", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(BAR.format("sampling", n=1), err) and re.search(
        BAR.format(r"sampling \(reference model\)", n=1), err
    ), err
    assert json.loads((out / "eval.json").read_text())["prompts"] == 3


def test_preload_shows_the_hub_download_bars_and_other_commands_keep_them_off(monkeypatch, tmp_path, capsys):
    seen = []

    def download(d):  # the hub download itself needs the network: record what it would show instead
        seen.append(are_progress_bars_disabled())
        return tmp_path

    monkeypatch.setattr(pso.hub, "download", download)
    assert main(["preload", "-c", str(CONFIGS / "sd-turbo.yaml")]) == 0
    assert seen and not any(seen), "huggingface_hub's download bars are off during pso preload"
    assert main(["families"]) == 0
    assert are_progress_bars_disabled()  # the logging setup of any other command turns them off again
