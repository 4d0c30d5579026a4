"""Back-ends that take images of any size (`kind: python`, `kind: http`): as sent, or every one resized to
the square `image_size` of their spec so that images of different sizes batch together."""

from __future__ import annotations

import torch

from reward_server.backends.base import RewardBackend, RewardInputError
from reward_server.backends.clip_preprocess import MAX_ASPECT, resize


class ResizingBackend(RewardBackend):
    def check_size(self, width: int, height: int) -> None:
        if self.spec.image_size and max(height, width) > MAX_ASPECT * min(height, width):
            raise RewardInputError(f"a {width}x{height} image is more than {MAX_ASPECT} times longer than it is wide")

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return self.preprocess_batch(image[None])[0]

    def preprocess_batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (N, H, W, 3) -> N uint8 (H, W, 3) images, resized (bicubic, antialiased, not cropped) to
        `image_size` x `image_size` when the spec sets it."""
        size = self.spec.image_size
        if size and tuple(images.shape[1:3]) != (size, size):
            images = resize(images.permute(0, 3, 1, 2), (size, size)).permute(0, 2, 3, 1).contiguous()
        return list(images)
