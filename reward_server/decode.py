"""Untrusted bytes to uint8 (H, W, 3) tensors, within the configured limits.

Pixel counts are checked from the image header before any pixel is decoded, so a decompression
bomb costs a header read. Only PNG and JPEG (and uint8 safetensors) are accepted; nothing here
touches the file system or unpickles anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from pso.config.reward_server import LimitsConfig
from reward_server.errors import ApiError, bad_request, unprocessable

FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)
Image.MAX_IMAGE_PIXELS = None  # our own limit applies, before decoding, with a clear message


def decode_base64_image(text: str, limits: LimitsConfig, where: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(_DATA_URL.sub("", text.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("bad_base64", f"{where}: not valid base64") from None
    return decode_image_bytes(raw, limits, where)


def decode_image_bytes(raw: bytes, limits: LimitsConfig, where: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Exception:
        raise bad_request("bad_image", f"{where}: not a PNG or JPEG image") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {w}x{h} pixels is over the limit of {limits.max_pixels}")
    if w < 1 or h < 1:
        raise bad_request("bad_image", f"{where}: empty image")
    try:
        im.load()
        rgb = im.convert("RGB")
    except Exception as e:
        raise bad_request("bad_image", f"{where}: cannot decode the {im.format} image ({e})") from None
    return torch.from_numpy(np.asarray(rgb).copy())


def decode_safetensors(raw: bytes, limits: LimitsConfig) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """A safetensors body: tensor `images` uint8 (N, H, W, 3); header metadata `prompts` (a JSON list of
    strings) and optionally `models` (a JSON list of names)."""
    try:
        tensors = load_safetensors(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError):
        raise bad_request("bad_safetensors", "body is not a valid safetensors file") from None
    if "images" not in tensors:
        raise unprocessable("bad_safetensors", f"expected a tensor named 'images', got {sorted(tensors)}")
    images = tensors["images"]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise unprocessable(
            "bad_safetensors",
            f"'images' must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}",
        )
    h, w = images.shape[1:3]
    if h * w > limits.max_pixels:
        raise ApiError(413, "image_too_large", f"{w}x{h} pixels is over the limit of {limits.max_pixels}")
    prompts = _json_strings(metadata, "prompts", required=True)
    models = _json_strings(metadata, "models", required=False)
    return images, prompts, models


def parse_string_list(text: str, field: str) -> list[str]:
    """A JSON list of strings, e.g. a multipart form field; a 422 naming `field` otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise unprocessable("bad_field", f"{field} must be a JSON list of strings")
    return value


def _json_strings(metadata: dict[str, str], key: str, required: bool) -> list[str] | None:
    if key not in metadata:
        if required:
            raise unprocessable("bad_safetensors", f"metadata has no {key!r} (a JSON list of strings)")
        return None
    return parse_string_list(metadata[key], f"metadata {key!r}")
