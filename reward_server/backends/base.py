"""The contract every reward back-end keeps, and the config fields they share.

A back-end scores images against prompts. The server splits the work in two so that the cheap
part runs on request threads and the expensive part runs batched on the model's device:

- `check_size(width, height)` refuses an image the model cannot take, from its header alone, so
  that it is never decoded.
- `preprocess(image)` turns one decoded image (of a size `check_size` let through), a uint8
  (H, W, 3) CPU tensor, into the model's input (a CPU tensor of a fixed shape for models with
  fixed-size inputs). It runs per request.
  `preprocess_batch(images)` does the same for a uint8 (N, H, W, 3) batch of one size, as the
  safetensors form sends it.
- `score_batch(pixels, prompts)` scores a stack of preprocessed images (all of one shape) with one
  prompt each and returns (B,) float32 scores on the CPU. It runs in the device's batch worker,
  under `torch.inference_mode()`.

A pairwise judge (`pairwise = True`) answers `compare_batch(first, second, prompts)` instead: for each
pair of preprocessed images, its preference for the first, from 0 (the second is better) through 0.5 (a
tie) to 1. It serves `/v1/compare` with `judge`, never `/v1/score`.

A mistake in the caller's input (a prompt the model cannot read, an image too small) raises
`RewardInputError`; the server answers it with a 422 naming the problem.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from pso.config.reward_server import BackendSpec
from pso.hub import is_hub_repo_id

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RewardInputError(ValueError):
    """The caller's input cannot be scored by this model; the message says why."""


class ModelInfo(BaseModel):
    """What `GET /v1/models` tells a caller about one model."""

    name: str
    kind: str
    version: str = Field(description="identifies the weights: source plus a digest of the loaded tensors")
    scale: str = Field(description="what the numbers mean and their usual range")
    higher_is_better: bool = True
    weight: float = 1.0
    pairwise: bool = Field(False, description="a judge of two images (POST /v1/compare with judge), not a scorer")


class RewardBackend(ABC):
    """One loaded reward model on one device."""

    kind: ClassVar[str]
    pairwise: ClassVar[bool] = False

    def __init__(self, spec: BackendSpec, device: torch.device):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = DTYPES[spec.dtype]

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    def check_prompt(self, prompt: str) -> None:
        """Raise RewardInputError if this model cannot score against `prompt` (default: any text)."""
        return None

    def check_size(self, width: int, height: int) -> None:
        """Raise RewardInputError if this model cannot take a `width` x `height` image (default: any size)."""
        return None

    @abstractmethod
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) CPU image -> model input tensor (CPU)."""

    def preprocess_batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (N, H, W, 3) CPU images of one size -> N model inputs. Models whose preprocessing is a few
        tensor ops override it to run them once per batch rather than once per image."""
        return [self.preprocess(image) for image in images]

    @abstractmethod
    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Stacked `preprocess` outputs (B, ...) and B prompts -> (B,) float32 CPU scores."""

    def compare_batch(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """A pairwise judge's (B,) float32 preferences for `first` over `second` (stacked preprocess outputs)."""
        raise NotImplementedError(f"{self.kind} scores images; it is not a pairwise judge")

    @torch.inference_mode()
    def score(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        """In-process scoring of uint8 (H, W, 3) images: inputs of one shape are scored together, in
        chunks of `max_batch`; returns (N,) float32 in the order given."""
        if len(images) != len(prompts):
            raise RewardInputError(f"got {len(prompts)} prompts for {len(images)} images")
        for p in prompts:
            self.check_prompt(p)
        for im in images:
            self.check_size(im.shape[1], im.shape[0])
        pixels = [self.preprocess(im) for im in images]
        scores = torch.zeros(len(pixels))
        for batch in shape_batches([p.shape for p in pixels], self.spec.max_batch):
            scores[batch] = self.score_batch(torch.stack([pixels[i] for i in batch]), [prompts[i] for i in batch])
        return scores


def shape_batches(shapes: Sequence[tuple[int, ...]], max_batch: int) -> list[list[int]]:
    """Indices grouped by equal shape, in first-seen order, each group cut into runs of `max_batch`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [idx[s : s + max_batch] for idx in groups.values() for s in range(0, len(idx), max_batch)]


def resolve_file(source: str, filename: str) -> Path:
    """A weights file from a local file, a local folder holding `filename`, or a hub repo id
    ("owner/name", downloaded once into the Hugging Face cache; offline mode uses the cache only)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path} has no {filename}")
        return path / filename
    if not is_hub_repo_id(source):
        raise FileNotFoundError(f"{source} is neither a local file or folder nor a hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, filename))


def local_or_hub(source: str) -> str:
    """A local folder as a path, else a hub repo id ("owner/name"); anything else is an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or not is_hub_repo_id(source):
        raise FileNotFoundError(f"{source} is neither a local folder nor a hub repo id (owner/name)")
    return source


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from a torch checkpoint read with `weights_only=True` (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat mapping of tensors")
    return state


def tensor_digest(module: torch.nn.Module) -> str:
    """Short SHA-256 of a module's parameters and buffers (names, shapes, bytes): tells weights apart."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]
