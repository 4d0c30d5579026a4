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


class TinyJudgeBackend(TinyBackend):
    """The tiny world's pairwise judge: prefers the image with the higher reward (ties within `tie_margin`),
    the first-shown one's reward raised by `first_bias`."""

    kind = "tiny-judge"
    pairwise = True

    @property
    def info(self) -> ModelInfo:
        spec = self.spec
        return super().info.model_copy(
            update={
                "version": f"builtin:tiny-judge/{spec.reward}/margin={spec.tie_margin:g}/bias={spec.first_bias:g}"
                f"@pso-{pso.__version__}",
                "scale": f"preference for the first image by tiny-world {spec.reward}: 1, 0.5 (a tie) or 0",
                "pairwise": True,
            }
        )

    def score_batch(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError("a pairwise judge compares two images; it scores none")

    def compare_batch(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        lead = self.reward(first.to(self.device), list(prompts)) + self.spec.first_bias
        lead = (lead - self.reward(second.to(self.device), list(prompts))).float().cpu()
        return torch.where(lead > self.spec.tie_margin, 1.0, torch.where(lead < -self.spec.tie_margin, 0.0, 0.5))
