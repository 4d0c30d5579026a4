"""The tiny world's built-in rewards (pso.tiny.rewards) as a served model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import pso
from pso.config.reward_server import TinySpec
from pso.tiny.rewards import REWARDS
from pso.tiny.world import IMAGE_SIZE, parse_any_prompt, parse_prompt
from reward_server.backends.base import ModelInfo, RewardBackend, RewardInputError

SCALES = {
    "fidelity": "tiny-world fidelity: 0 (not the prompt) to 1 (exactly the prompt's scene)",
    "large": "tiny-world 'large': foreground share of a crisp, on-prompt image, 0 to about 0.45",
    "crispness": "tiny-world crispness: share of pixels on the palette, 0 to 1 (prompt ignored)",
    "sepia": "tiny-world sepia style: 0 (plain colours) to 1 (the scene's colours tinted as the style draws them)",
    "style_fidelity": "tiny-world fidelity in either palette (plain or sepia), 0 to 1",
    "style_crispness": "tiny-world crispness in either palette (plain or sepia), 0 to 1 (prompt ignored)",
    "subject": "tiny-world subject: the new shape ('pixel', a cross) in the prompt's colours, 0 to 1",
}


class TinyBackend(RewardBackend):
    kind = "tiny"

    def __init__(self, spec: TinySpec, device: torch.device):
        super().__init__(spec, device)
        self.reward = REWARDS[spec.reward]

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.model_name,
            kind=self.kind,
            version=f"builtin:tiny/{self.spec.reward}@pso-{pso.__version__}",
            scale=SCALES[self.spec.reward],
            weight=self.spec.weight,
        )

    def check_prompt(self, prompt: str) -> None:
        if self.spec.reward == "crispness":
            return
        try:
            (parse_any_prompt if self.spec.reward == "subject" else parse_prompt)(prompt)
        except ValueError as e:
            raise RewardInputError(str(e)) from None

    def check_size(self, width: int, height: int) -> None:
        if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
            raise RewardInputError(f"tiny-world rewards score {IMAGE_SIZE}x{IMAGE_SIZE} images, got {width}x{height}")

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return self.preprocess_batch(image[None])[0]

    def preprocess_batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list((images.permute(0, 3, 1, 2).float() / 255).unbind(0))

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(pixels.to(self.device), list(prompts)).float().cpu()
