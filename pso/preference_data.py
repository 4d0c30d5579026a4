"""Offline preference pairs in the Pick-a-Pic v2 layout, streamed: the whole set is never in memory.

Pick-a-Pic v2's columns: `caption`, `jpg_0` and `jpg_1` (encoded image bytes), `label_0` and `label_1`
(1/0 or 0/1 for a preference, 0.5/0.5 for a tie); any others are ignored. Sources: a local parquet file, a
folder of parquet files (`*.parquet`, subfolders included, in name order), or a hub dataset (`hf:OWNER/NAME`,
or `OWNER/NAME` when no such local path exists, e.g. yuvalkirstain/pickapic_v2), all read with
`datasets.load_dataset(..., streaming=True)`.

Sharding: `datasets.distributed.split_dataset_by_node(ds, rank, world_size)`. When the number of files
(shards) divides by world_size each rank reads whole files of its own (file k to rank k % world_size);
otherwise every rank reads the stream and keeps example i when i % world_size == rank. Either way the ranks'
shards are disjoint and together cover the set. A pair's `index` is its position in this rank's shard
(skipped rows count), so (rank, index) names it for a given source and world_size, and `stream.position`
(how many examples of the shard were consumed) is what a checkpoint keeps: `start=position` resumes exactly
there, with the same source and world_size.

Ties are skipped (counted in `ties`). Bad rows (an unreadable, too large or too small image, a missing or
empty caption, labels that are neither a preference nor a tie) are skipped with a warning and counted in
`bad_rows` (by reason in `bad_reasons`); they never stop the stream. A source that is not Pick-a-Pic-shaped
(missing columns) is a ValueError naming them. Images are made `image_size` squares by pso/targets.py's rule.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from pso.targets import (
    MAX_PIXELS,
    check_caption,
    check_columns,
    hub_id,
    image_bytes,
    image_tensor,
    open_hub,
    open_parquet,
    parquet_files,
)

log = logging.getLogger(__name__)

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
MAX_WARNINGS = 20  # bad rows warned about one by one; after that, one summary every WARN_EVERY
WARN_EVERY = 1000


class PreferencePair(NamedTuple):
    index: int  # position in this rank's shard
    caption: str
    winner: Tensor  # (3, image_size, image_size) float32 in [0, 1]
    loser: Tensor


def preference(label_0: Any, label_1: Any) -> int | None:
    """0 or 1: the preferred image; None: a tie. ValueError: labels that are neither."""
    try:
        a, b = float(label_0), float(label_1)
    except (TypeError, ValueError):
        raise ValueError(f"labels {label_0!r}/{label_1!r} are not numbers") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"labels {a}/{b} are not finite")
    if (a, b) == (1.0, 0.0):
        return 0
    if (a, b) == (0.0, 1.0):
        return 1
    if a == b == 0.5:
        return None
    raise ValueError(f"labels {a}/{b} are neither a preference (1/0, 0/1) nor a tie (0.5/0.5)")


class PreferenceStream:
    """Iterate (index, caption, winner, loser) over this rank's shard of a Pick-a-Pic-shaped source, from
    example `start` of the shard on. Iterating again continues from `position`."""

    def __init__(
        self,
        source: str | Path,
        *,
        rank: int,
        world_size: int,
        image_size: int,
        start: int = 0,
        split: str = "train",
        max_pixels: int = MAX_PIXELS,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.source = str(source)
        self.rank, self.world_size, self.image_size = rank, world_size, image_size
        self.split, self.max_pixels = split, max_pixels
        self.position = start  # examples of this rank's shard consumed: checkpoint it, resume with start=
        self.ties = 0
        self.bad_rows = 0
        self.bad_reasons: Counter[str] = Counter()
        self._dataset()  # fail now, not on the first batch, when the source is missing or not Pick-a-Pic-shaped

    def _dataset(self):
        from datasets.distributed import split_dataset_by_node

        name = hub_id(self.source)
        path = Path(self.source)
        if name is not None:
            ds = open_hub(
                name,
                self.split,
                what="preference pairs",
                local_help="parquet files with the Pick-a-Pic v2 columns " + ", ".join(COLUMNS),
            )
            where = f"hf:{name} ({self.split})"
        elif path.exists():
            files = parquet_files(path)
            if not files or any(f.suffix != ".parquet" for f in files):
                raise ValueError(f"{path}: no parquet files (Pick-a-Pic v2 layout: {', '.join(COLUMNS)})")
            ds = open_parquet(files)
            where = str(path) if len(files) == 1 else f"{path} ({len(files)} parquet files)"
        else:
            raise ValueError(
                f"{self.source}: no such file or folder; give parquet files in the Pick-a-Pic v2 layout or "
                "hf:OWNER/NAME"
            )
        self._where = where
        if ds.features is not None:
            check_columns(ds.features, COLUMNS, f"{where} (not in the Pick-a-Pic v2 layout)")
            ds = ds.select_columns(list(COLUMNS))
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[PreferencePair]:
        ds = self._dataset()
        for k, row in enumerate(ds):
            if k == 0 and self.position == 0:
                check_columns(row.keys(), COLUMNS, f"{self._where} (not in the Pick-a-Pic v2 layout)")
            if k < self.position:  # datasets' skip() would skip before the split: skip this shard's own
                continue
            index = k
            self.position = k + 1
            pair = self._pair(index, row)
            if pair is not None:
                yield pair

    def _pair(self, index: int, row: dict) -> PreferencePair | None:
        where = f"{self._where}, rank {self.rank} of {self.world_size}, example {index}"
        kind = "labels"
        try:
            choice = preference(row.get("label_0"), row.get("label_1"))
            if choice is None:
                self.ties += 1
                return None
            kind = "caption"
            caption = check_caption(row.get("caption"), "caption", where)
            kind = "image"
            images = []
            for i in (choice, 1 - choice):
                here = f"{where}, jpg_{i}"
                raw = image_bytes(row.get(f"jpg_{i}"), here)
                images.append(image_tensor(raw, self.image_size, here, max_pixels=self.max_pixels).float() / 255)
        except ValueError as e:
            self._bad(where, kind, str(e))
            return None
        return PreferencePair(index, caption, images[0], images[1])

    def _bad(self, where: str, kind: str, reason: str) -> None:
        self.bad_rows += 1
        self.bad_reasons[kind] += 1
        if self.bad_rows <= MAX_WARNINGS:
            msg = reason if reason.startswith(where) else f"{where}: {reason}"
            log.warning("skipped a bad preference row: %s", msg)
        elif self.bad_rows % WARN_EVERY == 0:
            reasons = dict(self.bad_reasons)
            log.warning("%d bad preference rows skipped so far on rank %d: %s", self.bad_rows, self.rank, reasons)

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps: `position` (resume with start=position) and the counters."""
        return {"position": self.position, "ties": self.ties, "bad_rows": self.bad_rows}
