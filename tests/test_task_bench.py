"""`pso bench quality --task`: the benchmark of PSO's other uses runs each task end to end (tiny sizes here)."""

import json

import pytest

from pso.bench.tasks import TaskBenchConfig, run_task_bench

TARGETS_ROW = "targets (VAE round trip)"


@pytest.mark.parametrize(
    "task, methods, columns, ceiling",
    [
        ("style", {"sft": {"name": "sft"}}, ["ordinary sepia@1", "ordinary style_fidelity@4"], "ordinary sepia"),
        ("subject", {"customization": {"name": "customization"}}, ["identifier subject@1", "ordinary fidelity@4"],
         "identifier subject"),
        ("offline", {"offline-pso": {"name": "offline-pso"}}, ["ordinary large@1", "ordinary crispness@4"], None),
    ],
)  # fmt: skip
def test_a_task_bench_trains_each_method_and_writes_its_table(tmp_path, task, methods, columns, ceiling):
    bench = TaskBenchConfig(task=task, seeds=[0], rounds=2, eval_prompts=6, methods=methods)
    result = run_task_bench(tmp_path, bench)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["rows"]) == {"base", *methods} | ({TARGETS_ROW} if ceiling else set())
    for column in columns:
        base, tuned = saved["rows"]["base"][column], saved["rows"][next(iter(methods))][column]
        assert len(base) == len(tuned) == 1 and 0 <= tuned[0] <= 1
    if ceiling:  # the targets themselves, through the VAE, score the task's measure well above the base model
        targets = saved["rows"][TARGETS_ROW]
        assert targets[f"{ceiling}@1"] == targets[f"{ceiling}@4"] and targets[f"{ceiling}@1"][0] > 0.2
        assert targets[f"{ceiling}@1"][0] > 1.5 * saved["rows"]["base"][f"{ceiling}@1"][0]
    assert (tmp_path / "grid.png").stat().st_size > 0 and result["markdown"].count("\n") == 2 + len(saved["rows"])


def test_an_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'color'; tasks: style, subject, offline"):
        run_task_bench(tmp_path, TaskBenchConfig(task="color"))
