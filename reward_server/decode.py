"""Untrusted bytes to values and uint8 (H, W, 3) tensors, within the configured limits.

Every parse is bounded before it allocates: JSON is counted before it is parsed (`parse_json`),
a safetensors header is type-checked before any size in it is used, and images are opened in two
steps: `open_images` reads only the headers and checks the pixel limits of each image and of the
whole request, so a decompression bomb costs a header read; `to_tensor` decodes one image when
the server is ready to preprocess it, so a request never holds all its images decoded at full
size. Only PNG and JPEG (and uint8 safetensors) are accepted; nothing here touches the file
system or unpickles anything.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from python_multipart.multipart import parse_options_header
from safetensors.torch import load as load_safetensors
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from pso.config.reward_server import MAX_LIST, LimitsConfig
from reward_server.errors import ApiError, bad_request, describe_validation, unprocessable

FORMATS = ("PNG", "JPEG")
MAX_JSON_VALUES = 6 * MAX_LIST  # any valid request holds far fewer (two lists of MAX_LIST strings, and a few more)
MAX_ESCAPED_QUOTES = 64 * MAX_LIST  # two per prompt in a safetensors header, and the quotes in prompts
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)
_STRUCTURE = (b",", b":", b"[", b"{")
_STRINGS = TypeAdapter(list[str])
T = TypeVar("T")


def parse_json(raw: bytes, adapter: TypeAdapter[T], max_values: int = MAX_JSON_VALUES, where: str = "the body") -> T:
    """`raw` validated as the adapter's type, refused in time linear in its length and before it is
    parsed if it holds more than about `max_values` values (413), not JSON or not UTF-8 (400 `bad_json`),
    or of the wrong shape (422 `invalid_request`)."""
    if not _values_within(raw, max_values):
        raise ApiError(
            413, "too_many_values",
            f"{where} holds more than {max_values} JSON values, or more than {MAX_ESCAPED_QUOTES} escaped quotes",
        )  # fmt: skip
    try:
        return adapter.validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise bad_request("bad_json", f"{where} is not valid JSON (UTF-8)") from None
        raise unprocessable("invalid_request", describe_validation(e.errors())) from None


def _values_within(raw: bytes, limit: int) -> bool:
    """Whether the JSON text holds at most about `limit` values: each string (keys too) and each `,`
    `:` `[` `{` outside strings is counted, an upper bound on the values it holds.

    Written here because no parser takes a budget: json.loads and pydantic build every value (and
    pydantic validates every list item) before a list's length is checked, so a 60 MiB body of tiny
    values holds the GIL for seconds and takes gigabytes. This scan runs in C (find, count) over long
    stretches and loops in Python once per string and once per escaped quote, which are counted first
    (JSON text inside a JSON string, such as a safetensors header's prompts, escapes two per string)."""
    if raw.count(b'\\"') > MAX_ESCAPED_QUOTES:
        return False
    values, pos = 0, 0
    while values <= limit:
        start = raw.find(b'"', pos)
        stop = len(raw) if start < 0 else start
        values += sum(raw.count(c, pos, stop) for c in _STRUCTURE)
        if start < 0:
            break
        end = _closing_quote(raw, start + 1)
        if end < 0:  # unterminated: the parser refuses it, after at most the values counted so far
            break
        values, pos = values + 1, end + 1
    return values <= limit


def _closing_quote(raw: bytes, i: int) -> int:
    """Index of the quote that ends the JSON string whose text starts at `i` (-1 if none): the first one
    preceded by an even run of backslashes."""
    while True:
        j = raw.find(b'"', i)
        if j < 0 or raw[j - 1] != 0x5C:
            return j
        text = raw[i:j]  # the runs examined never overlap: copying is linear in the body overall
        if (len(text) - len(text.rstrip(b"\\"))) % 2 == 0:
            return j
        i = j + 1


def parse_string_list(text: str | bytes, field: str) -> list[str]:
    """A JSON list of strings, e.g. a multipart form field; a 422 (or 413) naming `field` otherwise."""
    try:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return parse_json(raw, _STRINGS, max_values=3 * MAX_LIST, where=field)
    except UnicodeEncodeError:
        raise unprocessable("bad_field", f"{field} is not valid Unicode text (a lone surrogate)") from None
    except ApiError as e:
        status = 413 if e.status == 413 else 422
        raise ApiError(status, "bad_field", f"{field} must be a JSON list of strings ({e.message})") from None


def parse_form(raw: bytes, content_type: str, max_files: int, max_fields: int) -> tuple[list[bytes], dict[str, str]]:
    """A multipart/form-data body: the bytes of its file parts named `images`, in order, and its text fields.

    Parsed with Starlette's parser, on the calling (preprocessing) thread rather than the event loop, after
    one count that bounds its work: a valid body holds one delimiter per part, and the parser's slow path
    (seconds for 64 MiB) is a body full of delimiters."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046
        raise bad_request("bad_form", "the multipart boundary must be 1 to 70 characters")
    delimiters = raw.count(b"\r\n--" + boundary)  # the first one has no CRLF before it, the last closes
    if delimiters > max_files + max_fields:
        raise bad_request("bad_form", f"{delimiters} multipart delimiters: more than {max_files + max_fields} parts")

    async def chunks():
        for start in range(0, len(raw), 2**20):
            yield raw[start : start + 2**20]

    async def parse():
        parser = MultiPartParser(
            Headers({"content-type": content_type}), chunks(), max_files=max_files, max_fields=max_fields,
            max_part_size=len(raw),
        )  # fmt: skip
        form = await parser.parse()
        try:
            parts = form.getlist("images")
            if any(isinstance(p, str) for p in parts):
                raise unprocessable("bad_field", "every 'images' part must be a file (give it a filename)")
            return [await p.read() for p in parts], {k: v for k, v in form.multi_items() if isinstance(v, str)}
        finally:
            await form.close()

    try:
        return asyncio.run(parse())
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise ApiError(413, "too_many_images", f"at most {max_files} files per request") from None
        raise bad_request("bad_form", f"cannot parse the multipart form: {str(e)[:200]}") from None


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


def image_sizes(images: Sequence[Image.Image] | torch.Tensor) -> list[tuple[int, int]]:
    """(width, height) of each opened image, or of each of a uint8 (N, H, W, 3) batch, without decoding."""
    if isinstance(images, torch.Tensor):
        return [(images.shape[2], images.shape[1])] * len(images)
    return [image.size for image in images]


def to_tensor(image: Image.Image, where: str) -> torch.Tensor:
    """Decode an opened image to uint8 (H, W, 3): upright as its EXIF orientation says, 16-bit
    samples scaled to 8 bits, alpha dropped (as the models' reference processors do)."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        rgb = image.convert("RGB")
    except Exception as e:
        raise bad_request("bad_image", f"{where}: cannot decode the image ({e})") from None
    return torch.from_numpy(np.asarray(rgb).copy())


class _TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[StrictInt] = Field(max_length=8)
    data_offsets: tuple[StrictInt, StrictInt]


class _SafetensorsHeader(BaseModel):
    """The header of the body `/v1/score/safetensors` takes: one tensor, and string metadata."""

    model_config = ConfigDict(extra="forbid")
    images: _TensorEntry
    metadata: dict[str, str] = Field(default_factory=dict, alias="__metadata__", max_length=8)


_HEADER = TypeAdapter(_SafetensorsHeader)


def decode_safetensors(raw: bytes, limits: LimitsConfig) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """A safetensors body: tensor `images` uint8 (N, H, W, 3); header metadata `prompts` (a JSON list of
    strings) and optionally `models` (a JSON list of names). Every size in the header is checked to be an
    integer, within the limits and equal to the bytes present before anything is allocated from it."""
    header_len = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or header_len > len(raw) - 8:
        raise bad_request("bad_safetensors", "body is not a valid safetensors file (shorter than its header says)")
    try:
        header = parse_json(raw[8 : 8 + header_len], _HEADER, max_values=64, where="the safetensors header")
    except ApiError as e:
        raise ApiError(e.status, "bad_safetensors", f"expected one tensor named 'images' and string metadata: "
                       f"{e.message}") from None  # fmt: skip
    entry = header.images
    if entry.dtype != "U8" or len(entry.shape) != 4 or entry.shape[3] != 3 or min(entry.shape) < 1:
        raise unprocessable(
            "bad_safetensors", f"'images' must be uint8 (N, H, W, 3) with N, H, W >= 1, got {entry.dtype} {entry.shape}"
        )
    n, h, w, _ = entry.shape
    if n > limits.max_images:
        raise ApiError(413, "too_many_images", f"{n} images is over the limit of {limits.max_images}")
    if h * w > limits.max_pixels:
        raise ApiError(413, "image_too_large", f"{w}x{h} pixels is over the limit of {limits.max_pixels}")
    check_total_pixels(n * h * w, limits)
    size = n * h * w * 3
    if entry.data_offsets != (0, size) or len(raw) - 8 - header_len != size:
        raise bad_request(
            "bad_safetensors", f"'images' of shape {entry.shape} needs {size} data bytes at offsets [0, {size}]"
        )
    try:
        images = load_safetensors(raw)["images"]
    except Exception:  # the library's errors for a malformed file are of many types
        raise bad_request("bad_safetensors", "body is not a valid safetensors file") from None
    prompts = _metadata_strings(header.metadata, "prompts", required=True)
    models = _metadata_strings(header.metadata, "models", required=False)
    return images, prompts, models


def _metadata_strings(metadata: dict[str, str], key: str, required: bool) -> list[str] | None:
    if key not in metadata:
        if required:
            raise unprocessable("bad_safetensors", f"metadata has no {key!r} (a JSON list of strings)")
        return None
    return parse_string_list(metadata[key], f"metadata {key!r}")
