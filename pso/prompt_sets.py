"""Standard text-to-image prompt sets by name, for `pso eval --prompts NAME[:SUBSET]`.

A set whose licence allows it and whose exact text we have is shipped in pso/data/prompts (with
its licence and a NOTICE); any other is downloaded on first use from a Hugging Face dataset, at a
pinned revision, into the hub cache (HF_HOME), and read from there afterwards, offline included.
Each set is parsed from its source's own file format; the order is the file's. See
docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data" / "prompts"

Row = tuple[str, tuple[str, ...]]  # a prompt and the subsets it belongs to


def parse_parti_tsv(path: Path) -> list[Row]:
    """PartiPrompts.tsv: a header (Prompt, Category, Challenge, Note), then one tab-separated row per
    prompt, unquoted (a prompt may begin with a double quote). Subsets: its Category and Challenge."""
    with path.open(encoding="utf-8", newline="") as f:
        table = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"Prompt", "Category", "Challenge"} - set(table.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a PartiPrompts table (no {', '.join(sorted(missing))} column)")
        return [(row["Prompt"].strip(), (row["Category"], row["Challenge"])) for row in table]


def parse_json_list(path: Path) -> list[Row]:
    """A JSON list of prompt strings (the HPSv2 project's benchmark files); no subsets."""
    prompts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return [(p.strip(), ()) for p in prompts]


def parse_json_list_by_file(path: Path) -> list[Row]:
    """A JSON list of prompts whose file name is its subset (HPSv2's styles: anime.json, ...)."""
    return [(p, (path.stem,)) for p, _ in parse_json_list(path)]


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    count: int  # prompts in the whole set
    source: str  # where its authors publish it
    licence: str
    citation: str
    files: tuple[str, ...]  # shipped: under pso/data/prompts; fetched: paths in the dataset `repo`
    parse: Callable[[Path], list[Row]]
    subsets: str = ""  # what NAME:SUBSET selects
    repo: str | None = None  # the Hugging Face dataset it is fetched from; None: shipped
    revision: str | None = None  # that dataset's commit: the same text on every machine

    @property
    def shipped(self) -> bool:
        return self.repo is None

    def summary(self) -> str:
        where = "shipped" if self.shipped else "downloaded on first use"
        subsets = f"; {self.name}:SUBSET with SUBSET {self.subsets}" if self.subsets else ""
        return f"{self.name} ({self.count} prompts, {where}{subsets})"


HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_REVISION = "260dbde75ab1c68e86d32a8e7739f1b49b100578"  # "Release benchmark and HPSv2 test data"

PROMPT_SETS = {
    s.name: s
    for s in (
        PromptSet(
            name="parti",
            description="PartiPrompts (P2): 1632 English prompts over 12 categories and 11 challenge aspects",
            count=1632,
            source="https://github.com/google-research/parti",
            licence="Apache-2.0",
            citation='Yu et al., "Scaling Autoregressive Models for Content-Rich Text-to-Image Generation", '
            "arXiv:2206.10789, 2022",
            files=("PartiPrompts.tsv",),
            parse=parse_parti_tsv,
            subsets="a Category (Abstract, Animals, World Knowledge, ...) or a Challenge (Basic, Complex, ...)",
        ),
        PromptSet(
            name="drawbench",
            description="DrawBench: 200 prompts from the Imagen paper (colours, counting, text, positions, ...), "
            "as the HPSv2 project distributes them for its DrawBench evaluation",
            count=200,
            source="https://imagen.research.google/",
            licence="none stated by its authors (not shipped)",
            citation='Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language '
            'Understanding", arXiv:2205.11487, 2022',
            files=("benchmark/drawbench.json",),
            parse=parse_json_list,
            repo="zhwang/HPDv2",
            revision=HPDV2_REVISION,
        ),
        PromptSet(
            name="hpsv2",
            description="the HPSv2 benchmark prompts: 800 in each of 4 styles (anime, concept-art, paintings, photo)",
            count=3200,
            source="https://github.com/tgxs002/HPSv2",
            licence="Apache-2.0 (the HPSv2 project's licence)",
            citation='Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of '
            'Text-to-Image Synthesis", arXiv:2306.09341, 2023',
            files=tuple(f"benchmark/{style}.json" for style in HPSV2_STYLES),
            parse=parse_json_list_by_file,
            subsets=f"a style ({', '.join(HPSV2_STYLES)})",
            repo="zhwang/HPDv2",
            revision=HPDV2_REVISION,
        ),
    )
}


def fetch(s: PromptSet, filename: str) -> Path:
    """One file of a set that is not shipped: from the hub cache, or downloaded into it (the first time)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    where = {"repo_id": s.repo, "filename": filename, "repo_type": "dataset", "revision": s.revision}
    cached = try_to_load_from_cache(**where)
    if isinstance(cached, str):
        return Path(cached)
    log.info(
        "prompt set %s: downloading %s from the Hugging Face dataset %s (revision %s) into the hub cache; "
        "the set is from %s, licence: %s",
        s.name,
        filename,
        s.repo,
        s.revision,
        s.source,
        s.licence,
    )
    try:
        return Path(hf_hub_download(**where))
    except OSError as e:  # offline (HF_HUB_OFFLINE=1), no network, or the hub refused
        raise FileNotFoundError(
            f"prompt set {s.name!r} ({s.description}; from {s.source}) is not on this machine and could not be "
            f"downloaded ({type(e).__name__}). Run once where the hub can be reached (the file lands in the hub "
            f"cache, HF_HOME, and is read from there offline): `hf download {s.repo} {' '.join(s.files)} "
            f"--repo-type dataset --revision {s.revision}`; or give the prompts as a file: --prompts FILE (one "
            "prompt per line, or a JSON list)"
        ) from e


def _path(s: PromptSet, filename: str) -> Path:
    return DATA / filename if s.shipped else fetch(s, filename)


def _key(subset: str) -> str:
    """Subset names compare without case or punctuation: `World Knowledge` is `world-knowledge`."""
    return re.sub(r"[^a-z0-9]+", "-", subset.lower()).strip("-")


def is_prompt_set(spec: str) -> bool:
    return spec.partition(":")[0] in PROMPT_SETS


def load_prompt_set(spec: str) -> list[str]:
    """`NAME` or `NAME:SUBSET`: the set's prompts in its file's order."""
    name, _, subset = spec.partition(":")
    s = PROMPT_SETS[name]
    rows = [row for filename in s.files for row in s.parse(_path(s, filename))]
    if not subset:
        return [prompt for prompt, _ in rows]
    chosen = [prompt for prompt, tags in rows if _key(subset) in {_key(t) for t in tags}]
    if not chosen:
        known = dict.fromkeys(t for _, tags in rows for t in tags)
        raise ValueError(
            f"prompt set {name} has no subset {subset!r}; "
            + (f"its subsets: {', '.join(known)}" if known else "it has no subsets")
        )
    return chosen


def evenly_spaced(items: list[str], count: int) -> list[str]:
    """`count` items spread evenly through the list (the first one included), in order: every part of a
    set ordered by category or style keeps its share."""
    if count < 1:
        raise ValueError(f"cannot take {count} prompts: give a positive number")
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]
