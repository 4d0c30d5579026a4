"""The learner's optimisation side: PSO updates of a `DistilledPolicy` inside a DeepSpeed engine.

No transport here: `LearnerEngine.update` takes a `PairBatch`, `export_weights` gives a
`WeightBundle`, checkpoints go to a folder. The same code runs in one process without a launcher
(it starts a world-size-1 process group itself) and under `deepspeed` / `torchrun` with several
ranks (data parallel: every rank updates on its own pairs, DeepSpeed averages the gradients).

What DeepSpeed wraps is `PSOLossModule`: the policy's UNet as its only submodule and the PSO loss
as its forward. The loss must run through `engine(...)`, not the UNet directly: DeepSpeed's ZeRO
bookkeeping hangs on backward hooks that `engine.forward` registers. The frozen reference model is
the same UNet with its LoRA adapters switched off (frozen base weights, never in the optimiser)
or, for full fine-tuning, the policy's separate frozen copy, which DeepSpeed never sees.

Precision: `fp32` trains the weights as the policy holds them (LoRA adapters are float32 even in
a float16/bfloat16 UNet). `bf16` / `fp16` are DeepSpeed's mixed precision: it casts every UNet
parameter to that dtype and keeps float32 master weights in the optimiser, so the model must be
loaded in that dtype already (`model.dtype`); otherwise float32 inputs would meet bf16 weights.
Exported weights always have the dtypes the policy started with (float32 LoRA adapters), taken
from the float32 master weights where DeepSpeed keeps them.

On CPU, DeepSpeed JIT-compiles its shared-memory collective op (deepspeed_shm_comm) the first
time a process group starts on a machine (about 20 s, needs a C++ compiler); later starts load it
from the torch extensions cache (~/.cache/torch_extensions or TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator, set_accelerator
from deepspeed.utils import safe_get_full_fp32_param
from torch import Tensor, nn

from pso.codecs import WeightBundle
from pso.config.schema import Loss, OptimConfig
from pso.config.services import LearnerConfig
from pso.export import CHECKPOINT_WEIGHTS
from pso.objectives import PairBatch, compute_loss
from pso.policy import DistilledPolicy

log = logging.getLogger(__name__)

_MIXED_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(learner: LearnerConfig, optim: OptimConfig) -> dict[str, Any]:
    """The DeepSpeed config for these sections; a micro-batch is `optim.pairs_per_step` pairs per rank."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.pairs_per_step,
        "gradient_accumulation_steps": learner.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            # torch.optim.AdamW with torch's defaults (as pso.loop.make_optimizer): no compiled
            # DeepSpeed op (FusedAdam), so the same config runs on CPU and without a CUDA toolkit
            "params": {
                "lr": optim.lr,
                "weight_decay": optim.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": learner.zero_stage},
        "steps_per_print": 2**62,  # DeepSpeed's own progress lines: never (the learner logs its own)
        "wall_clock_breakdown": False,
    }
    if learner.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif learner.precision == "fp16":
        # dynamic loss scaling: start at 2^16, halve on overflow (the step is skipped), double after 1000 clean steps
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


@dataclass
class MicroBatch:
    """One micro-batch as loss evaluations: groups of pairs that share a loss weight.

    `pairs` counts the micro-batch's pairs (0 for a padding micro-batch, see `LearnerEngine._plan`).
    """

    groups: list[tuple[PairBatch, float]]
    pairs: int


def weighted_loss(
    policy: DistilledPolicy, loss_cfg: Loss, micro: MicroBatch, gen: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """The mean over the micro-batch's pairs of w_i * loss_i, and pair-weighted mean metrics.

    `compute_loss` gives the mean over the pairs it is handed, so one call per group of equal
    weight, scaled by w_g * n_g / n, is that mean exactly; one group of weight 1 is `compute_loss`
    itself. Metrics cover the pairs with weight > 0.
    """
    loss = torch.zeros((), device=policy.device)
    sums: dict[str, float] = {}
    counted = sum(len(b) for b, w in micro.groups if w > 0)
    for batch, weight in micro.groups:
        out = compute_loss(policy, loss_cfg, batch, gen)
        loss = loss + out.loss * (weight * len(batch) / max(micro.pairs, 1))
        if weight > 0:
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch) / counted
    return loss, sums


class PSOLossModule(nn.Module):
    """What DeepSpeed wraps: the policy's backbone (its only submodule, registered under the pipeline's name
    for it, "unet" or "transformer") with the PSO loss as forward."""

    def __init__(self, policy: DistilledPolicy, loss_cfg: Loss):
        super().__init__()
        self.add_module(policy.denoiser.component, policy.backbone)
        self.policy = policy  # not an nn.Module: its VAE, text encoders and reference copy stay unregistered
        self.loss_cfg = loss_cfg

    def forward(self, micro: MicroBatch, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return weighted_loss(self.policy, self.loss_cfg, micro, gen)


def select_accelerator(device: torch.device) -> None:
    """Point DeepSpeed's accelerator at the policy's device type.

    DeepSpeed picks one when first imported (usually already done by transformers while the model
    loads): CUDA whenever it sees a GPU, else CPU with a warning that `DS_ACCELERATOR=cpu` silences.
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the learner runs on cpu or cuda, not {device.type}")
    current = get_accelerator().device_name()
    if current == device.type:
        return
    if device.type == "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    set_accelerator(Accelerator())
    log.info("DeepSpeed accelerator switched from %s to %s to match the policy", current, device.type)


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the launcher's process group, or start a world-size-1 one (gloo on CPU, nccl on CUDA).

    DeepSpeed reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the
    environment. Without a launcher, one local rank joins a group of its own through an in-process
    store: no rendezvous port, so nothing another process could take between choosing and binding it.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if torch.distributed.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")
    elif "WORLD_SIZE" not in os.environ:
        for key, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, str(value))
        os.environ.setdefault("MASTER_PORT", "0")  # DeepSpeed wants it set; the store below needs none
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    if device.type == "cpu":
        # DeepSpeed would JIT-compile a shared-memory all-reduce op here (20 s and a C++ compiler on a fresh
        # machine); a process killed while compiling leaves a lock behind on which every later learner on the
        # machine waits forever. gloo's own all-reduce is all a CPU learner needs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    # DeepSpeed reduces gradients over its own copy of the world group, made on first use with torch's
    # new_group, which gives it the backend's default timeout (30 min), not this one: a rank hung inside an
    # update would stall the others that long. Made here, with the learner's timeout, it is the one the
    # engine DeepSpeed initializes next uses (DeepSpeed keeps it in deepspeed.utils.groups._WORLD_GROUP; no
    # public setting reaches it). Collective: every rank calls this.
    world = range(torch.distributed.get_world_size())
    deepspeed.utils.groups._WORLD_GROUP = torch.distributed.new_group(ranks=world, timeout=timeout)


class LearnerEngine:
    """PSO updates of a policy's trainable weights in a DeepSpeed engine (ZeRO 0-3, fp32/bf16/fp16).

    `deepspeed_log_level` is applied to DeepSpeed's logger (it logs its whole config at INFO).
    """

    def __init__(
        self,
        policy: DistilledPolicy,
        loss_cfg: Loss,
        optim: OptimConfig,
        learner: LearnerConfig,
        *,
        deepspeed_log_level: int | str = logging.WARNING,
    ):
        if policy.finetune is None:
            raise ValueError("the learner needs a policy with a finetune section (LoRA or full)")
        self.policy = policy
        self.optim = optim
        self.learner = learner
        self._check_precision()
        select_accelerator(policy.device)
        deepspeed.utils.logger.setLevel(deepspeed_log_level)
        init_distributed(policy.device, learner.collective_timeout_s)
        expected = torch.device(get_accelerator().device_name(int(os.environ["LOCAL_RANK"])))
        if policy.device != expected:
            raise ValueError(
                f"this rank (LOCAL_RANK {os.environ['LOCAL_RANK']}) trains on {expected}, the policy is on "
                f"{policy.device}: load it with model.device {expected}"
            )
        # names, shapes and dtypes as the policy made them, before DeepSpeed casts anything
        self._spec = policy.weight_spec()
        self.engine, *_ = deepspeed.initialize(
            model=PSOLossModule(policy, loss_cfg),
            model_parameters=policy.trainable_parameters(),
            config=deepspeed_config(learner, optim),
        )
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self._trainable = [(n, p) for n, p in policy.backbone.named_parameters() if n in self._spec]
        log.info(
            "learner engine: %s weights (%d tensors, %.2fM values), ZeRO stage %d, %s, %d rank(s) on %s",
            policy.finetune.mode,
            len(self._spec),
            sum(torch.Size(shape).numel() for _, shape in self._spec.values()) / 1e6,
            learner.zero_stage,
            learner.precision,
            self.world_size,
            expected.type,
        )

    def _check_precision(self) -> None:
        precision, dtype = self.learner.precision, self.policy.dtype
        if precision in _MIXED_DTYPE and dtype != _MIXED_DTYPE[precision]:
            want = str(_MIXED_DTYPE[precision]).removeprefix("torch.")
            raise ValueError(
                f"learner.precision {precision} runs the whole UNet in {want} (float32 master weights in the "
                f"optimiser), so the model must be loaded in {want}: set model.dtype {want} (it is "
                f"{self.policy.model_cfg.dtype}), or use precision fp32"
            )
        if precision == "fp32":
            low = sorted({str(p.dtype) for p in self.policy.trainable_parameters() if p.dtype != torch.float32})
            if low:
                raise ValueError(
                    f"learner.precision fp32 needs float32 trainable weights, these are {low}: use precision bf16 "
                    "for a bfloat16 model (float32 master weights), or train LoRA adapters (always float32)"
                )

    # ----- updates -----
    def update(self, batch: PairBatch, weights: Tensor | None = None, *, gen: torch.Generator) -> dict[str, float]:
        """One PSO pass over `batch` in micro-batches of `optim.pairs_per_step` pairs; averaged metrics.

        Every `gradient_accumulation_steps` micro-batches make one optimiser step and the pass always
        ends with a step (a shorter last group averages over its own micro-batches), so no gradient
        is left pending between updates or in a checkpoint. `weights` (one per pair, >= 0) scale the
        pairs' losses: a micro-batch's loss is the mean over its pairs of w_i * loss_i, so all-ones
        weights are the unweighted update. `gen` (CPU) draws the forward-noised losses' timesteps
        and noise. With several ranks, every rank calls `update` together, each on its own pairs (at
        least one).

        Returns the loss metrics (`compute_loss`'s, averaged over micro-batches as
        `pso.loop.update_on_pairs` does), `grad_norm` (before clipping, averaged over steps; global
        over ranks), `lr`, `steps` (optimiser steps) and, with fp16, `loss_scale` and
        `skipped_steps` (overflows). Loss metrics are this rank's.
        """
        if len(batch) == 0:
            raise ValueError("update needs at least one pair")
        if weights is not None:
            weights = weights.detach().float().cpu()
            if weights.shape != (len(batch),) or not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
                raise ValueError(f"weights must be {len(batch)} finite values >= 0, got {weights.tolist()}")
        plan = self._plan(batch, weights)
        ga = self.learner.gradient_accumulation_steps
        sums: dict[str, float] = {}
        counted = 0
        norms: list[float] = []
        skipped_before = self.engine.skipped_steps
        for i, micro in enumerate(plan):
            first = i - i % ga
            in_step = min(ga, len(plan) - first)  # micro-batches in this optimiser step
            boundary = i == first + in_step - 1
            self.engine.set_gradient_accumulation_boundary(boundary)
            loss, metrics = self.engine(micro, gen)
            # the step's loss is the mean of its micro-batches' (DeepSpeed itself would divide by
            # gradient_accumulation_steps even for a shorter last group)
            self.engine.backward(loss / in_step, scale_wrt_gas=False)
            norm = self._plain_grad_norm() if boundary else None
            self.engine.step()
            if boundary:
                norms.append(norm if norm is not None else self._reported_grad_norm())
            if metrics:
                counted += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / counted for k, v in sums.items()}
        out.update(grad_norm=sum(norms) / len(norms), lr=float(self.engine.get_lr()[0]), steps=float(len(norms)))
        if self.learner.precision == "fp16":
            optimizer = self.engine.optimizer
            out["loss_scale"] = float(getattr(optimizer, "loss_scale_config", optimizer).cur_scale)
            out["skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        return out

    def _plan(self, batch: PairBatch, weights: Tensor | None) -> list[MicroBatch]:
        """The micro-batches of `batch`, each split into groups of equal weight.

        With several ranks, every rank must run the same number of micro-batches (optimiser steps
        and ZeRO-2/3 reductions are collective) and of loss evaluations per micro-batch (ZeRO-3
        gathers weights inside every forward), so the ranks agree on both and pad with weight-0
        evaluations of their own first pair.
        """
        m = self.optim.pairs_per_step
        plan = []
        for start in range(0, len(batch), m):
            micro = batch[start : start + m]
            if weights is None:
                plan.append(MicroBatch([(micro, 1.0)], len(micro)))
                continue
            w = weights[start : start + m]
            groups = [(_select(micro, (w == v).nonzero().flatten()), v) for v in torch.unique(w).tolist()]
            plan.append(MicroBatch(groups, len(micro)))
        if self.world_size == 1:
            return plan
        counts = torch.tensor([len(plan), max(len(mb.groups) for mb in plan)], device=self.engine.device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        n_micro, n_groups = counts.tolist()
        pad = (batch[:1], 0.0)
        plan += [MicroBatch([], 0) for _ in range(n_micro - len(plan))]
        for mb in plan:
            mb.groups += [pad] * (n_groups - len(mb.groups))
        return plan

    def _plain_grad_norm(self) -> float | None:
        """The gradient norm before clipping where DeepSpeed keeps none: fp32 without ZeRO.

        There DeepSpeed clips with its own helper and drops the norm; at the boundary the
        gradients are already averaged over ranks, so this rank's norm is the global one.
        """
        if self.learner.zero_stage > 0 or self.learner.precision != "fp32":
            return None
        grads = [p.grad.float() for _, p in self._trainable if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _reported_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # ----- weights -----
    @torch.no_grad()
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable tensors in the policy's own dtypes, detached copies on CPU, complete on every rank.

        Collective with ZeRO-3 (it gathers the partitions) and with bf16/fp16 under ZeRO (it
        assembles the float32 master weights): call it on every rank.
        """
        out = {}
        with self.gathered_weights():
            for name, param in self._trainable:
                master = safe_get_full_fp32_param(param) if self.learner.precision in _MIXED_DTYPE else None
                out[name] = (param if master is None else master).detach().to("cpu", self._spec[name][0]).clone()
        return out

    def gathered_weights(self) -> AbstractContextManager:
        """Inside it the policy's trainable weights are whole on every rank (a collective under ZeRO-3, which
        partitions them; nothing to do otherwise)."""
        if self.learner.zero_stage != 3:
            return nullcontext()
        return deepspeed.zero.GatheredParameters([p for _, p in self._trainable])

    def export_weights(self, version: int) -> WeightBundle:
        """The trainable weights for publishing, as `DistilledPolicy.export_weights` would make them.

        Collective (see `trainable_state_dict`); every rank gets the complete bundle.
        """
        model_cfg, finetune = self.policy.model_cfg, self.policy.finetune
        return WeightBundle(
            version=version,
            tensors=self.trainable_state_dict(),
            kind=finetune.mode,
            base_model=model_cfg.pretrained,
            metadata={
                "family": model_cfg.family,
                "dtype": model_cfg.dtype,
                "finetune": finetune.model_dump(mode="json"),
            },
        )

    def weight_spec(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Names, dtypes and shapes of the exported tensors (for decode_weights). The policy's own
        `weight_spec` no longer holds once DeepSpeed has cast (bf16/fp16) or partitioned (ZeRO-3) them."""
        return dict(self._spec)

    # ----- checkpoints -----
    def save_checkpoint(
        self, directory: str | Path, client_state: dict[str, Any], rank_state: dict[str, Any], weights: bytes
    ) -> None:
        """A DeepSpeed checkpoint (trainable weights, optimiser and loss-scaler state, step counters)
        plus `client_state` (e.g. weight version, counters), each rank's own `rank_state` (JSON,
        e.g. the records it covers) and, from rank 0, `weights` (the encoded weight bundle, which
        `pso export` reads without unpickling anything) in `directory`.

        Collective: every rank calls it with the same directory and writes its own shards. Frozen
        weights are left out: the base model is reloaded from `model.pretrained`. The checkpoint is
        named in `latest` (atomically) only once every rank has written all of it, so a process
        killed at any point leaves the previous one in place.
        """
        tag = f"global_step{self.engine.global_steps}"
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / f"rank{self.rank}.json", json.dumps(rank_state))
        if self.rank == 0:
            _write_atomically(folder / CHECKPOINT_WEIGHTS, weights)
        client = {**client_state, _RANKS: self.world_size}  # a folder may hold files of an aborted save by more ranks
        self.engine.save_checkpoint(
            str(directory), tag=tag, client_state=client, save_latest=False, exclude_frozen_parameters=True
        )  # ends with a barrier: every rank's files are written
        _sync_folder(folder)  # on disk before `latest` names them (acknowledgements follow the checkpoint)
        torch.distributed.barrier()
        if self.rank == 0:
            _write_atomically(Path(directory) / "latest", tag)
            _fsync(Path(directory))  # the rename itself (not the older checkpoints beside it)
        torch.distributed.barrier()
        log.info("checkpoint saved in %s (step %d)", folder, self.engine.global_steps)

    def load_checkpoint(self, directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """Resume from the newest checkpoint in `directory` (weights, optimiser state, counters); returns
        its client state and the rank states of every rank that saved it (however many ranks resume);
        None, touching nothing, when there is none. Collective."""
        latest = Path(directory) / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r}, named in {latest}")
        ranks = [
            json.loads((Path(directory) / tag / f"rank{r}.json").read_text())
            for r in range(client_state.get(_RANKS, 0))
        ]
        log.info("resumed from %s (step %d)", path, self.engine.global_steps)
        return client_state, ranks


_RANKS = "checkpoint_ranks"  # the client-state key: how many rank{r}.json files the checkpoint has


def _write_atomically(path: Path, content: str | bytes) -> None:
    """Write, then rename over `path`: a reader (or a restart after a kill) sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_folder(folder: Path) -> None:
    """fsync every file in `folder` (recursively) and the folder itself: a checkpoint that `latest` names
    survives the node losing power, not just the process dying."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:  # files before the folders holding them
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _select(batch: PairBatch, idx: Tensor) -> PairBatch:
    return PairBatch(batch.cond.index(idx), batch.winner_states[idx], batch.loser_states[idx])
