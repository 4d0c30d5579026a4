"""A WeightStore in this process's memory: for a learner that nobody fetches weights from (offline training
without Redis), and for tests. It keeps the newest `keep` versions."""

from __future__ import annotations

from collections.abc import Mapping

from pso.transport.base import WeightStore, WeightsUnavailable


class MemoryWeightStore(WeightStore):
    def __init__(self, keep: int = 1):
        self.keep = keep
        self._versions: dict[int, bytes] = {}

    def publish(self, version: int, data: bytes, tensors: Mapping[str, dict] | None = None) -> None:
        newest = self.latest()
        if newest is not None and version <= newest:
            raise ValueError(f"weight version {version} is not above the newest, {newest}")
        self._versions[version] = data
        for old in sorted(self._versions)[: -self.keep]:
            del self._versions[old]

    def latest(self) -> int | None:
        return max(self._versions, default=None)

    def fetch(self, version: int) -> bytes:
        if version not in self._versions:
            raise WeightsUnavailable(f"weight version {version} is not held (held: {sorted(self._versions)})")
        return self._versions[version]

    def wait_for_notice(self, timeout_s: float) -> int | None:
        return None
