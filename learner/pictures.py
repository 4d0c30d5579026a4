"""The run's pictures, drawn by the learner itself (a deployed learner has no launcher beside it).

    a sample grid every `learner.grid_every` weight versions, on the same prompts and starting noise
    each time (run_dir/grids/v0012.png), so the versions compare image for image
    the reward curve of the samples trained on (run_dir/reward_curve.png), at every checkpoint and
    at the end
    both also to the monitors that take images (TensorBoard, W&B: learner/monitors.py)

The grids are sampled with the learner's own policy, which holds the newest weights: no second
model in memory, no fetch from Redis. Under ZeRO-3 its weights are partitioned over the ranks and
every forward pass gathers them, so every rank samples the grid (a collective); otherwise rank 0
samples it while the others wait at the next collective.
"""

from __future__ import annotations

import logging
from pathlib import Path

from learner.monitors import Monitors, best_effort
from pso.config.schema import PSOConfig
from pso.images import save_grid
from pso.policy import DistilledPolicy
from pso.prompts import load_prompts, pick_prompts
from pso.report import read_metrics, run_curve
from pso.sampling import sample_groups

log = logging.getLogger("pso.learner")


class RunPictures:
    def __init__(
        self, cfg: PSOConfig, policy: DistilledPolicy, rank: int, zero_stage: int, monitors: Monitors | None = None
    ):
        lc = cfg.learner
        self.cfg, self.policy, self.rank, self.monitors = cfg, policy, rank, monitors
        self.every_rank_samples = zero_stage == 3
        self.drawn: int | None = None  # the newest version drawn
        self.prompts: list[str] = []
        if lc.grid_every is not None:
            try:
                pool = load_prompts(cfg.actor.prompts, cfg.loop.prompts)
            except (ValueError, OSError) as e:  # the actors' prompts need not be readable where the learner runs
                log.warning("the sample grids use loop.prompts: %s", e)
                pool = cfg.loop.prompts
            self.prompts = pick_prompts(pool, lc.grid_prompts, lc.grid_seed)
        self.grids = lc.run_dir / "grids"
        self.curve = lc.run_dir / "reward_curve.png"
        # real models' images shrink to a quarter of 1024 px, the tiny model's 32 px grow to 96
        self.cell = min(max(policy.image_size, 96), 256)

    def grid(self, version: int, updates: int, *, last: bool = False) -> None:
        """The sample grid of `version` when it is one to draw (every `grid_every`, and the `last` one of the run
        in any case). Collective under ZeRO-3: every rank calls it after each publish, and at the end."""
        every = self.cfg.learner.grid_every
        due = every is not None and version != self.drawn and (version % every == 0 or last)
        if not due or not (self.rank == 0 or self.every_rank_samples):
            return
        self.drawn = version
        batch = self.cfg.sampling.batch_size
        images = sample_groups(self.policy, self.prompts, 1, self.cfg.learner.grid_seed, batch_size=batch).images
        if self.rank == 0:
            with best_effort("the sample grid"):
                path = save_grid([images], self.grids / f"v{version:04d}.png", [f"version {version}"], self.cell)
                self._show("samples", path, updates, caption=f"version {version}: " + " | ".join(self.prompts))

    def reward_curve(self, history: list[dict], updates: int) -> None:
        """Rank 0: the reward curve of the whole run (the metrics file's rows, from before any restart too)."""
        if self.rank != 0:
            return
        file = self.cfg.learner.metrics_file
        rows = read_metrics(file) if file is not None else history
        if rows:
            with best_effort("the reward curve"):
                path = run_curve(self.cfg, rows, self.curve)
                self._show("reward_curve", path, updates)

    def _show(self, tag: str, path: Path, updates: int, caption: str | None = None) -> None:
        if self.monitors is not None:
            self.monitors.image(tag, path, updates, caption)
