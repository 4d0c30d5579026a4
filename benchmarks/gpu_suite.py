"""GPU suite: weight broadcast, learner, actor and reward-server benchmarks on a random SDXL- or FLUX.1-size model.

    python benchmarks/gpu_suite.py [--arch sdxl|flux] [--device cuda:0] [--ranks 16 32] [--out runs/gpu-suite.md]
    python benchmarks/gpu_suite.py --smoke [--arch flux] [--out runs/gpu-suite-smoke.md]  # CPU wiring check, toy sizes

One process, one GPU (cuda:0: choose it with CUDA_VISIBLE_DEVICES), about 5 minutes on an H100/H200
(every stage is time-boxed; the whole suite stays under --budget-s, 570 s by default). It builds a
random-initialised SDXL-Turbo-format pipeline (pso/random_arch.py: SDXL's own 2.57B-parameter
UNet and VAE, SDXL-width 2-layer text encoders, saved in float16; initialised on the GPU in seconds)
and loads it as family sdxl-turbo at 512 px, 4 steps (Euler ancestral: 3 stochastic transitions to
train on), float16 UNet with float32 LoRA adapters on to_q/to_k/to_v/to_out.0, the VAE decoding in
float32 (SDXL's force_upcast: the policy upcasts it, as in production, since SDXL's VAE overflows in
float16). Then, for each LoRA rank (--ranks, default 16 and 32), on one loaded policy:

1. learner: `LearnerEngine.update` (DeepSpeed ZeRO-0, learner.precision fp32: DeepSpeed leaves the
   dtypes alone, world size 1) against the bare PyTorch loop (`pso.loop.update_on_pairs`), each on
   its own copy of the policy, on the same online-PSO batch of 8 pairs sampled from the policy
   (`sample_groups`), in micro-batches of 2 pairs (12 samples per UNet call; halved on a CUDA
   out-of-memory error); alternating, median pairs/s (as bench_learner.py). `--precision bf16`
   trains a bfloat16 UNet under DeepSpeed bf16 instead.
2. weight broadcast: the LoRA bundle the learner's engine exports (r16: 1120 tensors, 93 MB;
   r32: 186 MB, float32): `encode_weights`, then `RedisWeightStore.publish` + `fetch` +
   `decode_weights` against redis-py SET + GET of the same bytes on a local Redis (as
   bench_broadcast.py, best of N); the actor's `load_weights` into the policy is timed too.
3. actor: pairs/s of `Actor.step` (sample, decode, score on `pso reward-server` over HTTP, pair,
   encode, push to Redis) against the bare sampler (sample, decode, score in-process with the same
   reward model, pair), as bench_actor.py; 4 prompts x 2 images per batch. The reward is a random
   PickScore at its published size (CLIP ViT-H/14 in float16, `clip_rewards.build_random(full=True)`),
   which resizes the 512 px images to 224 px as the real one does; served in its own process on the
   same GPU.
4. reward server: benchmarks/bench_reward_server.py as a subprocess, `--random pickscore --full
   --device cuda:0 --dtype float16 --image-size 512`: served images/s at 1, 8 and 64 clients
   against the raw batched forward.

`--arch flux` runs the same stages on a random-initialised FLUX.1-class pipeline (pso/random_arch.py
"flux"): FLUX.1-schnell's own FluxTransformer2DModel (19 double- and 38 single-stream blocks, width
3072: 11.89B parameters, checked against the published count), FLUX's 16-channel VAE (no quant convs,
scaling 0.3611, shift 0.1159), a CLIP-L-width (768, the pooled vector) and a T5-XXL-width (d_model 4096)
text encoder of 2 layers each, with offline tokenizers; initialised on the GPU directly in bfloat16 and
saved as safetensors (24 GB of transformer weights). It loads as family flux-schnell at 512 px, 4 steps
of flow-matching Euler at eta 0.7 (3 stochastic transitions), bfloat16 transformer with gradient
checkpointing and float32 LoRA adapters on both attention streams (to_q/to_k/to_v/to_out.0 and
add_q_proj/add_k_proj/add_v_proj/to_add_out), the VAE decoding in bfloat16. The learner holds two copies
of the transformer (the bare loop's policy and the engine's), so it needs one 80 GB GPU (H100/H200),
and the disk room for the 24 GB folder; each load of it takes a while, so a second rank may run out
of the time box (`--ranks 16` for one).

Prints one markdown table (benchmark, setting, figure, reference, ratio, goal) and writes it to
--out, with the numbers as JSON beside it (--json); the JSON keeps each stage's GPU memory (allocated
and peak since the rank's policy was loaded, GiB). `--smoke` runs the same code on the CPU at toy
sizes (a 64 px SDXL-layout model, or with --arch flux the FLUX layout with 1 double + 1 single block at
small widths; a tiny random PickScore) in under a minute. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

STAGES = ("learner", "broadcast", "actor", "reward-server")
GOALS = {
    "learner": 0.10,  # bench_learner.py: overhead under 10%
    "actor": 0.15,  # bench_actor.py: overhead under 15%
    "reward-server": 0.8,  # docs/results.md: at least 0.8 of raw at 64 clients
    "broadcast": 1.5,  # the goal: publish + fetch + decode within 1.5x raw SET + GET
}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Settings:
    """Sizes and time boxes of one suite run (FULL on a GPU, SMOKE on a CPU)."""

    size: str  # "full" or "smoke"
    image_size: int
    dtype: str  # the policy's dtype
    precision: str  # learner.precision (fp32: DeepSpeed leaves dtypes alone; LoRA adapters are float32)
    num_steps: int
    pairs: int  # pairs per learner update
    pairs_per_step: int  # micro-batch; one UNet call holds pairs_per_step x 2 x (num_steps - 1) samples
    learner_repeat: int
    learner_cap_s: float
    broadcast_repeat: int
    broadcast_cap_s: float
    group_size: int
    prompts_per_batch: int
    sample_batch: int
    actor_batches: int
    actor_cap_s: float  # per side (bare, actor)
    reward_full: bool
    reward_dtype: str
    rs_image_size: int
    rs_seconds: float
    rs_clients: tuple[int, ...]
    rs_timeout_s: float
    budget_s: float
    reserve_s: float  # kept back for the reward-server stage while the per-rank stages run
    min_s: dict = field(default_factory=dict)  # least time left (beyond the reserve) to start a stage
    arch: str = "sdxl"  # the random architecture (pso.random_arch.ARCHS)
    # the random SDXL pipeline samples as SDXL-Turbo: 512 px, Euler ancestral, 1-4 steps
    family: str = "sdxl-turbo"
    model_dtype: str = "float16"  # the random pipeline's weights as saved (the policy loads them in `dtype`)
    eta: float | None = None  # the sampler's noise level (None: the family's)
    gradient_checkpointing: bool = False


FULL = Settings(
    size="full",
    image_size=512,
    dtype="float16",
    precision="fp32",
    num_steps=4,
    pairs=8,
    pairs_per_step=2,
    learner_repeat=5,
    learner_cap_s=60,
    broadcast_repeat=3,
    broadcast_cap_s=20,
    group_size=2,
    prompts_per_batch=4,
    sample_batch=8,
    actor_batches=8,
    actor_cap_s=25,
    reward_full=True,
    reward_dtype="float16",
    rs_image_size=512,
    rs_seconds=5,
    rs_clients=(1, 8, 64),
    rs_timeout_s=200,
    budget_s=570,
    reserve_s=150,
    min_s={"learner": 45, "broadcast": 8, "actor": 30, "reward-server": 90},
)
SMOKE = Settings(
    size="smoke",
    image_size=64,
    dtype="float32",
    precision="fp32",
    num_steps=4,
    pairs=4,
    pairs_per_step=2,
    learner_repeat=3,
    learner_cap_s=15,
    broadcast_repeat=2,
    broadcast_cap_s=5,
    group_size=2,
    prompts_per_batch=2,
    sample_batch=4,
    actor_batches=3,
    actor_cap_s=10,
    reward_full=False,
    reward_dtype="float32",
    rs_image_size=64,
    rs_seconds=1,
    rs_clients=(1, 4),
    rs_timeout_s=90,
    budget_s=170,
    reserve_s=45,
    min_s={"learner": 5, "broadcast": 2, "actor": 5, "reward-server": 20},
    arch="sdxl-smoke",
)
# --arch flux: FLUX.1-schnell's flow-matching Euler at eta 0.7 (stochastic transitions to train on), bfloat16
# transformer with float32 LoRA adapters on both attention streams, gradient checkpointing (12B parameters)
_FLUX = dict(family="flux-schnell", model_dtype="bfloat16", eta=0.7, gradient_checkpointing=True)
FLUX_FULL = replace(FULL, arch="flux", dtype="bfloat16", **_FLUX)
FLUX_SMOKE = replace(SMOKE, arch="flux-smoke", **_FLUX)
# --arch: what the random model is called and what its denoiser is
MODELS = {"sdxl": ("SDXL", "UNet"), "flux": ("FLUX.1-class", "transformer")}
SETTINGS = {("sdxl", False): FULL, ("sdxl", True): SMOKE, ("flux", False): FLUX_FULL, ("flux", True): FLUX_SMOKE}


@dataclass
class Row:
    benchmark: str
    setting: str
    figure: str = ""
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: bool | None = None
    data: dict = field(default_factory=dict)  # the numbers behind the strings, for the JSON
    error: str | None = None

    def cells(self) -> list[str]:
        goal = self.goal
        if self.met is not None:
            goal = f"{goal}: {'met' if self.met else 'not met'}"
        if self.error:
            return [self.benchmark, self.setting, f"**{self.error}**", "", "", goal]
        return [self.benchmark, self.setting, self.figure, self.reference, self.ratio, goal]


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


LOG: list[tuple[float, str]] = []  # every progress line with its time, for the JSON


def log(clock: Clock, message: str) -> None:
    LOG.append((round(clock.elapsed(), 1), message))
    print(f"[{clock.elapsed():6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_memory(device: torch.device) -> dict:
    """Allocated now and peak since the last reset, GiB (empty on a CPU)."""
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {
        "allocated_gib": round(torch.cuda.memory_allocated(device) / gib, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
    }


def param_count(n: int) -> str:
    """A parameter count: 2.567B, or 0.073M for the smoke sizes."""
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def overhead(ratio: float) -> str:
    return f"{ratio:.3f} ({100 * (ratio - 1):+.1f}%)"


class Suite:
    def __init__(self, args: argparse.Namespace, s: Settings, clock: Clock, work: Path):
        self.args, self.s, self.clock, self.work = args, s, clock, work
        self.device = torch.device(args.device)
        self.model_dir: Path | None = None
        self.reward_dir: Path | None = None
        self.reward_url: str | None = None
        self.redis_url: str | None = None
        self._reward_backend = None
        self.info: dict = {}

    # ----- setup -----
    def build_model(self) -> None:
        from pso.random_arch import ARCHS, build_random_pipeline, count_folder_parameters

        s, (name, backbone) = self.s, MODELS[self.args.arch]
        if self.args.model_dir:
            self.model_dir = Path(self.args.model_dir)
            log(self.clock, f"using the model in {self.model_dir}")
        else:
            self.model_dir = self.work / self.args.arch
            log(self.clock, f"building a random {s.size} {name} pipeline on {self.device} ...")
            build_random_pipeline(self.model_dir, s.arch, image_size=s.image_size, device=str(self.device),
                                  dtype=getattr(torch, s.model_dtype))  # fmt: skip
            free_memory(self.device)
        n_params = count_folder_parameters(self.model_dir)
        self.info.update(family=s.family, model_dir=str(self.model_dir))
        self.info[f"{backbone.lower()}_parameters"] = n_params
        log(self.clock, f"model ready: {backbone} {param_count(n_params)} parameters")
        published = ARCHS[self.args.arch].params
        if s.size == "full" and abs(n_params / published - 1) > 0.01:
            raise RuntimeError(f"the {backbone} has {n_params:,} parameters, {name}'s has {published:,}")

    def build_reward_model(self) -> None:
        from reward_server.backends.clip_rewards import build_random

        self.reward_dir = self.work / "pickscore"
        size = "published-size (ViT-H/14)" if self.s.reward_full else "tiny"
        log(self.clock, f"building a random {size} PickScore ...")
        build_random("pickscore", self.reward_dir, full=self.s.reward_full)

    def reward_spec(self):
        from pso.config.reward_server import PickScoreSpec

        return PickScoreSpec(model=str(self.reward_dir), processor=str(self.reward_dir), dtype=self.s.reward_dtype)

    def subprocess_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update(OMP_NUM_THREADS=str(self.args.reward_threads), PSO_REWARD_TOKEN="")
        return env

    def start_reward_server(self):
        """`pso reward-server` serving the random PickScore on this device, in its own process (a launcher Child)."""
        from launcher.processes import Child
        from pso.config import dump_config
        from pso.config.reward_server import RewardServerConfig
        from pso.config.schema import PSOConfig
        from pso.net import free_port

        port = free_port()
        config = RewardServerConfig(port=port, models=[self.reward_spec()], devices=[str(self.device)])
        path = self.work / "reward-server.yaml"
        path.write_text(dump_config(PSOConfig(reward_server=config)))
        self.reward_url = f"http://127.0.0.1:{port}"
        return Child(
            "reward-server", "pso.cli", ["reward-server", "-c", str(path)], self.work / "reward-server.log",
            self.subprocess_env(),
        )  # fmt: skip

    def in_process_reward(self):
        """The same reward model in this process, for the bare sampler (loaded once)."""
        if self._reward_backend is None:
            from reward_server.backends import build_backend

            self._reward_backend = build_backend(self.reward_spec(), self.device)
        return self._reward_backend

    def drop_in_process_reward(self) -> None:
        self._reward_backend = None
        free_memory(self.device)

    def load_policy(self, rank: int):
        from pso.config.schema import ModelConfig
        from pso.policy import DistilledPolicy

        cfg = ModelConfig(
            family=self.s.family,
            pretrained=str(self.model_dir),
            num_steps=self.s.num_steps,
            eta=self.s.eta,
            resolution=self.s.image_size,
            dtype=self.s.dtype,
            device=str(self.device),
            local_files_only=True,
        )
        policy = DistilledPolicy.from_config(cfg, self.finetune(rank))
        self.info["lora_targets"] = policy.lora_targets
        return policy

    def finetune(self, rank: int):
        from pso.config.schema import LoraFinetune

        return LoraFinetune(rank=rank, gradient_checkpointing=self.s.gradient_checkpointing)

    def prompts(self) -> list[str]:
        from pso.prompts import GENERAL, load_prompts

        return load_prompts(GENERAL, [])

    def time_left(self, stage: str, final: bool = False) -> float:
        """Seconds this stage may use: what is left beyond the reward-server stage's reserve (0: skip it)."""
        reserve = self.s.reserve_s if "reward-server" in self.args.stages and not final else 0
        left = self.clock.left() - reserve
        return left if left >= self.s.min_s[stage] else 0.0

    # ----- 1. learner -----
    def learner(self, rank: int, bare_policy, pairs_per_step: int) -> tuple[Row, object]:
        from learner.engine import LearnerEngine
        from pso.config.schema import OnlinePSOLoss, OptimConfig, PSOConfig
        from pso.config.services import LearnerConfig
        from pso.loop import make_optimizer, update_on_pairs
        from pso.objectives import PairBatch
        from pso.sampling import sample_groups

        s, until = self.s, time.perf_counter() + min(self.s.learner_cap_s, self.time_left("learner"))
        cfg = PSOConfig(loss=OnlinePSOLoss(), optim=OptimConfig(pairs_per_step=pairs_per_step))
        prompts = [self.prompts()[i] for i in range(s.pairs)]
        traj = sample_groups(bare_policy, prompts, 2, 0, batch_size=s.sample_batch, decode=False)
        batch = PairBatch.from_trajectories(
            traj, [(2 * i, 2 * i + 1) for i in range(s.pairs)], bare_policy.encode(prompts)
        )
        del traj
        optimizer = make_optimizer(bare_policy, cfg)
        engine = LearnerEngine(
            self.load_policy(rank), cfg.loss, cfg.optim, LearnerConfig(zero_stage=0, precision=s.precision)
        )
        loops: dict[str, Callable[[torch.Generator], dict]] = {
            "bare": lambda gen: update_on_pairs(bare_policy, optimizer, batch, cfg, gen),
            "engine": lambda gen: engine.update(batch, gen=gen),
        }
        times: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(s.learner_repeat + 1):  # round 0 warms up; at least one round is measured
            if r >= 2 and time.perf_counter() > until:
                break
            for name, run in loops.items():
                sync(self.device)
                start = time.perf_counter()
                run(torch.Generator().manual_seed(r))
                sync(self.device)
                if r:
                    times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        bundle = engine.export_weights(1)
        export_s = time.perf_counter() - start
        bare_s, engine_s = statistics.median(times["bare"]), statistics.median(times["engine"])
        ratio = engine_s / bare_s
        transitions = s.num_steps - 1
        data = {
            "rank": rank,
            "pairs_per_update": s.pairs,
            "pairs_per_step": pairs_per_step,
            "samples_per_unet_call": pairs_per_step * 2 * transitions,
            "rounds": len(times["bare"]),
            "bare_s": times["bare"],
            "engine_s": times["engine"],
            "engine_pairs_per_s": s.pairs / engine_s,
            "bare_pairs_per_s": s.pairs / bare_s,
            "time_ratio": ratio,
            "export_s": export_s,
            **gpu_memory(self.device),
        }
        row = Row(
            "learner update",
            f"LoRA r{rank}, ZeRO-0 {s.precision} ({s.dtype} {MODELS[self.args.arch][1]}"
            f"{', gradient checkpointing' if s.gradient_checkpointing else ''}), online-pso {s.num_steps} steps "
            f"{'' if s.eta is None else f'at eta {s.eta:g} '}({transitions} transitions), {s.pairs} pairs/update "
            f"in micro-batches of {pairs_per_step}, "
            f"median of {len(times['bare'])}",
            f"LearnerEngine {s.pairs / engine_s:.2f} pairs/s",
            f"bare PyTorch {s.pairs / bare_s:.2f} pairs/s",
            f"time / bare {overhead(ratio)}",
            f"overhead < {GOALS['learner']:.0%}",
            ratio - 1 < GOALS["learner"],
            data,
        )
        return row, bundle

    # ----- 2. broadcast -----
    def broadcast(self, rank: int, bundle, policy, source: str) -> Row:
        import redis

        from pso.codecs import decode_weights, encode_weights
        from pso.config.services import RedisConfig
        from pso.transport.redis import RedisWeightStore, connect

        s, until = self.s, time.perf_counter() + min(self.s.broadcast_cap_s, self.time_left("broadcast"))
        config = RedisConfig(url=self.redis_url, run=f"suite-bcast-{uuid.uuid4().hex[:8]}", keep_versions=1)
        client = connect(config)
        plain = redis.Redis.from_url(self.redis_url)  # redis-py as it comes
        store = RedisWeightStore(client, config)
        raw_key = f"pso:{config.run}:raw"
        spec = policy.weight_spec()  # what an actor checks a bundle against
        t: dict[str, list[float]] = {k: [] for k in ("encode", "raw", "publish", "fetch", "decode", "load")}
        try:
            for version in range(1, s.broadcast_repeat + 1):
                if version >= 2 and time.perf_counter() > until:
                    break
                bundle.version = version
                start = time.perf_counter()
                data = encode_weights(bundle)
                t["encode"].append(time.perf_counter() - start)
                start = time.perf_counter()
                plain.set(raw_key, data)
                got = plain.get(raw_key)
                t["raw"].append(time.perf_counter() - start)
                assert got == data
                del got
                plain.delete(raw_key)
                start = time.perf_counter()
                store.publish(version, data)
                t["publish"].append(time.perf_counter() - start)
                start = time.perf_counter()
                fetched = store.fetch(store.latest())
                t["fetch"].append(time.perf_counter() - start)
                start = time.perf_counter()
                decoded = decode_weights(fetched, spec)
                t["decode"].append(time.perf_counter() - start)
                assert decoded.version == version
                start = time.perf_counter()
                policy.load_weights(decoded)
                sync(self.device)
                t["load"].append(time.perf_counter() - start)
                del fetched, decoded
        finally:
            for key in client.scan_iter(match=f"pso:{config.run}:*"):
                client.delete(key)
            store.close()
            client.close()
            plain.close()
        best = {k: min(v) for k, v in t.items()}
        ours = best["publish"] + best["fetch"] + best["decode"]
        ratio = ours / best["raw"]
        mb = len(data) / 1e6
        data_out = {"rank": rank, "bundle_mb": mb, "tensors": len(bundle.tensors), "source": source, "runs": t,
                    "best_s": best, "ours_s": ours, "ratio": ratio}  # fmt: skip
        return Row(
            "weight broadcast",
            f"LoRA r{rank} bundle ({source}), {len(bundle.tensors)} tensors, {mb:.1f} MB, chunks of "
            f"{config.chunk_bytes / 2**20:g} MiB, best of {len(t['raw'])}",
            f"publish+fetch+decode {ours:.3f} s ({best['publish']:.3f} + {best['fetch']:.3f} + "
            f"{best['decode']:.3f}); encode {best['encode']:.3f} s, load into policy {best['load']:.3f} s",
            f"raw SET+GET {best['raw']:.3f} s",
            f"{ratio:.2f}x raw",
            f"within {GOALS['broadcast']:g}x raw",
            ratio <= GOALS["broadcast"],
            data_out,
        )

    # ----- 3. actor -----
    def actor(self, rank: int, policy) -> Row:
        from actors.actor import Actor
        from pso.config.schema import PSOConfig, SamplingConfig
        from pso.config.services import ActorConfig, RedisConfig
        from pso.loop import round_seed
        from pso.pairing import pairs_in_groups
        from pso.sampling import sample_groups
        from pso.transport.redis import RedisExperienceQueue, RedisWeightStore, connect
        from reward_server.client import RewardClient

        s = self.s
        cap = min(s.actor_cap_s, self.time_left("actor") / 2)
        g, n = s.group_size, s.prompts_per_batch
        cfg = PSOConfig(
            model=policy.model_cfg,
            finetune=self.finetune(rank),
            sampling=SamplingConfig(group_size=g, batch_size=s.sample_batch),
            redis=RedisConfig(url=self.redis_url, run=f"suite-actor-{uuid.uuid4().hex[:8]}"),
            actor=ActorConfig(reward_url=self.reward_url, prompts_per_batch=n, max_backlog=100_000),
        )
        prompts = self.prompts()
        rng = np.random.default_rng(rank)
        batches = [[prompts[i] for i in rng.integers(len(prompts), size=n)] for _ in range(s.actor_batches + 1)]
        reward = self.in_process_reward()
        parts = {"sample_s": 0.0, "score_s": 0.0}

        def bare(b: int) -> int:
            start = time.perf_counter()
            traj = sample_groups(policy, batches[b], g, round_seed(0, b), batch_size=s.sample_batch)
            # as RewardClient.score sends them: uint8 (N, H, W, 3) on the CPU
            images = (traj.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
            mid = time.perf_counter()
            scores = reward.score(list(images), [p for p in batches[b] for _ in range(g)])
            parts["sample_s"] += mid - start
            parts["score_s"] += time.perf_counter() - mid
            return len(pairs_in_groups(scores, g, cfg.pairing))

        bare(0)  # warm-up
        parts.update(sample_s=0.0, score_s=0.0)
        start, bare_pairs, bare_batches = time.perf_counter(), 0, 0
        for b in range(1, s.actor_batches + 1):
            if b >= 2 and time.perf_counter() - start > cap:
                break
            bare_pairs += bare(b)
            bare_batches += 1
        bare_s = time.perf_counter() - start

        client = connect(cfg.redis)
        reward_client = RewardClient(self.reward_url, token="")
        weights = RedisWeightStore(client, cfg.redis)
        try:
            actor = Actor(cfg, policy, prompts, RedisExperienceQueue(client, cfg.redis), weights, reward_client,
                          actor_id=f"suite-r{rank}")  # fmt: skip
            stop = threading.Event()
            actor.step(stop)  # warm-up
            pairs0, wait0 = actor.stats.pairs, actor.stats.reward_wait_s
            start, actor_batches = time.perf_counter(), 0
            for b in range(s.actor_batches):
                if b >= 1 and time.perf_counter() - start > cap:
                    break
                actor.step(stop)
                actor_batches += 1
            actor_s = time.perf_counter() - start
            actor_pairs, reward_wait = actor.stats.pairs - pairs0, actor.stats.reward_wait_s - wait0
        finally:
            for key in client.scan_iter(match=f"pso:{cfg.redis.run}:*"):
                client.delete(key)
            weights.close()
            client.close()
            reward_client.close()
        images = n * g
        bare_rate, actor_rate = bare_pairs / bare_s, actor_pairs / actor_s
        # time per batch: the same work (n prompts x g images) on both sides, whatever the pairs come to
        ratio = (actor_s / actor_batches) / (bare_s / bare_batches)
        data = {
            "rank": rank,
            "images_per_batch": images,
            "bare_batches": bare_batches,
            "actor_batches": actor_batches,
            "bare_pairs_per_s": bare_rate,
            "actor_pairs_per_s": actor_rate,
            "bare_images_per_s": images * bare_batches / bare_s,
            "actor_images_per_s": images * actor_batches / actor_s,
            "bare_sample_s_per_batch": parts["sample_s"] / bare_batches,
            "bare_score_s_per_batch": parts["score_s"] / bare_batches,
            "actor_reward_wait_s_per_batch": reward_wait / actor_batches,
            "time_ratio": ratio,
            **gpu_memory(self.device),
        }
        reward_name = "PickScore ViT-H/14" if s.reward_full else "tiny PickScore"
        return Row(
            "actor",
            f"LoRA r{rank}, {n} prompts x {g} images of {s.image_size} px, {s.num_steps} steps, batch "
            f"{s.sample_batch}; random {reward_name} ({s.reward_dtype}); {actor_batches} batches",
            f"actor {actor_rate:.2f} pairs/s ({data['actor_images_per_s']:.1f} images/s)",
            f"bare sampler {bare_rate:.2f} pairs/s ({data['bare_images_per_s']:.1f} images/s)",
            f"time / bare {overhead(ratio)}",
            f"overhead < {GOALS['actor']:.0%}",
            ratio - 1 < GOALS["actor"],
            data,
        )

    # ----- 4. reward server -----
    def reward_server_bench(self) -> list[Row]:
        s = self.s
        budget = min(s.rs_timeout_s, self.time_left("reward-server", final=True) - 5)
        out, log_path = self.work / "reward-server-bench.json", self.work / "reward-server-bench.log"
        cmd = [
            sys.executable, str(BENCH_DIR / "bench_reward_server.py"), "--random", "pickscore",
            *(["--full"] if s.reward_full else []), "--device", str(self.device), "--dtype", s.reward_dtype,
            "--image-size", str(s.rs_image_size), "--seconds", f"{s.rs_seconds:g}",
            "--clients", *map(str, s.rs_clients), "--threads", str(self.args.reward_threads), "--json", str(out),
        ]  # fmt: skip
        log(self.clock, f"reward server: {' '.join(cmd[1:])} (time limit {budget:.0f} s)")
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.subprocess_env(),
                                    cwd=REPO, start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(budget)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                stop_group(proc)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        if code != 0:
            what = f"timed out after {budget:.0f} s" if code is None else f"exited with status {code}"
            raise RuntimeError(f"bench_reward_server.py {what}:\n{tail}")
        print(tail, flush=True)
        result = json.loads(out.read_text())
        model = "PickScore ViT-H/14" if s.reward_full else "tiny PickScore"
        rows = []
        for level in result["levels"]:
            last = level["clients"] == max(s.rs_clients)
            rows.append(
                Row(
                    "reward server",
                    f"random {model} ({s.reward_dtype}), 16 images of {s.rs_image_size} px per request, "
                    f"{level['clients']} clients, {s.rs_seconds:g} s",
                    f"served {level['images_per_s']:,.0f} images/s (p50 {level['p50_ms']:.0f} ms, "
                    f"p99 {level['p99_ms']:.0f} ms)",
                    f"raw batched forward {level['raw_images_per_s']:,.0f} images/s",
                    f"{level['ratio']:.2f} of raw",
                    f"at least {GOALS['reward-server']:g} of raw at {max(s.rs_clients)} clients" if last else "",
                    level["ratio"] >= GOALS["reward-server"] if last else None,
                    level,
                )
            )
        return rows


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group this suite started (the benchmark and its server), SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # the reward server it started, should the benchmark have gone first
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def error_row(benchmark: str, setting: str, exc: BaseException) -> Row:
    traceback.print_exception(exc)
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return Row(benchmark, setting, error=f"failed: {message}", data={"error": f"{type(exc).__name__}: {exc}"})


def skipped(benchmark: str, setting: str) -> Row:
    return Row(benchmark, setting, error="skipped: out of time budget")


def run_suite(args: argparse.Namespace, s: Settings, clock: Clock, work: Path) -> tuple[list[Row], dict]:
    from pso.redis_server import LocalRedis

    suite = Suite(args, s, clock, work)
    stages = set(args.stages)
    rows: list[Row] = []
    if stages & {"learner", "broadcast", "actor"}:
        server = None
        with LocalRedis() as redis_server:
            suite.redis_url = redis_server.url
            try:
                if "actor" in stages:  # the reward server loads while the model is built
                    suite.build_reward_model()
                    server = suite.start_reward_server()
                suite.build_model()
            except Exception as e:
                rows.append(error_row("setup", f"random {MODELS[args.arch][0]} model, reward model and server", e))
            else:
                for rank in args.ranks:
                    rows += run_rank(suite, rank, stages, server)
            finally:
                if server is not None:
                    server.stop()
                suite.drop_in_process_reward()
    if "reward-server" in stages:
        setting = "bench_reward_server.py --random pickscore"
        if not suite.time_left("reward-server", final=True):
            rows.append(skipped("reward server", setting))
        else:
            try:
                rows += suite.reward_server_bench()
            except Exception as e:
                rows.append(error_row("reward server", setting, e))
    return rows, suite.info


def run_rank(suite: Suite, rank: int, stages: set[str], server) -> list[Row]:
    """The learner, broadcast and actor stages at one LoRA rank, sharing one loaded policy (the bare
    side of each comparison; the learner loads a second copy for its engine)."""
    from launcher.processes import wait_until
    from reward_server.client import RewardClient

    clock, device, rows, setting = suite.clock, suite.device, [], f"LoRA r{rank}"
    names = {"learner": "learner update", "broadcast": "weight broadcast", "actor": "actor"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(clock, f"LoRA r{rank}: loading the policy")
    try:
        policy = suite.load_policy(rank)
    except Exception as e:
        return [error_row(names[stage], setting, e) for stage in names if stage in stages]
    bundle, source = None, "policy.export_weights"
    if "learner" in stages:
        if not suite.time_left("learner"):
            rows.append(skipped("learner update", setting))
        else:
            pps, row = suite.s.pairs_per_step, None
            while row is None:
                log(clock, f"LoRA r{rank}: learner, micro-batches of {pps} pairs")
                oom = False
                try:
                    row, bundle = suite.learner(rank, policy, pps)
                    source = "LearnerEngine.export_weights"
                except torch.cuda.OutOfMemoryError as e:
                    if pps == 1:
                        row = error_row("learner update", setting, e)
                    oom = True
                except Exception as e:
                    row = error_row("learner update", setting, e)
                free_memory(device)  # here, once the failed attempt's frames are gone
                if oom and row is None:
                    log(clock, f"out of GPU memory at micro-batches of {pps} pairs; trying {pps // 2}")
                    pps //= 2
            rows.append(row)
            log(clock, f"LoRA r{rank}: learner done {gpu_memory(device)}")
    if "broadcast" in stages:
        if not suite.time_left("broadcast"):
            rows.append(skipped("weight broadcast", setting))
        else:
            log(clock, f"LoRA r{rank}: weight broadcast")
            try:
                rows.append(suite.broadcast(rank, bundle or policy.export_weights(1), policy, source))
            except Exception as e:
                rows.append(error_row("weight broadcast", setting, e))
    bundle = None
    if "actor" in stages:
        if not suite.time_left("actor"):
            rows.append(skipped("actor", setting))
        else:
            log(clock, f"LoRA r{rank}: actor (waiting for the reward server)")
            try:
                with RewardClient(suite.reward_url, token="") as probe:
                    if not wait_until(probe.ready, max(30.0, suite.time_left("actor")), children=[server]):
                        raise RuntimeError(f"the reward server did not get ready:\n{server.tail()}")
                rows.append(suite.actor(rank, policy))
            except Exception as e:
                rows.append(error_row("actor", setting, e))
    del policy
    free_memory(device)
    log(clock, f"LoRA r{rank}: done {gpu_memory(device)}")
    return rows


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "| benchmark | setting | figure | reference | ratio | goal |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="default cuda:0 (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the wiring in ~2 minutes")
    parser.add_argument("--arch", choices=list(MODELS), default="sdxl", help="the random model: SDXL-Turbo's format "
                        "(default) or FLUX.1-schnell's (12B transformer, one 80 GB GPU)")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32], help="LoRA ranks")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-suite.md"), help="the markdown table")
    parser.add_argument("--json", type=Path, help="the numbers (default: --out with .json)")
    parser.add_argument("--budget-s", type=float, help="wall-time budget of the whole suite (570 s; smoke 170 s)")
    parser.add_argument("--pairs-per-step", type=int, help="learner micro-batch in pairs (2; halved on OOM)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="fp32: float16 UNet (FLUX: bfloat16 "
                        "transformer), float32 LoRA (default); bf16: bfloat16 UNet, DeepSpeed bf16 with float32 "
                        "master weights")  # fmt: skip
    parser.add_argument("--model-dir", type=Path, help="reuse a folder a previous run built (skips the build)")
    parser.add_argument("--work-dir", type=Path, help="where models and logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    parser.add_argument("--reward-threads", type=int, default=1, help="torch threads of the reward servers")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda:0")
    s = SETTINGS[args.arch, args.smoke]
    if args.budget_s:
        s = replace(s, budget_s=args.budget_s)
    if args.pairs_per_step:
        s = replace(s, pairs_per_step=args.pairs_per_step)
    if args.precision == "bf16":
        s = replace(s, precision="bf16", dtype="bfloat16")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device (use --smoke for a CPU run)")
    if device.type == "cuda" and (device.index or 0) != 0:
        raise SystemExit("the learner trains on cuda:LOCAL_RANK (cuda:0): pick the GPU with CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(s.budget_s)

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    log(clock, f"work folder {work}; budget {s.budget_s:.0f} s; stages {', '.join(args.stages)}; ranks {args.ranks}")
    try:
        rows, info = run_suite(args, s, clock, work)
    finally:
        if not args.keep and not args.work_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    if torch.distributed.is_initialized():  # the learner's world-size-1 process group
        torch.distributed.destroy_process_group()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    elapsed = clock.elapsed()
    model, backbone = MODELS[args.arch]
    sampling = f"eta {s.eta:g}, " if s.eta is not None else ""
    checkpointing = "gradient checkpointing, " if s.gradient_checkpointing else ""
    targets = "/".join(info.get("lora_targets", ["to_q", "to_k", "to_v", "to_out.0"]))
    header = [
        f"# GPU suite{' (smoke: toy sizes on the CPU)' if args.smoke else ''}",
        "",
        f"{name}, torch {torch.__version__}; {elapsed:.0f} s in all (budget {s.budget_s:.0f} s). "
        f"Random {info.get('family', s.family)}-format {model} model, "
        f"{backbone} {param_count(info.get(f'{backbone.lower()}_parameters', 0))} parameters, {s.image_size} px, "
        f"{s.dtype} {backbone} (VAE decodes in {'bfloat16' if s.dtype == 'bfloat16' else 'float32'}), "
        f"{sampling}{checkpointing}LoRA on {targets}.",
    ]
    table = markdown(rows, header)
    print("\n" + table, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    json_path = args.json or args.out.with_suffix(".json")
    result = {"device": name, "elapsed_s": elapsed, "settings": asdict(s), "info": info, "args": vars(args), "log": LOG}
    json_path.write_text(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    print(f"written: {args.out}, {json_path}")


if __name__ == "__main__":
    main()
