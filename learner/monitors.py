"""Where a run's figures and pictures go for people to follow it: TensorBoard and Weights & Biases.

The libraries' own writers (torch's SummaryWriter, wandb) rather than DeepSpeed's monitor, which writes
scalars only: the sample grids and the reward curve are images. Rank 0 alone writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from pso.config.schema import PSOConfig

log = logging.getLogger("pso.learner")


class Monitors:
    def __init__(self, cfg: PSOConfig):
        lc = cfg.learner
        self.tb = None
        self.wandb = None
        if lc.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "learner.tensorboard_dir needs the tensorboard package: pip install 'pso-service[tensorboard]'"
                ) from None
            self.tb = SummaryWriter(str(lc.tensorboard_dir))
        if lc.wandb is not None:
            try:
                import wandb
            except ImportError:
                raise ValueError("learner.wandb needs the wandb package: pip install 'pso-service[wandb]'") from None
            lc.run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=lc.wandb.project,
                entity=lc.wandb.entity,
                mode=lc.wandb.mode,
                dir=str(lc.run_dir),
                group=cfg.redis.run,  # a restarted learner is a new W&B run in the run's group
                job_type="learner",
                config=cfg.model_dump(mode="json"),
            )

    def scalars(self, row: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in row.items():
                self.tb.add_scalar(f"learner/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"learner/{k}": v for k, v in row.items()}, step=step)

    def image(self, tag: str, path: Path, step: int, caption: str | None = None) -> None:
        """A picture the run wrote (a grid, the reward curve), under `tag` at update `step`."""
        if self.tb is None and self.wandb is None:
            return
        picture = Image.open(path).convert("RGB")
        if self.tb is not None:
            self.tb.add_image(f"learner/{tag}", np.asarray(picture), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"learner/{tag}": wandb.Image(picture, caption=caption)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
