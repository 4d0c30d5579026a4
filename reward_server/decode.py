"""Untrusted bytes to uint8 (H, W, 3) tensors, within the configured limits.

Images are opened in two steps: `open_images` reads only the headers and checks the pixel
limits of each image and of the whole request, so a decompression bomb costs a header read;
`to_tensor` decodes one image when the server is ready to preprocess it, so a request never
holds all its images decoded at full size. Only PNG and JPEG (and uint8 safetensors) are
accepted; nothing here touches the file system or unpickles anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load as load_safetensors

from pso.config.reward_server import LimitsConfig
from reward_server.errors import ApiError, bad_request, unprocessable

FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)


def base64_bytes(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("bad_base64", f"{where}: not valid base64") from None


def open_images(raws: Sequence[bytes], limits: LimitsConfig) -> list[Image.Image]:
    """Each PNG/JPEG opened from its header alone; the per-image and per-request pixel limits checked."""
    images = [_open(raw, limits, f"images[{i}]") for i, raw in enumerate(raws)]
    check_total_pixels(sum(im.width * im.height for im in images), limits)
    return images


def _open(raw: bytes, limits: LimitsConfig, where: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"{where}: over the pixel limit of {limits.max_pixels}") from None
    except Exception:
        raise bad_request("bad_image", f"{where}: not a PNG or JPEG image") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {w}x{h} pixels is over the limit of {limits.max_pixels}")
    if w < 1 or h < 1:
        raise bad_request("bad_image", f"{where}: empty image")
    return im


def check_total_pixels(total: int, limits: LimitsConfig) -> None:
    if total > limits.max_total_pixels:
        raise ApiError(
            413, "too_many_pixels", f"{total} pixels in one request is over the limit of {limits.max_total_pixels}"
        )


def to_tensor(image: Image.Image | torch.Tensor, where: str) -> torch.Tensor:
    """Decode an opened image to uint8 (H, W, 3): upright as its EXIF orientation says, 16-bit
    samples scaled to 8 bits, alpha dropped (as the models' reference processors do). Tensors pass."""
    if isinstance(image, torch.Tensor):
        return image
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        rgb = image.convert("RGB")
    except Exception as e:
        raise bad_request("bad_image", f"{where}: cannot decode the image ({e})") from None
    return torch.from_numpy(np.asarray(rgb).copy())


def decode_safetensors(raw: bytes, limits: LimitsConfig) -> tuple[list[torch.Tensor], list[str], list[str] | None]:
    """A safetensors body: tensor `images` uint8 (N, H, W, 3); header metadata `prompts` (a JSON list of
    strings) and optionally `models` (a JSON list of names)."""
    try:
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        entry = header.get("images")
        if not isinstance(entry, dict) or not isinstance(metadata, dict):
            raise unprocessable("bad_safetensors", "expected a tensor named 'images' and string metadata")
        if entry.get("dtype") != "U8" or len(entry.get("shape", ())) != 4 or entry["shape"][3] != 3:
            raise unprocessable(
                "bad_safetensors", f"'images' must be uint8 (N, H, W, 3), got {entry.get('dtype')} {entry.get('shape')}"
            )
        n, h, w, _ = entry["shape"]
        if h * w > limits.max_pixels:
            raise ApiError(413, "image_too_large", f"{w}x{h} pixels is over the limit of {limits.max_pixels}")
        check_total_pixels(n * h * w, limits)
        images = load_safetensors(raw)["images"]
    except ApiError:
        raise
    except Exception:  # the library's errors for a malformed file are of many types
        raise bad_request("bad_safetensors", "body is not a valid safetensors file") from None
    prompts = _json_strings(metadata, "prompts", required=True)
    models = _json_strings(metadata, "models", required=False)
    return list(images.unbind(0)), prompts, models


def parse_string_list(text: str, field: str) -> list[str]:
    """A JSON list of strings, e.g. a multipart form field; a 422 naming `field` otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise unprocessable("bad_field", f"{field} must be a JSON list of strings")
    return value


def _json_strings(metadata: dict, key: str, required: bool) -> list[str] | None:
    if key not in metadata:
        if required:
            raise unprocessable("bad_safetensors", f"metadata has no {key!r} (a JSON list of strings)")
        return None
    if not isinstance(metadata[key], str):
        raise unprocessable("bad_field", f"metadata {key!r} must be a JSON list of strings")
    return parse_string_list(metadata[key], f"metadata {key!r}")
