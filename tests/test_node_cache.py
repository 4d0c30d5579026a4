"""The per-node weight cache against a real redis-server: one Redis fetch per version per node."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pso.config.services import ActorConfig, RedisConfig
from pso.redis_server import LocalRedis
from pso.transport.base import TransportError, WeightsUnavailable
from pso.transport.node_cache import NodeWeightCache
from pso.transport.redis import RedisWeightStore, connect

CHUNK = 64 * 1024
WORKER = """
import hashlib
import sys
from pso.config.services import RedisConfig
from pso.transport.node_cache import NodeWeightCache
from pso.transport.redis import RedisWeightStore, connect
url, run, folder, version = sys.argv[1:]
config = RedisConfig(url=url, run=run, chunk_bytes=65536, retry_s=30)
cache = NodeWeightCache(RedisWeightStore(connect(config), config), folder, keep_versions=3)
print(hashlib.sha256(cache.fetch(int(version))).hexdigest())
"""


@pytest.fixture(scope="module")
def server():
    server = LocalRedis(start_timeout_s=60).start()
    yield server
    server.close()


@pytest.fixture
def config(server):
    return RedisConfig(url=server.url, run=f"t-{uuid.uuid4().hex[:12]}", chunk_bytes=CHUNK, retry_s=5.0)


def cache_for(config: RedisConfig, folder: Path, keep_versions: int = 3) -> NodeWeightCache:
    return NodeWeightCache(RedisWeightStore(connect(config), config), folder, keep_versions)


def chunk_reads(server: LocalRedis) -> int:
    """MGET calls the server answered so far: RedisWeightStore.fetch reads chunks with nothing else (one
    MGET per 64 MiB of chunks)."""
    return server.client().info("commandstats").get("cmdstat_mget", {}).get("calls", 0)


def test_processes_on_one_node_share_one_fetch(server, config, tmp_path):
    data = os.urandom(5 * CHUNK + 123)
    publisher = cache_for(config, tmp_path)
    publisher.publish(1, data)
    assert publisher.latest() == 1
    before = chunk_reads(server)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, server.url, config.run, str(tmp_path), "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    digests = [w.communicate(timeout=120)[0].strip() for w in workers]
    assert [w.returncode for w in workers] == [0] * 4
    assert digests == [hashlib.sha256(data).hexdigest()] * 4
    assert chunk_reads(server) - before == 1  # one fetch of the 6 chunks, for the 4 processes
    assert (tmp_path / f"{config.run}-v1.psow").read_bytes() == data


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_file_is_detected_and_fetched_again(server, config, tmp_path, damage, caplog):
    data = os.urandom(3 * CHUNK)
    cache = cache_for(config, tmp_path)
    cache.publish(1, data)
    assert cache.fetch(1) == data
    path = tmp_path / f"{config.run}-v1.psow"
    broken = bytearray(path.read_bytes())
    if damage == "flip":
        broken[CHUNK + 7] ^= 0xFF
    else:
        del broken[-10:]
    path.write_bytes(broken)
    before = chunk_reads(server)
    assert cache_for(config, tmp_path).fetch(1) == data
    assert chunk_reads(server) - before == 1  # fetched again from Redis
    assert path.read_bytes() == data
    assert "checksum mismatch" in caplog.text or "manifest says" in caplog.text
    before = chunk_reads(server)
    assert cache.fetch(1) == data and chunk_reads(server) == before  # repaired: served from the file


def test_old_versions_and_dead_writers_files_are_pruned(config, tmp_path):
    cache = cache_for(config, tmp_path, keep_versions=2)
    other_run = tmp_path / "other-v1.psow"
    other_run.write_bytes(b"another run's file")
    stale_tmp = tmp_path / f"{config.run}-v9.psow.tmp12345"
    stale_tmp.write_bytes(b"half")
    for version in range(1, 5):
        cache.publish(version, b"v%d" % version)
        assert cache.fetch(version) == b"v%d" % version
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(config.run + "-"))
    assert left == [f"{config.run}-v3.psow", f"{config.run}-v4.psow"]
    assert other_run.exists()


def test_files_of_an_earlier_run_of_the_same_name_never_evict_the_new_ones(config, tmp_path):
    cache = cache_for(config, tmp_path, keep_versions=2)
    earlier = tmp_path / f"{config.run}-v99.psow"  # a persistent folder; versions started again at 0
    earlier.write_bytes(b"old")
    os.utime(earlier, (1, 1))
    for version in (1, 2):
        cache.publish(version, b"v%d" % version)
        assert cache.fetch(version) == b"v%d" % version
    assert sorted(p.name for p in tmp_path.glob("*.psow")) == [f"{config.run}-v1.psow", f"{config.run}-v2.psow"]


def test_a_folder_that_fails_costs_the_cache_not_the_actor(config, tmp_path, caplog):
    folder = tmp_path / "cache"
    cache = cache_for(config, folder)
    cache.publish(1, b"one")
    folder.rmdir()
    folder.write_text("not a folder any more")
    assert cache.fetch(1) == b"one"  # from Redis
    assert "fetching version 1 from Redis directly" in caplog.text


def test_a_missing_version_is_refused_and_not_cached(config, tmp_path):
    cache = cache_for(config, tmp_path)
    with pytest.raises(WeightsUnavailable, match="missing manifest"):
        cache.fetch(7)
    assert not list(tmp_path.glob("*.psow*"))


def test_an_unwritable_folder_fails_at_start(config, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(TransportError, match="weights_cache_dir .* is not a writable folder"):
        cache_for(config, not_a_folder / "cache")


def test_config_field():
    assert ActorConfig().weights_cache_dir is None
    assert ActorConfig(weights_cache_dir="/tmp/w").weights_cache_dir == Path("/tmp/w")
