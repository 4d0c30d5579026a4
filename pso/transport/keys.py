"""The Redis key layout of one run. Every key is under `pso:{run}:`, so runs can share a Redis.

pso:{run}:experience                       stream of experience records (field `data` + string fields)
pso:{run}:counters                         hash of run counters (produced, trained, stale, ...)
pso:{run}:marker                           string: a token the learner writes once (gone: Redis lost the run)
pso:{run}:weights:latest                   string: the newest complete weight version
pso:{run}:weights:versions                 sorted set of versions written (score = version), for pruning
pso:{run}:weights:{version}:manifest       JSON: version, n_chunks, total_bytes, xxh3_128, chunk_bytes, tensors
pso:{run}:weights:{version}:chunk:{i}      bytes of chunk i (i = 0 .. n_chunks - 1)
pso:{run}:weights:notices                  pub/sub channel: a version number when it becomes latest
"""

from __future__ import annotations

from dataclasses import dataclass

EXPERIENCE_GROUP = "learners"


@dataclass(frozen=True)
class Keys:
    run: str

    @property
    def prefix(self) -> str:
        return f"pso:{self.run}:"

    @property
    def experience(self) -> str:
        return f"{self.prefix}experience"

    @property
    def counters(self) -> str:
        return f"{self.prefix}counters"

    @property
    def marker(self) -> str:
        return f"{self.prefix}marker"

    @property
    def weights_latest(self) -> str:
        return f"{self.prefix}weights:latest"

    @property
    def weights_versions(self) -> str:
        return f"{self.prefix}weights:versions"

    @property
    def weights_notices(self) -> str:
        return f"{self.prefix}weights:notices"

    def weights_prefix(self, version: int) -> str:
        return f"{self.prefix}weights:{version}:"

    def manifest(self, version: int) -> str:
        return f"{self.weights_prefix(version)}manifest"

    def chunk(self, version: int, index: int) -> str:
        return f"{self.weights_prefix(version)}chunk:{index}"
