"""Weight fan-out: N fetcher processes on one node pulling one version from one Redis at once.

    python benchmarks/bench_fanout.py [--url redis://host:port/0] [--procs 1 4 16 64] [--repeat 3]

Per bundle size and N, the same N worker processes (started once, then released together) run:
  raw    redis-py GET of the bundle's bytes from one key (default client), nothing else
  redis  RedisWeightStore.fetch (size + XXH3-128 checks) + decode_weights against the model's spec
  cache  the same through NodeWeightCache in a fresh folder: one process fetches from Redis, the
         others wait on the lock and read (and check) the file
Reported: aggregate GB/s delivered (N x bytes / (last finish - first start)), median and worst
per-fetcher latency, fetches/s (how many actors one Redis feeds a version per second) and the bytes
Redis sent (INFO total_net_output_bytes: N bundles without the cache, one with it).

Sizes (float32, as the learner publishes them; fp16 halves them):
  sdxl-r16  SDXL UNet LoRA rank 16 on attn1/attn2 to_q, to_k, to_v, to_out.0: 60 blocks at width 1280
            and 10 at 640, cross-attention keys/values from 2048: 23,224,320 parameters, 92.9 MB
  flux-r16  FLUX.1 (12B) LoRA rank 16 on the attention projections, width 3072: to_q, to_k, to_v,
            to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out of the 19 double-stream blocks and
            to_q, to_k, to_v of the 38 single-stream blocks: 26,148,864 parameters, 104.6 MB
The workers are forked from this process (they share its imports). N is capped so that N x 3 x size
stays under --memory-gb (a raw GET holds about two copies while it parses, and Redis one in that
client's output buffer); a capped N is reported as it ran. Workers and Redis share this machine's cores: the figures
say where one node's CPUs run out, not a network's limit. Best of --repeat. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import TextIO

import redis
import torch

from pso.codecs import WeightBundle, decode_weights, encode_weights
from pso.config.services import RedisConfig
from pso.redis_server import LocalRedis
from pso.transport.node_cache import NodeWeightCache
from pso.transport.redis import RedisWeightStore, connect

SIZES = {  # name: (LoRA rank, [(in, out, count)] of the adapted linear layers)
    "sdxl-r16": (16, [(1280, 1280, 60 * 6), (2048, 1280, 60 * 2), (640, 640, 10 * 6), (2048, 640, 10 * 2)]),
    "flux-r16": (16, [(3072, 3072, 19 * 8 + 38 * 3)]),
}


def worker(url: str, run: str, raw_key: str, spec: dict, commands, results) -> None:
    """A forked fetcher: one line per command ("mode version folder"), one JSON line back per fetch."""
    config = RedisConfig(url=url, run=run)
    plain, store = redis.Redis.from_url(url, socket_timeout=600), RedisWeightStore(connect(config), config)
    for line in commands:
        mode, version, folder = line.split()
        start = time.monotonic()
        if mode == "raw":
            size = len(plain.get(raw_key))
        else:
            source = store if mode == "redis" else NodeWeightCache(store, folder, keep_versions=1)
            data = source.fetch(int(version))
            size = len(data)
            assert decode_weights(data, spec, checksum=False).version == int(version)
            del data
        results.write(json.dumps({"start": start, "end": time.monotonic(), "bytes": size}) + "\n")
        results.flush()


@dataclass
class Worker:
    pid: int
    commands: TextIO
    results: TextIO


def fork_worker(url: str, run: str, raw_key: str, spec: dict, siblings: list[Worker]) -> Worker:
    """Forked rather than started afresh, so that the N processes share the parent's imports (torch and
    the rest, ~300 MB each when imported 64 times over, more than the bundles themselves); text lines over
    pipes, no pickle."""
    command_r, command_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(command_w)
        os.close(result_r)
        for w in siblings:  # their pipes' parent ends: held here, a sibling would never see its end of input
            w.commands.close()
            w.results.close()
        code = 0
        try:
            worker(url, run, raw_key, spec, os.fdopen(command_r), os.fdopen(result_w, "w"))
        except BaseException:  # noqa: B036 - reported, then the forked child must not return into the parent's code
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(command_r)
    os.close(result_w)
    return Worker(pid, os.fdopen(command_w, "w"), os.fdopen(result_r))


def make_bundle(name: str) -> WeightBundle:
    rank, layers = SIZES[name]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for d_in, d_out, count in layers:
        for i in range(count):
            tensors[f"{d_in}x{d_out}.{i}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
            tensors[f"{d_in}x{d_out}.{i}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    return WeightBundle(version=1, tensors=tensors, kind="lora", base_model=name)


def trial(workers: list[Worker], command: str, client) -> dict:
    sent = client.info("stats")["total_net_output_bytes"]
    for w in workers:
        w.commands.write(command + "\n")
        w.commands.flush()
    results = [json.loads(w.results.readline()) for w in workers]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    latencies = [r["end"] - r["start"] for r in results]
    return {
        "gbps": sum(r["bytes"] for r in results) / wall / 1e9,
        "median_s": statistics.median(latencies),
        "worst_s": max(latencies),
        "fetches_per_s": len(results) / wall,
        "redis_mb": (client.info("stats")["total_net_output_bytes"] - sent) / 1e6,
    }


def bench(url: str, sizes: list[str], procs: list[int], repeat: int, memory_gb: float) -> None:
    config = RedisConfig(url=url, run=f"fanout-{uuid.uuid4().hex[:8]}", keep_versions=1)
    client = connect(config)
    store = RedisWeightStore(client, config)
    raw_key = f"pso:{config.run}:raw"
    rows = []
    for version, name in enumerate(sizes, start=1):
        bundle = make_bundle(name)
        bundle.version = version
        data = encode_weights(bundle)
        store.publish(version, data)
        client.set(raw_key, data)
        spec = {k: (t.dtype, tuple(t.shape)) for k, t in bundle.tensors.items()}
        del bundle
        for wanted in procs:
            n = max(1, min(wanted, int(memory_gb * 1e9 // (3 * len(data)))))
            workers: list[Worker] = []
            for _ in range(n):
                workers.append(fork_worker(url, config.run, raw_key, spec, workers))
            try:
                for mode in ("raw", "redis", "cache"):
                    best = None
                    for _ in range(repeat):
                        with tempfile.TemporaryDirectory(prefix="pso-fanout-") as folder:
                            got = trial(workers, f"{mode} {version} {folder}", client)
                        if best is None or got["gbps"] > best["gbps"]:
                            best = got
                    rows.append((name, len(data) / 1e6, n, mode, best))
                    print(f"{name} N={n} {mode}: {best}", file=sys.stderr, flush=True)
            finally:
                for w in workers:
                    w.commands.close()
                    if os.waitpid(w.pid, 0)[1]:
                        print(f"worker {w.pid} failed (its traceback is above)", file=sys.stderr)
    for key in client.scan_iter(match=f"pso:{config.run}:*"):
        client.delete(key)
    store.close()
    client.close()

    print(f"Redis {url}, best of {repeat}; GB/s: bytes delivered to all N / (last finish - first start)")
    print()
    print("| bundle | N | mode | GB/s | median s | worst s | fetches/s | MB Redis sent |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, mb, n, mode, r in rows:
        print(
            f"| {name} {mb:.1f} MB | {n} | {mode} | {r['gbps']:.2f} | {r['median_s']:.3f} | {r['worst_s']:.3f} "
            f"| {r['fetches_per_s']:.1f} | {r['redis_mb']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis (default: start a local one)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["sdxl-r16", "flux-r16"])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-gb", type=float, default=10.0, help="cap N so that N x 3 x size fits")
    args = parser.parse_args()
    torch.set_num_threads(1)  # no thread pool in the process the workers are forked from
    if args.url:
        bench(args.url, args.sizes, args.procs, args.repeat, args.memory_gb)
    else:
        with LocalRedis() as server:
            bench(server.url, args.sizes, args.procs, args.repeat, args.memory_gb)


if __name__ == "__main__":
    main()
