"""The learner's pictures are for people watching: they never stop the training."""

import logging
from pathlib import Path

from learner.pictures import RunPictures
from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.policy import DistilledPolicy

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_a_picture_that_cannot_be_written_is_logged_and_the_learner_goes_on(tmp_path, caplog):
    cfg = load_config(PSOConfig, TINY, overrides=[f"learner.run_dir={tmp_path}", "learner.metrics_file=null"])
    (tmp_path / "grids").write_text("a file where the grids' folder should be")
    (tmp_path / "reward_curve.png").mkdir()  # a folder where the picture should be
    pictures = RunPictures(cfg, DistilledPolicy.from_config(cfg.model, None), rank=0, zero_stage=0)
    with caplog.at_level(logging.ERROR, "pso.learner"):
        pictures.grid(5, 5)
        pictures.reward_curve([{"updates": 1, "reward_mean": 0.1}], 1)
    assert [r.getMessage() for r in caplog.records if r.name == "pso.learner"] == [
        "could not write the sample grid; training goes on",
        "could not write the reward curve; training goes on",
    ]
    pictures.grid(6, 6)  # not a version to draw (grid_every 5): nothing sampled, nothing written
    assert pictures.drawn == 5


def test_prompts_the_learner_cannot_read_fall_back_to_the_configs_own(tmp_path, caplog):
    cfg = load_config(PSOConfig, TINY, overrides=[f"learner.run_dir={tmp_path}", "actor.prompts=/nowhere/p.txt"])
    pictures = RunPictures(cfg, DistilledPolicy.from_config(cfg.model, None), rank=0, zero_stage=0)
    assert set(pictures.prompts) <= set(cfg.loop.prompts) and len(pictures.prompts) == cfg.learner.grid_prompts
    assert "the sample grids use loop.prompts" in caplog.text
