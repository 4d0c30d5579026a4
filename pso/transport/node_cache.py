"""A per-node cache of weight bundles: the actors of one node share one Redis fetch per version.

    cache = NodeWeightCache(RedisWeightStore(client, config), "/var/cache/pso-weights")

The first actor to want a version takes an exclusive `fcntl` lock on `{run}.lock` in the folder,
fetches the version from the inner store (size and checksum checked there), writes it to
`{run}-v{version}.psow` through a temporary file and `os.replace` (so a reader never sees half a
file), prunes the run's older files, and lets go. The others, blocked on the lock meanwhile, find the
file. Every read of a file is checked against the manifest in Redis (size, then XXH3-128 in the same
single pass that reads it): the file lives on a disk other processes can write to, and the hash costs
little next to a Redis fetch. A file that fails the check is fetched again and replaced (under the
lock: a reader never deletes a file another process may just have written).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from pso.transport import digest
from pso.transport.base import TransportError, WeightStore
from pso.transport.redis import RedisWeightStore

__all__ = ["NodeWeightCache"]

logger = logging.getLogger(__name__)

READ_PIECE_BYTES = 8 * 2**20  # file read and hash granularity


class NodeWeightCache(WeightStore):
    """`inner` with `fetch` served from `folder` when another process on this node fetched the version.

    `keep_versions` files of the run are kept (the newest); the rest are deleted after each write.
    Raises TransportError at construction if the folder cannot be created or written.
    """

    def __init__(self, inner: RedisWeightStore, folder: str | os.PathLike, keep_versions: int) -> None:
        self.inner, self.folder, self.keep_versions = inner, Path(folder), keep_versions
        self.run = inner.config.run
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".{self.run}-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TransportError(
                f"actor.weights_cache_dir {str(self.folder)!r} is not a writable folder: {exc}"
            ) from exc
        self._pattern = re.compile(rf"{re.escape(self.run)}-v(\d+)\.psow(\.tmp\d+)?")

    def path(self, version: int) -> Path:
        return self.folder / f"{self.run}-v{version}.psow"

    def publish(self, version: int, data: bytes, tensors: Mapping[str, dict] | None = None) -> None:
        self.inner.publish(version, data, tensors)

    def latest(self) -> int | None:
        return self.inner.latest()

    def wait_for_notice(self, timeout_s: float) -> int | None:
        return self.inner.wait_for_notice(timeout_s)

    def close(self) -> None:
        self.inner.close()

    def fetch(self, version: int) -> bytearray:
        """The bundle of `version`, from the node's file if it holds what the manifest says, else from
        the inner store (once per node: the lock makes the others wait for the file). A folder that fails
        (a full or read-only disk, permissions) costs the cache, not the actor: the bytes come from Redis."""
        manifest = self.inner.manifest(version)
        try:
            return self._fetch_through(version, manifest)
        except OSError as exc:
            logger.warning("weights cache %s: %s; fetching version %d from Redis directly", self.folder, exc, version)
            return self.inner.fetch(version, manifest)

    def _fetch_through(self, version: int, manifest: Mapping) -> bytearray:
        data, _ = self._read(version, manifest)
        if data is not None:
            return data
        with open(self.folder / f"{self.run}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            data, problem = self._read(version, manifest)  # written while this process waited?
            if data is not None:
                return data
            if problem:
                logger.warning("weights cache %s: %s; fetching it again", self.path(version), problem)
            data = self.inner.fetch(version, manifest)
            self._write(version, data)
            self._prune(keep=self.path(version))
        return data

    def _read(self, version: int, manifest: Mapping) -> tuple[bytearray | None, str | None]:
        """(the file's bytes, None) if its size and checksum are the manifest's, else (None, what is wrong
        with it, or None if there is no file). One pass: each piece is hashed as it is read."""
        try:
            with open(self.path(version), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != manifest["total_bytes"]:
                    return None, f"{size} bytes, manifest says {manifest['total_bytes']}"
                data, hasher = bytearray(size), digest.new()
                view, at = memoryview(data), 0
                while at < size:
                    got = f.readinto(view[at : at + READ_PIECE_BYTES])
                    if not got:
                        return None, f"shrank to {at} bytes while reading"
                    hasher.update(view[at : at + got])
                    at += got
        except FileNotFoundError:
            return None, None
        if hasher.hexdigest() != manifest[digest.FIELD]:
            return None, f"checksum mismatch ({digest.FIELD} differs from the manifest)"
        return data, None

    def _write(self, version: int, data: bytearray) -> None:
        path = self.path(version)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: the actor goes on with the bytes in hand, uncached
            tmp.unlink(missing_ok=True)
            logger.warning("weights cache %s: cannot write %s (%s)", self.folder, path.name, exc)

    def _prune(self, keep: Path) -> None:
        """Under the lock: delete temporary files (their writers died, as a live writer holds the lock) and
        all but the `keep_versions` newest-written files of the run, `keep` (just written) always among them:
        written time, not version number, as a persistent folder may hold higher versions of an earlier run
        of the same name."""
        files = []
        for entry in os.scandir(self.folder):
            match = self._pattern.fullmatch(entry.name)
            if match is None:
                continue
            if match[2]:
                os.unlink(entry.path)
            elif entry.path != str(keep):
                files.append((entry.stat().st_mtime_ns, int(match[1]), entry.path))
        for *_, path in sorted(files)[: max(len(files) - (self.keep_versions - 1), 0)]:
            os.unlink(path)
            logger.debug("weights cache: pruned %s", path)
