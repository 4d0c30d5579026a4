"""Where a run's figures and pictures go for people to follow it: TensorBoard and Weights & Biases.

The libraries' own writers (torch's SummaryWriter, wandb) rather than DeepSpeed's monitor, which writes
scalars only: the sample grids and the reward curve are images. Rank 0 alone writes.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from pso.config.schema import PSOConfig

log = logging.getLogger("pso.learner")


class Monitors:
    """Opened at the first figure written, so that a resumed learner's TensorBoard run drops the events it
    wrote after its checkpoint (they are written again) and nothing is left open by a learner that fails to
    start."""

    def __init__(self, cfg: PSOConfig):
        self.cfg = cfg
        self.tb = None
        self.wandb = None
        self.opened = False
        lc = cfg.learner
        # refused at start, not at the first update
        if lc.tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "learner.tensorboard_dir needs the tensorboard package: pip install 'pso-service[tensorboard]'"
            )
        if lc.wandb is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError("learner.wandb needs the wandb package: pip install 'pso-service[wandb]'")

    def _open(self, step: int) -> None:
        self.opened = True
        lc = self.cfg.learner
        if lc.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(lc.tensorboard_dir), purge_step=step)
        if lc.wandb is not None:
            import wandb

            lc.run_dir.mkdir(parents=True, exist_ok=True)
            config = self.cfg.model_dump(mode="json")
            config["redis"]["url"] = _without_password(config["redis"]["url"])
            self.wandb = wandb.init(
                project=lc.wandb.project,
                entity=lc.wandb.entity,
                mode=lc.wandb.mode,
                dir=str(lc.run_dir),
                group=self.cfg.redis.run,  # a restarted learner is a new W&B run in the run's group
                job_type="learner",
                config=config,
            )

    def scalars(self, row: dict[str, float], step: int) -> None:
        if not self.opened:
            self._open(step)
        if self.tb is not None:
            for key, value in row.items():
                self.tb.add_scalar(f"learner/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"learner/{k}": v for k, v in row.items()}, step=step)

    def image(self, tag: str, path: Path, step: int, caption: str | None = None) -> None:
        """A picture the run wrote (a grid, the reward curve), under `tag` at update `step`."""
        if not self.opened:
            self._open(step)
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


def _without_password(url: str | None) -> str | None:
    """redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0 (the config goes to W&B's servers)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


@contextmanager
def best_effort(what: str) -> Iterator[None]:
    """For what rank 0 writes for people watching (pictures, exports, monitors): a full disk or an unreachable
    W&B must not stop the training, and rank 0 failing alone would leave the other ranks waiting in their next
    collective."""
    try:
        yield
    except Exception:
        log.exception("could not write %s; training goes on", what)
