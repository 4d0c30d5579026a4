"""CLIP image preprocessing in torch alone, matching transformers' PIL-based `CLIPImageProcessorPil`.

Steps: resize the shortest side to `size` (bicubic, antialiased, as PIL does), center crop, scale
to [0, 1], normalise. The resize runs on the uint8 image: torch's uint8 kernel is a port of PIL's,
which rounds and clips between its horizontal and vertical passes; resizing in float instead
differs by up to 20 grey levels on noisy images, where the uint8 kernel differs by at most 2.
The pass order matters as much, so `resize` copies Pillow's choice (see there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from reward_server.backends.base import RewardInputError, resolve_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The resize keeps the aspect ratio before cropping, so a 1 x 10^6 image would become a 224 x 2*10^8 one.
MAX_ASPECT = 20


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 (N, C, H, W) images with Pillow's (>= 13) pass order.

    torch resamples width first, then height. Pillow runs the height first when the height shrinks
    by more than twice as many pixels as the width (Resample.c, ImagingResampleInner); with rounding
    between passes, the order changes pixels by up to 14 grey levels.
    """
    height, width = image.shape[-2:]
    if height - size[0] > max(0, 2 * (width - size[1])):
        image = F.interpolate(image, size=(size[0], width), mode="bicubic", antialias=True)
    return F.interpolate(image, size=size, mode="bicubic", antialias=True)


def _edge(value: int | dict, key: str) -> int:
    """`size`/`crop_size` are an int in old configs and a dict in newer ones."""
    return value if isinstance(value, int) else value[key]


@dataclass(frozen=True)
class ImageTransform:
    """Shortest side to `size`, center crop to `crop_size` (height, width), normalise by `mean`/`std`.

    `round_crop`: torchvision's CenterCrop (what ImageReward, HPSv2 and the aesthetic predictor were
    published with) rounds the crop offsets; transformers' processors truncate them.
    """

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    round_crop: bool = False

    def __post_init__(self):
        if max(self.crop_size) > self.size:
            raise ValueError(f"crop {self.crop_size} is larger than the resized shortest side {self.size}")

    @classmethod
    def from_config(cls, config: dict, round_crop: bool = False) -> ImageTransform:
        """From the fields of a preprocessor_config.json; CLIP's defaults where it has none."""
        size = _edge(config.get("size", 224), "shortest_edge")
        crop = config.get("crop_size", size)
        return cls(
            size=size,
            crop_size=(_edge(crop, "height"), _edge(crop, "width")),
            mean=tuple(config.get("image_mean", CLIP_MEAN)),
            std=tuple(config.get("image_std", CLIP_STD)),
            round_crop=round_crop,
        )

    @classmethod
    def from_source(cls, source: str, round_crop: bool = False) -> ImageTransform:
        """From the preprocessor_config.json of a local folder or hub repo; CLIP's defaults if it has none."""
        from huggingface_hub.errors import RemoteEntryNotFoundError

        path = Path(source).expanduser()
        if path.is_dir() and not (path / PREPROCESSOR_CONFIG).is_file():
            return cls(round_crop=round_crop)
        try:
            return cls.from_config(json.loads(resolve_file(source, PREPROCESSOR_CONFIG).read_text()), round_crop)
        except RemoteEntryNotFoundError:
            return cls(round_crop=round_crop)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, crop height, crop width): `normalize(crop(image))`."""
        return self.normalize(self.crop(image)[None])[0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 crops (B, 3, h, w), on any device -> float32, scaled to [0, 1] and normalised. Kept apart
        from `crop` so that queued inputs stay uint8 (4x smaller) and this runs on the model's device."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    @staticmethod
    def check_size(width: int, height: int) -> None:
        """Images far longer than wide are refused: resizing the short side would blow up the long one."""
        if max(height, width) > MAX_ASPECT * min(height, width):
            raise RewardInputError(f"a {width}x{height} image is more than {MAX_ASPECT} times longer than it is wide")

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> uint8 (3, crop height, crop width): resized and center-cropped."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
            raise RewardInputError(
                f"expected a non-empty uint8 (H, W, 3) image, got {image.dtype} of shape {tuple(image.shape)}"
            )
        height, width = image.shape[:2]
        self.check_size(width, height)
        # as transformers (and torchvision) compute it: the long side is truncated, not rounded
        if height <= width:
            new_size = (self.size, int(self.size * width / height))
        else:
            new_size = (int(self.size * height / width), self.size)
        x = image.permute(2, 0, 1).unsqueeze(0)
        if new_size != (height, width):
            x = resize(x, new_size)
        offset = (lambda d: int(round(d / 2))) if self.round_crop else (lambda d: d // 2)
        top, left = offset(new_size[0] - self.crop_size[0]), offset(new_size[1] - self.crop_size[1])
        return x[0, :, top : top + self.crop_size[0], left : left + self.crop_size[1]].contiguous()
