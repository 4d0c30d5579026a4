"""Experience waiting to be trained on: records in arrival order, consumed pair by pair.

An update takes a fixed number of pairs (so every rank runs the same number of micro-batches);
a record whose pairs straddle two updates is finished by the second.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from pso.codecs import ExperienceRecord


@dataclass
class BufferedRecord:
    id: str  # the queue's id, to acknowledge
    record: ExperienceRecord
    weight: float  # loss weight of its pairs (below 1 when stale and down-weighted)
    next_pair: int = 0


@dataclass
class Take:
    """What one update trains on: record views holding just the pairs taken, their weights per pair,
    and the ids of the records now fully used."""

    records: list[ExperienceRecord]
    pair_weights: list[float]
    finished: list[BufferedRecord]


class PairBuffer:
    def __init__(self) -> None:
        self._records: deque[BufferedRecord] = deque()
        self.pairs = 0  # pairs not yet taken

    def __len__(self) -> int:
        return len(self._records)

    def started(self) -> dict[str, int]:
        """Records partly trained on: id -> pairs taken (a checkpoint keeps it, so that a resumed
        learner skips those pairs when the record comes back)."""
        return {r.id: r.next_pair for r in self._records if r.next_pair}

    def add(self, item: BufferedRecord) -> None:
        self._records.append(item)
        self.pairs += len(item.record.pairs) - item.next_pair

    def take(self, n: int) -> Take:
        if n > self.pairs:
            raise ValueError(f"asked for {n} pairs, {self.pairs} are buffered")
        records, weights, finished = [], [], []
        while n:
            head = self._records[0]
            pairs = head.record.pairs[head.next_pair : head.next_pair + n]
            head.next_pair += len(pairs)
            n -= len(pairs)
            self.pairs -= len(pairs)
            records.append(replace(head.record, pairs=pairs))
            weights += [head.weight] * len(pairs)
            if head.next_pair == len(head.record.pairs):
                finished.append(self._records.popleft())
        return Take(records, weights, finished)
