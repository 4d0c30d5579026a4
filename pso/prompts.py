"""Where prompts come from, for actors, the learner's grids and evaluations alike.

None                       the config's own list (`loop.prompts`)
builtin:tiny-world         every scene of the tiny world
builtin:tiny-subject       the tiny subject's identifier ("pixel") in colour pairs its targets never show
builtin:general            everyday prompts for real models (pso/data/prompts/general-prompts.txt)
parti, drawbench, hpsv2    the standard sets, NAME or NAME:SUBSET (pso/prompt_sets.py); a name wins
                           over a file of that name, which `./NAME` reads
a file                     .jsonl (an object with a "prompt" per line), .json (a list of strings),
                           anything else one prompt per line; blank lines and #-comments skipped
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pso.prompt_sets import DATA, PROMPT_SETS, evenly_spaced, is_prompt_set, load_prompt_set

TINY_WORLD = "builtin:tiny-world"
TINY_SUBJECT = "builtin:tiny-subject"
GENERAL = "builtin:general"
GENERAL_FILE = DATA / "general-prompts.txt"


def load_prompts(
    source: str | Path | None, default: list[str] | None = None, max_prompts: int | None = None
) -> list[str]:
    """The prompts `source` names (see the module's docstring), or `default` when it is None; `max_prompts`
    keeps that many, evenly spaced through them (every part of a set ordered by category keeps its share)."""
    prompts = _load(source, default)
    return prompts if max_prompts is None else evenly_spaced(prompts, max_prompts)


def _load(source: str | Path | None, default: list[str] | None) -> list[str]:
    if source is None:
        if not default:
            raise ValueError("no prompts: give a prompt file or set")
        return list(default)
    spec = str(source)
    if spec == TINY_WORLD:
        from pso.tiny.world import all_scenes

        return [s.prompt for s in all_scenes()]
    if spec == TINY_SUBJECT:
        from pso.tiny.tasks import subject_eval_prompts, unseen_colour_pairs

        return subject_eval_prompts(len(unseen_colour_pairs()))["subject"]
    if is_prompt_set(spec):
        return load_prompt_set(spec)
    if spec.startswith("builtin:") and spec != GENERAL:
        raise ValueError(f"unknown built-in prompt set {spec}; built-in sets: {TINY_WORLD}, {TINY_SUBJECT}, {GENERAL}")
    path = GENERAL_FILE if spec == GENERAL else Path(spec)
    if not path.is_file():
        raise ValueError(
            f"{spec}: neither a prompt file nor a known prompt set; the sets: "
            + "; ".join([*(s.summary() for s in PROMPT_SETS.values()), TINY_WORLD, TINY_SUBJECT, GENERAL])
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts from {path}: {e}") from None
    if path.suffix == ".jsonl":
        prompts = [_jsonl_prompt(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _jsonl_prompt(path: Path, n: int, line: str) -> str:
    try:
        item = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError(f'{path}, line {n}: expected an object with a "prompt" string')
    return item["prompt"]


def pick_prompts(pool: list[str], n: int, seed: int) -> list[str]:
    """`n` prompts drawn from `pool` by `seed` (with repeats only when the pool is smaller): the same ones
    every time, for grids and evaluations that compare weight versions."""
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=n > len(pool))]
