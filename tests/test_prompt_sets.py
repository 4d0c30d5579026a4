"""Standard prompt sets by name (pso/prompt_sets.py) and `load_prompts`: the shipped PartiPrompts
as its authors publish it, subsets, the first-use download parsed from files in the source's own
format, and the errors for an unknown name and for a set that cannot be downloaded."""

import hashlib
import json
import logging

import huggingface_hub
import pytest
from huggingface_hub import constants

from pso.cli import main
from pso.prompt_sets import DATA, HPDV2_REVISION, PROMPT_SETS
from pso.prompts import load_prompts

PARTI_SHA256 = "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"  # google-research/parti@2c99f66


def test_shipped_sets_are_the_published_files_with_their_licence():
    shipped = [s for s in PROMPT_SETS.values() if s.shipped]
    assert [s.name for s in shipped] == ["parti"]
    assert hashlib.sha256((DATA / "PartiPrompts.tsv").read_bytes()).hexdigest() == PARTI_SHA256
    assert "Apache License" in (DATA / "LICENSE-PartiPrompts.txt").read_text()
    notice = (DATA / "NOTICE").read_text()
    for s in shipped:
        assert all(f in notice for f in s.files) and s.source in notice
        prompts = load_prompts(s.name)
        assert len(prompts) == s.count and all(p and p == p.strip() for p in prompts)


def test_parti_reads_the_table_as_written():
    prompts = load_prompts("parti")
    assert prompts[:3] == ["bond", "element", "molecule"] and len(set(prompts)) == 1632
    quoted = [p for p in prompts if p.startswith('"G I G G L E"')]  # unquoted TSV: the quotes are the prompt's
    assert quoted == [
        '"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall with a splotch '
        "of exploding white paint."
    ]


def test_parti_subsets_are_its_categories_and_challenges():
    assert len(load_prompts("parti:Abstract")) == 51
    assert load_prompts("parti:World Knowledge") == load_prompts("parti:world-knowledge")
    assert len(load_prompts("parti:world-knowledge")) == 214 and len(load_prompts("parti:Basic")) == 272
    categories = ["Abstract", "Animals", "Artifacts", "Arts", "Food & Beverage", "Illustrations", "Indoor Scenes"]
    categories += ["Outdoor Scenes", "People", "Produce & Plants", "Vehicles", "World Knowledge"]
    assert sum(len(load_prompts(f"parti:{c}")) for c in categories) == 1632
    with pytest.raises(ValueError, match=r"no subset 'Dinosaurs'; its subsets: Abstract, Basic, .*Vehicles"):
        load_prompts("parti:Dinosaurs")


def test_max_prompts_takes_them_evenly_spaced_in_order():
    everything = load_prompts("parti")
    assert load_prompts("parti", max_prompts=4) == [everything[0], everything[408], everything[816], everything[1224]]
    assert load_prompts("parti:Abstract", max_prompts=1000) == load_prompts("parti:Abstract")
    with pytest.raises(ValueError, match="positive"):
        load_prompts("parti", max_prompts=0)


def test_files_still_work_and_an_unknown_name_lists_the_sets(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("# a comment\na red circle\n\n a blue square \n")
    (tmp_path / "mine.json").write_text(json.dumps(["one", "two"]))
    assert load_prompts(tmp_path / "mine.txt") == ["a red circle", "a blue square"]
    assert load_prompts(str(tmp_path / "mine.json"), max_prompts=1) == ["one"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parti").write_text("my own\n")
    assert load_prompts("./parti") == ["my own"] and len(load_prompts("parti")) == 1632  # the name wins
    with pytest.raises(ValueError) as e:
        load_prompts("partiprompts")
    assert all(f"{name} (" in str(e.value) for name in PROMPT_SETS) and "builtin:general" in str(e.value), e.value


def test_a_fetched_set_is_parsed_from_files_in_its_source_format(tmp_path, monkeypatch, caplog):
    """The HPSv2 project's benchmark files are JSON lists of prompt strings, one file per style; only the
    download itself is replaced, by files written in that format."""
    styles = {
        style: [f"{style} prompt {i}" for i in range(3)] for style in ("anime", "concept-art", "paintings", "photo")
    }
    for style, prompts in styles.items():
        (tmp_path / "benchmark").mkdir(exist_ok=True)
        (tmp_path / "benchmark" / f"{style}.json").write_text(json.dumps(prompts, indent=4))
    (tmp_path / "benchmark" / "drawbench.json").write_text(json.dumps(["A red colored car.", " A black apple. "]))
    calls = []

    def hf_hub_download(repo_id, filename, repo_type, revision):
        calls.append((repo_id, filename, repo_type, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with caplog.at_level(logging.INFO, logger="pso.prompt_sets"):
        assert load_prompts("hpsv2") == [p for prompts in styles.values() for p in prompts]
    assert {c[0] for c in calls} == {"zhwang/HPDv2"} and {c[2:] for c in calls} == {("dataset", HPDV2_REVISION)}
    assert [c[1] for c in calls] == [f"benchmark/{style}.json" for style in styles]
    message = caplog.records[0].getMessage()
    assert "prompt set hpsv2: downloading benchmark/anime.json from the Hugging Face dataset zhwang/HPDv2" in message
    assert "https://github.com/tgxs002/HPSv2" in message and "licence: Apache-2.0" in message
    assert load_prompts("hpsv2:photo") == styles["photo"] and load_prompts("hpsv2:Concept Art") == styles["concept-art"]
    assert load_prompts("drawbench") == ["A red colored car.", "A black apple."]
    with pytest.raises(ValueError, match="prompt set drawbench has no subset 'Colors'; it has no subsets"):
        load_prompts("drawbench:Colors")


def test_offline_a_fetched_set_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as e:
        load_prompts("drawbench")
    message = str(e.value)
    assert "prompt set 'drawbench'" in message and "https://imagen.research.google/" in message
    assert (
        f"hf download zhwang/HPDv2 benchmark/drawbench.json --repo-type dataset --revision {HPDV2_REVISION}" in message
    )
    assert "--prompts FILE" in message
    assert main(["eval", "--model", "builtin:tiny", "--prompts", "hpsv2:photo", "--out", str(tmp_path / "e")]) == 1
    assert "pso eval: error: prompt set 'hpsv2'" in capsys.readouterr().err
