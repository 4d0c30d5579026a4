"""Reward-server throughput and latency under concurrency, against the raw batched model.

    python benchmarks/bench_reward_server.py [--config FILE] [--clients 1 8 64] [--images-per-request 16]
    python benchmarks/bench_reward_server.py --random pickscore --full --device cuda:0 --dtype float16 --image-size 512

1. Raw: in this process, the same models' batched forward (`score_batch` at their max batch size,
   inputs already preprocessed): images/s.
2. Served: `pso reward-server` in its own process on a free port; N concurrent keep-alive clients
   (asyncio streams) send safetensors requests; images/s and p50/p99 request latency, counting the
   requests that finish inside a window that opens after a warm-up and closes while every client
   still has a request in flight (the server is never seen filling up or draining).
Each level alternates the two in `--rounds` short slices (raw, served, raw, ..., served, raw), and
each served slice is divided by the mean of the raw slices on either side of it: a shared machine's
speed drifts by tens of percent within a minute, which one raw figure would put into the ratio.
The raw models stay loaded here beside the server's (on a GPU, both hold a copy). Prints a markdown
table.
With no config: the built-in tiny-world reward on CPU;
`--random KIND` serves a random model of that kind instead (tiny, or `--full` the published size).
Both sides use the torch thread count given by --threads (default 1: the 2-core CI machine gives
the other core to the clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def scene_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n tiny-world scenes as uint8 (n, size, size, 3) (upscaled, nearest, from 32 px) and their prompts."""
    from pso.tiny.world import IMAGE_SIZE, all_scenes, draw

    rng = np.random.default_rng(seed)
    scenes = [all_scenes()[i] for i in rng.integers(len(all_scenes()), size=n)]
    images = torch.from_numpy(np.stack([draw(s, rng) for s in scenes]))
    if size != IMAGE_SIZE:
        images = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(size, size), mode="nearest")
        images = images.permute(0, 2, 3, 1).contiguous()
    return images, [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]


def random_model_config(kind: str, folder: Path, full: bool, device: str, dtype: str):
    """A reward-server config serving one random model of `kind`, written under `folder`."""
    from pso.config.reward_server import RewardServerConfig
    from reward_server.backends import clip_rewards, image_reward

    if kind == "image-reward":
        path = str(image_reward.build_random(folder, full=full))
        model = {"kind": kind, "checkpoint": path, "tokenizer": path}
    else:
        path = str(clip_rewards.build_random(kind, folder, full=full))
        sources = {"hpsv2": ("checkpoint", "processor"), "aesthetic": ("model", "head")}.get(
            kind, ("model", "processor")
        )
        model = {"kind": kind, **dict.fromkeys(sources, path)}
    return RewardServerConfig(models=[{**model, "dtype": dtype}], devices=[device])


class RawForward:
    """Every served model, built once in this process, with a preprocessed batch of its max batch size:
    their batched forward on ready inputs is the server's ceiling."""

    def __init__(self, config, images: torch.Tensor, prompts: list[str]):
        from reward_server.backends import build_backend

        self.models = []
        for spec in config.models:
            model = build_backend(spec, config.devices[0])
            idx = [i % len(images) for i in range(spec.max_batch)]
            pixels = torch.stack([model.preprocess(images[i]) for i in idx])
            self.models.append((model, pixels, [prompts[i] for i in idx]))
            with torch.inference_mode():
                model.score_batch(pixels, self.models[-1][2])  # warm-up

    @torch.inference_mode()
    def images_per_s(self, seconds: float) -> float:
        """Images/s through all the models (each image scored by every one), over `seconds` in all."""
        per_image = 0.0
        for model, pixels, prompts in self.models:
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / len(self.models):
                model.score_batch(pixels, prompts)
                done += len(pixels)
            per_image += (time.perf_counter() - start) / done
        return 1 / per_image


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    """One HTTP/1.1 keep-alive POST on an open connection; the response body. A bare client, so that the
    load generator's own overhead (it shares the machine) stays small beside the server's."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(next(h.split(b":", 1)[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    body = await reader.readexactly(length)
    if status != 200:
        raise RuntimeError(f"{status}: {body[:300]!r}")
    return body


async def load(port: int, bodies: list[bytes], per_request: int, clients: int, seconds: float) -> tuple[float, list]:
    """N clients posting for `seconds` after a short warm-up: images/s and each request's latency (s)."""
    requests = [
        b"POST /v1/score/safetensors HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    ]
    done: list[tuple[float, float]] = []  # (finish time, latency) of each request

    async def client(k: int, until: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < until:
            t = time.perf_counter()
            await post(reader, writer, requests[i % len(requests)])
            now = time.perf_counter()
            done.append((now, now - t))
            i += clients
        writer.close()

    # Counted: the requests that finish inside the window, which opens after a warm-up and closes while
    # every client still has a request in flight, so the server is never seen filling up or draining.
    opens = time.perf_counter() + min(1.0, seconds / 5)
    closes = opens + seconds
    await asyncio.gather(*(client(k, closes) for k in range(clients)))
    latencies = [lat for t, lat in done if opens <= t < closes]
    return len(latencies) * per_request / seconds, latencies


def measure_level(
    port: int,
    bodies: list[bytes],
    per_request: int,
    clients: int,
    seconds: float,
    rounds: int,
    raw: RawForward,
    raw_before: float,
) -> tuple[dict, float]:
    """One concurrency level as `rounds` served slices, each between two raw slices (the first is
    `raw_before`, the previous level's last); the level's row and its last raw figure."""  # fmt: skip
    raws, served, latencies = [raw_before], [], []
    for _ in range(rounds):
        rate, lat = asyncio.run(load(port, bodies, per_request, clients, seconds / rounds))
        served.append(rate)
        latencies += lat
        raws.append(raw.images_per_s(seconds / rounds))
    beside = [(a + b) / 2 for a, b in zip(raws, raws[1:])]  # the raw figure for each served slice
    lat = np.array(latencies) * 1000
    row = {
        "clients": clients,
        "images_per_s": float(np.mean(served)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "raw_images_per_s": float(np.mean(beside)),
        "ratio": float(np.mean(served) / np.mean(beside)),
        "slices": [{"served": s, "raw": r} for s, r in zip(served, beside)],
    }
    return row, raws[-1]


def wait_for_server(server: subprocess.Popen, client, log: Path, timeout: float = 600) -> None:
    """Until the server is ready; its log, and an error, if it exits or times out first."""
    from reward_server.client import RewardServerError

    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            client.wait_ready(timeout=2)
            return
        except RewardServerError:
            continue
    print(log.read_text()[-5000:], file=sys.stderr)
    raise SystemExit(f"the reward server {'exited' if server.poll() is not None else 'did not get ready'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="config with a reward_server section (default: tiny reward)")
    parser.add_argument(
        "--random",
        choices=["image-reward", "pickscore", "hpsv2", "clip-score", "aesthetic"],
        help="serve a random model",
    )
    parser.add_argument("--full", action="store_true", help="with --random: the published size, not a tiny one")
    parser.add_argument("--device", default="cpu", help="with --random (default cpu)")
    parser.add_argument("--dtype", default="float32", help="with --random (default float32)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square test images (default 32)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--images-per-request", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="served time measured per concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="served slices per level, each between raw slices")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, raw and server alike")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import save

    from pso.config import dump_config, load_config
    from pso.config.schema import PSOConfig
    from pso.net import free_port
    from reward_server.client import RewardClient

    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    t0 = time.perf_counter()
    if args.random:
        config = random_model_config(args.random, tmp / "model", args.full, args.device, args.dtype)
        print(f"built a random {args.random} model in {time.perf_counter() - t0:.0f} s", flush=True)
        args.config = tmp / "config.yaml"
        args.config.write_text(dump_config(PSOConfig(reward_server=config)))
    config = load_config(PSOConfig, args.config).reward_server
    images, prompts = scene_images(512, args.image_size)

    raw = RawForward(config, images, prompts)
    raw_now = raw.images_per_s(args.seconds / args.rounds)
    names = ", ".join(m.model_name for m in config.models)
    print(f"raw batched forward: {raw_now:,.0f} images/s ({names})", flush=True)

    k = args.images_per_request
    bodies = [
        save({"images": images[i : i + k].contiguous()}, metadata={"prompts": json.dumps(prompts[i : i + k])})
        for i in range(0, len(images) - k + 1, k)
    ]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PSO_REWARD_TOKEN": ""}
    cfg_args = ["--config", str(args.config)] if args.config else []
    with open(tmp / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pso.cli", "reward-server", *cfg_args, "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_server(server, RewardClient(f"http://127.0.0.1:{port}"), tmp / "server.log")
            print(f"server ready after {time.perf_counter() - t0:.0f} s", flush=True)
            rows = []
            for c in args.clients:
                row, raw_now = measure_level(port, bodies, k, c, args.seconds, args.rounds, raw, raw_now)
                rows.append(row)
                print(f"{c} clients: {row['images_per_s']:,.0f} images/s, {row['ratio']:.2f} of raw", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)

    device = torch.cuda.get_device_name() if config.devices[0].startswith("cuda") else "CPU"
    print(
        f"\n{k} images of {args.image_size} px per request, {args.seconds:g} s per level in {args.rounds} slices "
        f"between raw ones, {args.threads} torch thread(s), {device}\n"
    )
    print("| clients | served images/s | p50 ms | p99 ms | raw images/s beside it | served / raw |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['clients']} | {row['images_per_s']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['raw_images_per_s']:,.0f} | {row['ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"levels": rows}, indent=2))


if __name__ == "__main__":
    main()
