"""The sections of the distributed loop: `redis`, `actor`, `learner` and `up` (the single-node launcher).

Plain data only; the processes in `actors/`, `learner/` and the launcher read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from pso.config.loader import StrictModel


class RedisConfig(StrictModel):
    """Where experience and weights travel. Every key is under `pso:{run}:`, so runs can share a Redis."""

    url: str | None = Field(
        None, description="redis://host:port/db; None: `pso up` starts a local server, other processes refuse"
    )
    password_env: str = Field("REDIS_PASSWORD", description="environment variable holding the password, if any")
    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the run's namespace")
    chunk_bytes: int = Field(8 * 2**20, ge=1024, le=512 * 2**20, description="weight chunk size (Redis values)")
    keep_versions: int = Field(3, ge=1, description="weight versions kept; older ones are deleted")
    retry_s: float = Field(60.0, ge=0, description="how long a lost connection is retried before giving up")


class ActorConfig(StrictModel):
    """`pso actor`: sample groups from the newest policy, score them, pair, push experience."""

    id: str | None = Field(None, description="default: host name and process id")
    reward_url: str = Field("http://127.0.0.1:8000", description="the reward server")
    reward_models: list[str] | None = Field(None, description="models to score with (default: all served)")
    judge: str | None = Field(
        None,
        description="a pairwise judge on the reward server: each group is judged round-robin in both orders "
        "(g (g - 1) judgements per group of g) and pairs come from the judgements that agree; the scorers in "
        "reward_models, if set, are still scored for the reward curve",
    )
    reward_normalization: Literal["none", "running"] = Field(
        "none",
        description="none: pairs follow the reward server's weighted total; running: each model's scores are "
        "standardised by their running mean and std first, so that the weights mean what they say across "
        "models on different scales (records keep the raw total; pairing.margin is then in standard deviations)",
    )
    prompts: str | None = Field(
        None, description='a text file (a prompt per line) or a JSONL file ({"prompt": ...}); default: loop.prompts'
    )
    prompts_per_batch: int = Field(8, ge=1, description="prompt groups sampled between weight checks")
    max_backlog: int = Field(64, ge=1, description="pause while more records than this wait unread in the queue")
    weight_poll_s: float = Field(5.0, gt=0, description="how often to look for new weights without a notice")
    max_batches: int | None = Field(None, ge=1, description="stop after this many batches (default: run on)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="HTTP /healthz and Prometheus /metrics on this port, if set"
    )
    stall_s: float = Field(900.0, gt=0, description="/healthz fails after this long without progress")
    weights_cache_dir: Path | None = Field(
        None,
        description="a folder the actors of one node share: one of them fetches each weight version from Redis "
        "and the others read it from here (checked against the manifest); default: every actor fetches",
    )

    @field_validator("reward_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        """A URL that can never reach a reward server is refused here, not waited on forever."""
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise ValueError(f"{url!r} is not an http(s) URL of a reward server, such as http://reward-server:8000")
        return url


class WandbConfig(StrictModel):
    """Weights & Biases (the `wandb` extra). The API key comes from $WANDB_API_KEY, as wandb reads it."""

    project: str = Field(..., min_length=1, description="the W&B project")
    entity: str | None = Field(None, description="team or user (default: the key's)")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes the run under run_dir/wandb, for `wandb sync` later (no network)"
    )


class LearnerConfig(StrictModel):
    """`pso learner`: PSO updates in a DeepSpeed engine, weight publishing, checkpoints."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches of optim.pairs_per_step pairs per update (one optimiser step), per rank"
    )
    max_staleness: int = Field(
        4, ge=0, description="records sampled more than this many versions before the learner's are stale"
    )
    stale: Literal["drop", "downweight"] = Field("drop", description="what happens to stale records")
    stale_weight: float = Field(0.25, gt=0, le=1, description="loss weight of stale records when downweighted")
    publish_every: int = Field(1, ge=1, description="publish weights every K updates")
    checkpoint_every: int = Field(50, ge=1, description="checkpoint every N updates")
    checkpoint_dir: Path = Path("runs/learner/checkpoints")
    max_updates: int | None = Field(None, ge=1, description="stop after this many updates (default: run on)")
    reclaim_idle_s: float = Field(60.0, gt=0, description="take over records a dead consumer left this long")
    collective_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="a collective (all-reduce) between ranks that waits longer fails the learner, which then "
        "resumes on restart: a dead or hung rank cannot stall the others for ever; ranks also wait in one "
        "while any of them waits for experience",
    )
    read_block_s: float = Field(1.0, gt=0, description="wait for records this long per read")
    metrics_file: Path | None = Field(Path("runs/learner/metrics.jsonl"), description="a JSON line per update")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="rank 0 serves /healthz, Prometheus /metrics and /v1/scaling on this port"
    )
    stall_s: float = Field(900.0, gt=0, description="/healthz fails after this long without progress")
    target_backlog: int = Field(
        32,
        ge=0,
        description="records the learner wants waiting unread in the queue (the autoscaling signal aims here); "
        "below actor.max_backlog",
    )
    scale_horizon_s: float = Field(
        60.0, gt=0, description="seconds in which the wanted actors should refill (or drain) the backlog"
    )
    tensorboard_dir: Path | None = Field(
        None, description="TensorBoard logs here (rank 0), if set: the figures of every update, the grids, the curve"
    )
    wandb: WandbConfig | None = Field(None, description="Weights & Biases logging (rank 0), if set")
    run_dir: Path = Field(
        Path("runs/learner"),
        description="the learner's run folder: a sample grid per weight version (grids/), the reward curve, and the "
        "exported weights (lora/, as diffusers loads them)",
    )
    grid_every: int | None = Field(
        5,
        ge=1,
        description="draw a sample grid every N weight versions and of the last one (same prompts and noise; a "
        "grid samples on the learner, between updates); None: never",
    )
    grid_prompts: int = Field(8, ge=1, le=64, description="prompts in each sample grid")
    grid_seed: int = Field(0, description="seed of the grids' prompts and noise")
    export_every: int | None = Field(
        None, ge=1, description="export the weights into run_dir/lora every N versions; always at the end"
    )
    export_format: Literal["diffusers", "kohya"] = Field(
        "diffusers", description="the exports' format (pso export --format): diffusers, or kohya keys for ComfyUI"
    )


class UpConfig(StrictModel):
    """`pso up`: Redis, the reward server, N actors and the learner on one machine."""

    actors: int = Field(2, ge=1)
    learner_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (processes) of the learner")
    run_dir: Path = Path("runs/up")
    eval_prompts: int = Field(64, ge=1, description="prompts of the final base-versus-tuned evaluation")
    eval_seed: int = Field(0, description="seed of the final evaluation's prompts and noise")
