"""Tests for the typed configuration loader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from pso.config import ConfigError, StrictModel, dump_config, load_config


class Learner(StrictModel):
    lr: float = 1e-4
    steps: int = 100


class OnlinePSO(StrictModel):
    name: Literal["online-pso"] = "online-pso"
    beta: float = 0.1


class SFT(StrictModel):
    name: Literal["sft"]
    weight: float = 1.0


class Config(StrictModel):
    learner: Learner = Learner()
    loss: Annotated[OnlinePSO | SFT, Field(discriminator="name")] = OnlinePSO()
    prompts: list[str] = ["a cat"]
    precision: Literal["bf16", "fp32"] = "bf16"
    tag: str | float = "run"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config(Config, env={}) == Config()


def test_file_values(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 3.0e-4\nloss:\n  name: sft\n  weight: 2\nprompts: [x, y]\n")
    cfg = load_config(Config, path, env={})
    assert cfg.learner == Learner(lr=3e-4, steps=100)
    assert cfg.loss == SFT(name="sft", weight=2.0)
    assert cfg.prompts == ["x", "y"]


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(Config, write(tmp_path, ""), env={}) == Config()


def test_env_beats_file_and_cli_beats_env(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.1\n  steps: 5\n")
    env = {"PSO__LEARNER__LR": "0.2", "pso__learner__steps": "7", "OTHER": "x"}
    cfg = load_config(Config, path, env=env)
    assert (cfg.learner.lr, cfg.learner.steps) == (0.2, 7)
    cfg = load_config(Config, path, env=env, overrides=["learner.lr=0.3", "precision=fp32"])
    assert (cfg.learner.lr, cfg.learner.steps, cfg.precision) == (0.3, 7, "fp32")


def test_override_values_are_yaml():
    cfg = load_config(Config, env={"PSO__TAG": "1e-5"}, overrides=["prompts=[a, 'b c']", "loss={name: sft}"])
    assert cfg.tag == 1e-05 and isinstance(cfg.tag, float)
    assert cfg.prompts == ["a", "b c"]
    assert cfg.loss == SFT(name="sft")
    assert load_config(Config, env={}, overrides=["tag=a: b"]).tag == "a: b"
    assert load_config(Config, env={}, overrides=["tag="]).tag == ""


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=rf"learner\.momentum: unknown key \(file {re.escape(str(path))}\)"):
        load_config(Config, path, env={})


def test_every_problem_is_listed(tmp_path):
    path = write(tmp_path, "learner:\n  lr: abc\n  steps: 1.5\nprecision: fp8\nextra: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, env={})
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert f"  learner.lr: expected a number, got 'abc' (file {path})" in lines
    assert any(line.startswith("  learner.steps: ") for line in lines)
    assert f"  precision: expected 'bf16' or 'fp32', got 'fp8' (file {path})" in lines
    assert f"  extra: unknown key (file {path})" in lines
    assert len(lines) == 5


def test_wrong_type_from_env_names_variable(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"learner\.lr: expected a number, got 'abc' \(environment variable PSO__LEARNER__LR\)",
    ):
        load_config(Config, path, env={"PSO__LEARNER__LR": "abc"})


def test_wrong_type_from_cli_names_override():
    with pytest.raises(
        ConfigError,
        match=r"learner\.steps: expected an integer, got 'x' \(command line override learner\.steps=x\)",
    ):
        load_config(Config, env={"PSO__LEARNER__STEPS": "3"}, overrides=["learner.steps=x"])


def test_unknown_key_from_cli_names_override():
    with pytest.raises(ConfigError, match=r"learner\.bogus: unknown key \(command line override learner\.bogus=1\)"):
        load_config(Config, env={}, overrides=["learner.bogus=1"])


def test_invalid_discriminator_lists_allowed_names(tmp_path):
    path = write(tmp_path, "loss:\n  name: dpo\n")
    with pytest.raises(
        ConfigError,
        match=rf"loss\.name: expected one of 'online-pso', 'sft', got 'dpo' \(file {re.escape(str(path))}\)",
    ):
        load_config(Config, path, env={})
    with pytest.raises(ConfigError, match=r"loss\.name: .* \(command line override loss\.name=dpo\)"):
        load_config(Config, path, env={}, overrides=["loss.name=dpo"])


def test_a_tagged_section_without_its_tag_is_the_default_kind():
    assert load_config(Config, env={}, overrides=["loss={}"]).loss == OnlinePSO()
    with pytest.raises(ConfigError, match=r"loss\.name: .*'bogus'.* \(command line override loss\.name=bogus\)$"):
        load_config(Config, env={}, overrides=["loss.name=bogus"])


def test_error_on_section_names_sources_below_it():
    with pytest.raises(
        ConfigError,
        match=r"prompts: expected a list, got \{'x': 1\} \(command line override prompts\.x=1\)",
    ):
        load_config(Config, env={}, overrides=["prompts.x=1"])


def test_unknown_key_inside_selected_union_member(tmp_path):
    path = write(tmp_path, "loss:\n  name: sft\n  beta: 0.1\n")
    with pytest.raises(ConfigError, match=rf"loss\.beta: unknown key \(file {re.escape(str(path))}\)"):
        load_config(Config, path, env={})


def test_wrong_type_inside_union_member_and_list(tmp_path):
    path = write(tmp_path, "loss:\n  name: sft\n  weight: heavy\nprompts: [a, [b]]\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, env={})
    assert f"  loss.weight: expected a number, got 'heavy' (file {path})" in str(info.value).splitlines()
    assert f"  prompts.1: expected a string, got ['b'] (file {path})" in str(info.value).splitlines()


def test_missing_required_key():
    class Required(StrictModel):
        learner: Learner
        seed: int

    with pytest.raises(ConfigError, match=r"(?m)^  seed: missing required key$"):
        load_config(Required, env={}, overrides=["learner.lr=0.5"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.1\n steps: [1\n")
    with pytest.raises(ConfigError, match=rf"invalid YAML in {re.escape(str(path))}, line 3"):
        load_config(Config, path, env={})


def test_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping, got list"):
        load_config(Config, path, env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_config(Config, tmp_path / "nope.yaml", env={})


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"malformed command line override 'learner\.lr'"):
        load_config(Config, env={}, overrides=["learner.lr"])
    with pytest.raises(ConfigError, match=r"empty key in command line override learner\.\.lr=1"):
        load_config(Config, env={}, overrides=["learner..lr=1"])


def test_setting_through_non_mapping():
    with pytest.raises(
        ConfigError,
        match=r"cannot set precision\.x \(command line override precision\.x=1\): precision is not a mapping",
    ):
        load_config(Config, env={"PSO__PRECISION": "fp32"}, overrides=["precision.x=1"])


def test_dump_load_round_trip(tmp_path):
    cfg = Config(learner=Learner(lr=1e-5, steps=3), loss=SFT(name="sft"), prompts=["1e-5", "x"], tag="2e3")
    path = write(tmp_path, dump_config(cfg))
    assert load_config(Config, path, env={}) == cfg


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "reward-server:8000", "http://", "http://h:0", "http://h:99999"])
def test_a_reward_url_that_can_never_reach_a_reward_server_is_refused(url):
    from pydantic import ValidationError

    from pso.config.services import ActorConfig

    with pytest.raises(ValidationError, match="not an http\\(s\\) URL of a reward server"):
        ActorConfig(reward_url=url)
    for good in ("http://reward-server:8000", "https://scores.example.com/pso/", "http://[::1]:8000"):
        assert ActorConfig(reward_url=good).reward_url == good


def test_a_section_chosen_by_a_tag_and_given_in_part_is_of_the_default_kind():
    from pso.config.schema import PSOConfig

    cfg = load_config(PSOConfig, env={"PSO__FINETUNE__RANK": "4"}, overrides=["loss.beta=10"])
    assert (cfg.loss.name, cfg.loss.beta, cfg.finetune.mode, cfg.finetune.rank) == ("online-pso", 10.0, "lora", 4)
    assert load_config(PSOConfig, env={}, overrides=["finetune.mode=full"]).finetune.mode == "full"  # a tag given wins
    with pytest.raises(ConfigError, match="finetune.rank"):  # and a key of another kind is still refused
        load_config(PSOConfig, env={}, overrides=["finetune.mode=full", "finetune.rank=4"])
