"""Prompt sources for actors: the config's own list, a text file (one per line), a JSONL file, or a
built-in set: `builtin:tiny-world` (every scene of the tiny world) or `builtin:general` (everyday
prompts for real models, actors/data/general-prompts.txt)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_WORLD = "builtin:tiny-world"
GENERAL = "builtin:general"
GENERAL_FILE = Path(__file__).parent / "data" / "general-prompts.txt"


def load_prompts(path: str | Path | None, default: list[str]) -> list[str]:
    """Prompts from `path` (.jsonl: objects with a "prompt"; anything else: one per line, blank lines
    and lines starting with # skipped; a built-in set), or `default` when there is no path."""
    if path is None:
        return list(default)
    if str(path) == TINY_WORLD:
        from pso.tiny.world import all_scenes

        return [s.prompt for s in all_scenes()]
    if str(path).startswith("builtin:") and str(path) != GENERAL:
        raise ValueError(f"unknown built-in prompt set {path}; built-in sets: {TINY_WORLD}, {GENERAL}")
    path = GENERAL_FILE if str(path) == GENERAL else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts from {path}: {e}") from None
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f'{path}, line {n}: expected an object with a "prompt" string')
            prompts.append(item["prompt"])
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
