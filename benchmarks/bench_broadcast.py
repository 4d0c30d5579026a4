"""Weight broadcast through Redis: RedisWeightStore publish + fetch + decode against raw SET + GET.

    python benchmarks/bench_broadcast.py [--url redis://host:port/0] [--sizes 10 50 200] [--repeat 3]

For LoRA-sized bundles (float32 random tensors encoded with pso.codecs.encode_weights), times
`publish` (chunks + manifest + commit), `fetch` (chunks, size and xxh3_128 checks) and `decode_weights`
(what an actor does next: tensors loaded in place, checked against the model's spec, the body's
checksum left to fetch's), beside redis-py SET + GET of the same bytes in one key on the same server.
Without --url a local server is started (pso/redis_server.py). Best of --repeat runs, raw and ours
interleaved so that load from other processes hits both. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis
import torch

from pso.codecs import WeightBundle, decode_weights, encode_weights, tensor_spec
from pso.config.services import RedisConfig
from pso.redis_server import LocalRedis
from pso.transport.redis import RedisWeightStore, connect

LORA_RANK = 64
LORA_DIM = 4096  # one (rank, dim) float32 tensor is 1 MiB


def make_bundle(mib: int, version: int) -> WeightBundle:
    """A LoRA-like bundle of `mib` MiB: A/B factor pairs of shape (rank, dim)."""
    generator = torch.Generator().manual_seed(version)
    tensors = {}
    for i in range(mib):
        name = f"unet.block_{i // 2}.attn.to_q.lora_{'AB'[i % 2]}.weight"
        tensors[name] = torch.randn(LORA_RANK, LORA_DIM, generator=generator)
    return WeightBundle(version=version, tensors=tensors, kind="lora", base_model="bench")


def best(times: list[float]) -> float:
    return min(times)


def bench(url: str, sizes: list[int], repeat: int, chunk_bytes: int) -> None:
    config = RedisConfig(url=url, run=f"bench-{uuid.uuid4().hex[:8]}", chunk_bytes=chunk_bytes, keep_versions=1)
    client = connect(config)
    plain = redis.Redis.from_url(url)  # redis-py as it comes
    store = RedisWeightStore(client, config)
    raw_key = f"pso:{config.run}:raw"
    rows = []
    version = 0
    for mib in sizes:
        bundle = make_bundle(mib, mib)
        spec = tensor_spec(bundle.tensors)
        raw_t, pub_t, fetch_t, dec_t, ours_raw_t = [], [], [], [], []
        for _ in range(repeat):
            version += 1
            bundle.version = version
            data = encode_weights(bundle)

            for raw_client, times in ((plain, raw_t), (client, ours_raw_t)):
                start = time.perf_counter()
                raw_client.set(raw_key, data)
                got = raw_client.get(raw_key)
                times.append(time.perf_counter() - start)
                assert got == data
                del got
                raw_client.delete(raw_key)

            start = time.perf_counter()
            store.publish(version, data)
            pub_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            fetched = store.fetch(store.latest())
            fetch_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoded = decode_weights(fetched, spec, checksum=False)
            dec_t.append(time.perf_counter() - start)
            assert decoded.version == version
            del fetched, decoded
        rows.append((len(data) / 1e6, *map(best, (raw_t, pub_t, fetch_t, dec_t, ours_raw_t))))
    for key in client.scan_iter(match=f"pso:{config.run}:*"):  # leave nothing behind on a shared server
        client.delete(key)
    store.close()
    client.close()
    plain.close()

    print(f"Redis {url}, chunk_bytes {chunk_bytes / 2**20:g} MiB, best of {repeat}")
    print("raw: SET + GET of the bytes in one key with a default redis-py client; ours: publish + fetch + decode")
    print("(raw, our client: SET + GET through the client `connect` makes, with its zero-copy command packer)")
    print()
    print("| size MB | raw s | ours s | ours / raw | publish s | fetch s | decode s | raw, our client s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, raw, pub, fetch, dec, ours_raw in rows:
        ours = pub + fetch + dec
        print(
            f"| {size:.1f} | {raw:.3f} | {ours:.3f} | {ours / raw:.2f}x | {pub:.3f} | {fetch:.3f} | {dec:.4f} "
            f"| {ours_raw:.3f} |"
        )
    print()
    for size, raw, pub, fetch, dec, _ in rows:
        print(f"{size:.1f} MB: ours / raw = {(pub + fetch + dec) / raw:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis (default: start a local one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200], help="bundle sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-mib", type=float, default=8.0, help="RedisConfig.chunk_bytes in MiB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunk_bytes = int(args.chunk_mib * 2**20)
    if args.url:
        bench(args.url, args.sizes, args.repeat, chunk_bytes)
    else:
        with LocalRedis() as server:
            bench(server.url, args.sizes, args.repeat, chunk_bytes)


if __name__ == "__main__":
    main()
