"""`pso bench quality --task`: the benchmark of PSO's other uses runs each task end to end (tiny sizes here)."""

import json

import pytest

from pso.bench.tasks import TaskBenchConfig, run_task_bench


@pytest.mark.parametrize(
    "task, methods, columns",
    [
        ("subject", {"customization": {"name": "customization"}}, ["identifier subject@1", "ordinary fidelity@4"]),
        ("offline", {"offline-pso": {"name": "offline-pso"}}, ["ordinary large@1", "ordinary crispness@4"]),
    ],
)
def test_a_task_bench_trains_each_method_and_writes_its_table(tmp_path, task, methods, columns):
    bench = TaskBenchConfig(task=task, seeds=[0], rounds=2, eval_prompts=6, methods=methods)
    result = run_task_bench(tmp_path, bench)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["rows"]) == {"base", *methods}
    for column in columns:
        base, tuned = saved["rows"]["base"][column], saved["rows"][next(iter(methods))][column]
        assert len(base) == len(tuned) == 1 and 0 <= tuned[0] <= 1
    assert (tmp_path / "grid.png").stat().st_size > 0 and result["markdown"].count("\n") == 2 + 1 + len(methods)


def test_an_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'color'; tasks: style, subject, offline"):
        run_task_bench(tmp_path, TaskBenchConfig(task="color"))
