"""The two transport contracts the actors and the learner are written against.

ExperienceQueue: an at-least-once queue of experience records (encoded with
`pso.codecs.encode_experience`). A record read by a consumer stays pending until acknowledged;
records pending on a consumer that stopped are reclaimed by another after an idle time.

WeightStore: versioned weight bundles (encoded with `pso.codecs.encode_weights`). A version is
visible to readers only once it is completely written; versions only grow; old ones are pruned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


class TransportError(RuntimeError):
    """The transport cannot be reached or refused an operation (after its own retries)."""


class WeightsUnavailable(TransportError):
    """A weight version is missing, incomplete, or failed its checksum; readers keep what they have."""


@dataclass
class Delivery:
    """One experience record handed to a consumer."""

    id: str  # the queue's id for the record (acknowledge with it)
    data: bytes  # the encoded ExperienceRecord
    fields: dict[str, str] = field(default_factory=dict)  # small searchable facts: version, actor, ...
    times_delivered: int = 1  # > 1 after a reclaim or a consumer restart
    problem: str | None = None  # why the entry cannot be a record (e.g. fields that are not UTF-8): drop it


@dataclass
class QueueStats:
    produced: int  # records ever pushed
    backlog: int  # records pushed and not yet acknowledged (waiting or pending)
    pending: int  # records handed to a consumer and not yet acknowledged

    @property
    def waiting(self) -> int:
        """Records no consumer has read yet: what back-pressure and the autoscaling signal look at
        (pending ones sit in the learner ranks' buffers, which grow with the ranks)."""
        return max(self.backlog - self.pending, 0)


class ExperienceQueue(ABC):
    @abstractmethod
    def push(self, data: bytes, fields: Mapping[str, str]) -> str:
        """Append a record; returns its id."""

    @abstractmethod
    def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        """Up to `count` records for `consumer`: first its own unacknowledged ones (after a restart),
        then new ones, waiting up to `block_s` for any."""

    @abstractmethod
    def ack(self, ids: list[str], counter: str | None = None) -> int:
        """The records were used (or deliberately dropped); they leave the queue, and in the same atomic
        step the run's counter `counter` (e.g. trained, stale) grows by the number acknowledged now, which
        is returned (ids acknowledged before, or unknown, count nothing)."""

    @abstractmethod
    def reclaim(self, consumer: str, min_idle_s: float, count: int, live: Collection[str] = ()) -> list[Delivery]:
        """Take over up to `count` records pending for at least `min_idle_s` on other consumers than
        `consumer` and those in `live` (consumers still running, whose records are theirs however long
        they hold them)."""

    @abstractmethod
    def stats(self) -> QueueStats: ...

    @abstractmethod
    def count(self, name: str, n: int = 1) -> int:
        """Add `n` to the run's counter `name` (e.g. trained, stale); returns the new value."""

    @abstractmethod
    def counters(self) -> dict[str, int]: ...

    @abstractmethod
    def run_marker(self, create: bool = False) -> str | None:
        """The run's marker, a token written once (`create`: write a new one if there is none, and return
        the one held). It goes only with the rest of the run's data (a Redis restarted empty, a flush), so
        a process that finds it gone or changed knows the records, counters and weights it knew are gone."""


class WeightStore(ABC):
    @abstractmethod
    def publish(self, version: int, data: bytes, tensors: Mapping[str, dict] | None = None) -> None:
        """Write the encoded bundle of `version` (greater than every published one) in chunks with a
        manifest (sizes, checksum, and `tensors`: name -> dtype and shape, as WeightBundle.manifest()
        gives), then move the latest pointer to it, then announce it; prune old versions."""

    @abstractmethod
    def latest(self) -> int | None:
        """The newest complete version, or None if none was published."""

    @abstractmethod
    def fetch(self, version: int) -> bytes:
        """The bundle of `version`, checked against its manifest; WeightsUnavailable otherwise."""

    @abstractmethod
    def wait_for_notice(self, timeout_s: float) -> int | None:
        """The version announced next within `timeout_s`, or None (poll `latest` as the fallback)."""
