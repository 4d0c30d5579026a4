"""Byte codecs for experience records (actor -> learner) and weight bundles (learner -> actors).

No pickle is used anywhere: tensors travel as safetensors bytes, metadata as UTF-8 JSON.

Envelope (all integers little-endian)::

    header = struct.pack("<4sHBQ32s", MAGIC, FORMAT_VERSION, kind_code, body_len, sha256(body))
    body   = struct.pack("<I", json_len) + json_bytes + safetensors_bytes

* ``MAGIC`` is ``b"PSOB"``, ``FORMAT_VERSION`` is 1.
* ``kind_code`` is 1 for an :class:`ExperienceRecord`, 2 for a :class:`WeightBundle`.
* ``body_len`` is the body length in bytes; ``sha256(body)`` is the 32-byte raw digest of the body.
* The JSON object holds the non-tensor fields plus ``"tensors"``: a manifest
  ``{name: {"dtype": "float32", "shape": [...]}}`` of the safetensors payload.

Decoding checks, in this order: the header is complete (:class:`TruncatedError`), the magic
(:class:`CorruptError`), the format version (:class:`VersionMismatchError`), the kind
(:class:`KindMismatchError`), the body is complete (:class:`TruncatedError`) with no trailing bytes
(:class:`CorruptError`), the checksum (:class:`CorruptError`), the JSON and safetensors payloads and
required fields (:class:`CorruptError`), then the tensors against the manifest and the record schema
(:class:`ShapeMismatchError` for shapes and dtypes, :class:`SchemaError` for other invariants).
The body length is checked after the version because the header layout belongs to the version.

The encoder pads the JSON with spaces so that the safetensors payload starts 8-byte aligned (JSON
allows the whitespace; decoders of either kind read both). Decoding loads the tensors in place: they
are views of one writable buffer (the data itself when it is a writable ``bytearray``, else one copy
of it), and a tensor whose bytes are not aligned to its element size is copied alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import save as st_save

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "CorruptError",
    "ExperienceRecord",
    "KindMismatchError",
    "SchemaError",
    "ShapeMismatchError",
    "TruncatedError",
    "VersionMismatchError",
    "WeightBundle",
    "decode_experience",
    "decode_weights",
    "encode_experience",
    "encode_weights",
    "tensor_spec",
]

MAGIC = b"PSOB"
FORMAT_VERSION = 1
KIND_EXPERIENCE = 1
KIND_WEIGHTS = 2
_KIND_NAMES = {KIND_EXPERIENCE: "experience record", KIND_WEIGHTS: "weight bundle"}
_HEADER = struct.Struct("<4sHBQ32s")
_JSON_LEN = struct.Struct("<I")
_ST_LEN = struct.Struct("<Q")
_PAYLOAD_ALIGN = 8
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

TensorSpec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class CodecError(ValueError):
    """Base class of every encoding/decoding error in this module."""


class TruncatedError(CodecError):
    """Fewer bytes than the header or the declared body length."""


class CorruptError(CodecError):
    """Not a PSO record, checksum mismatch, trailing bytes or unparsable payload."""


class VersionMismatchError(CodecError):
    """The record was written with another format version."""


class KindMismatchError(CodecError):
    """The record holds another kind of payload than the decoder expects."""


class ShapeMismatchError(CodecError):
    """Tensor names, shapes or dtypes disagree with the declared schema."""


class SchemaError(CodecError):
    """A non-shape invariant of a record or bundle is violated."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_tensor(name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise SchemaError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _shape_problem(name: str, tensor: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> str | None:
    """Message if ``tensor`` does not have ``dtype`` (a name such as "float32") and ``shape``, else None."""
    got_dtype, got_shape = _dtype_name(tensor.dtype), tuple(tensor.shape)
    if (got_dtype, got_shape) == (dtype, shape):
        return None
    return f"{name}: expected shape {shape} dtype {dtype}, got shape {got_shape} dtype {got_dtype}"


def _require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    problem = _shape_problem(name, tensor, _dtype_name(dtype), shape)
    if problem:
        raise ShapeMismatchError(problem)


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> TensorSpec:
    """``{name: (dtype, shape)}`` of ``tensors``, usable as ``expected`` in :func:`decode_weights`."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _manifest(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    return {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in sorted(tensors.items())}


def _check_spec(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[str, tuple]], what: str) -> None:
    """Raise :class:`ShapeMismatchError` listing every way ``tensors`` differ from ``expected``
    ({name: (dtype name, shape)}): missing and unexpected names, then per-tensor shape/dtype."""
    problems = []
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(expected.keys() & tensors.keys()):
        dtype, shape = expected[name]
        problems.append(_shape_problem(name, tensors[name], dtype, tuple(shape)))
    problems = [p for p in problems if p]
    if problems:
        raise ShapeMismatchError(f"{what}: " + "; ".join(problems))


def _pack(kind_code: int, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {**meta, "tensors": _manifest(cpu)}
    try:
        json_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"metadata is not JSON-serialisable: {exc}") from exc
    json_bytes += b" " * (-(_HEADER.size + _JSON_LEN.size + len(json_bytes)) % _PAYLOAD_ALIGN)
    body = _JSON_LEN.pack(len(json_bytes)) + json_bytes + st_save(cpu)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, kind_code, len(body), hashlib.sha256(body).digest()) + body


def _load_safetensors(view: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors bytes ``view`` (writable, format "B"; little-endian data, read
    as the host's order: torch has no big-endian hosts to speak of) as views of it, after the
    checks safetensors' own loader makes: a complete header, known dtypes, and data offsets that match
    each shape and tile the data area exactly. Raises ValueError naming the problem."""
    if len(view) < _ST_LEN.size:
        raise ValueError(f"{len(view)} bytes, fewer than the 8-byte header length")
    (header_len,) = _ST_LEN.unpack_from(view)
    start = _ST_LEN.size + header_len
    if start > len(view):
        raise ValueError(f"header of {header_len} bytes exceeds the {len(view) - _ST_LEN.size} bytes left")
    header = json.loads(str(view[_ST_LEN.size : start], "utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data = view[start:]
    tensors, spans = {}, []
    for name, info in header.items():
        dtype = _ST_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
        size = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or end - begin != size:
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} of {dtype}")
        spans.append((begin, end))
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data[begin:end], dtype=torch.uint8)
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # torch's allocations are aligned
        tensors[name] = raw.view(dtype).reshape(shape)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError(f"data offsets leave a gap or overlap at byte {covered}")
        covered = end
    if covered != len(data):
        raise ValueError(f"tensors cover {covered} of the {len(data)} data bytes")
    return tensors


def _unpack(data: bytes | bytearray, kind_code: int, checksum: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check the envelope of ``data`` and return (JSON metadata, tensors checked against the manifest).
    ``checksum=False`` skips the SHA-256 pass, for bytes already checked against a digest of them."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise TruncatedError(f"expected at least {_HEADER.size} header bytes, got {len(view)}")
    magic, version, kind, body_len, digest = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptError(f"not a PSO record: expected magic {MAGIC!r}, got {magic!r}")
    if version != FORMAT_VERSION:
        raise VersionMismatchError(f"format version {version} is not supported, expected {FORMAT_VERSION}")
    if kind != kind_code:
        got = _KIND_NAMES.get(kind, "unknown kind")
        raise KindMismatchError(f"expected {_KIND_NAMES[kind_code]} (kind {kind_code}), got {got} (kind {kind})")
    total = _HEADER.size + body_len
    if len(view) < total:
        raise TruncatedError(f"expected {total} bytes (header {_HEADER.size} + body {body_len}), got {len(view)}")
    if len(view) > total:
        raise CorruptError(f"expected {total} bytes, got {len(view)} ({len(view) - total} trailing bytes)")
    body = view[_HEADER.size :]
    if checksum and hashlib.sha256(body).digest() != digest:
        raise CorruptError("checksum mismatch: body SHA-256 differs from the header")
    if body_len < _JSON_LEN.size:
        raise CorruptError(f"body of {body_len} bytes is too short for the {_JSON_LEN.size}-byte JSON length")
    (json_len,) = _JSON_LEN.unpack_from(body)
    json_end = _JSON_LEN.size + json_len
    if json_end > body_len:
        raise CorruptError(f"JSON length {json_len} exceeds the {body_len - _JSON_LEN.size} bytes left in the body")
    try:
        meta = json.loads(str(body[_JSON_LEN.size : json_end], "utf-8"))
    except ValueError as exc:
        raise CorruptError(f"unparsable JSON metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptError(f"JSON metadata must be an object, got {type(meta).__name__}")
    if body.readonly:  # the tensors are views of the buffer, and torch wants it writable
        body = memoryview(bytearray(body))
    try:
        tensors = _load_safetensors(body[json_end:])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptError(f"unparsable safetensors payload: {exc!r}") from exc
    manifest = _field(meta, "tensors", dict)
    try:
        declared = {name: (spec["dtype"], tuple(spec["shape"])) for name, spec in manifest.items()}
    except (KeyError, TypeError) as exc:
        raise CorruptError(f"malformed tensor manifest: {exc!r}") from exc
    _check_spec(tensors, declared, "tensors disagree with the manifest")
    return meta, tensors


def _field(meta: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in meta:
        raise CorruptError(f"missing metadata field {name!r}")
    value = meta[name]
    if not isinstance(value, kind):
        raise CorruptError(f"metadata field {name!r} has type {type(value).__name__}, expected {kind}")
    return value


TARGET = -1  # the winner index of a pair whose winner is the record's target image, not one of its samples


@dataclass(eq=False)
class ExperienceRecord:
    """One prompt's group of G sampled trajectories with rewards and preference pairs.

    With target images (style transfer, customization) the group holds references sampled for target
    `target`'s caption, and each pair is (TARGET, reference index).
    """

    prompt: str
    states: torch.Tensor  # (G, N+1, C, H, W) float; states[:, k] is the latent at timesteps[k], [:, N] final
    timesteps: list[float]  # the N distilled timesteps as sampled
    stds: torch.Tensor  # (N,) float32: std of the Gaussian transition k -> k+1 (0 if deterministic)
    scores: torch.Tensor  # (G,) float32 final reward per sample
    pairs: list[tuple[int, int]]  # (winner_index, loser_index) into the G samples
    policy_version: int
    actor_id: str
    created_at: float  # unix seconds
    seeds: list[int]  # length G, per-sample seed
    reward_details: dict[str, list[float]] = field(default_factory=dict)  # per named reward, length G each
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras
    target: int | None = None  # index of the target image the group was sampled for (target mode)

    @property
    def group_size(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def validate(self) -> None:
        """Raise :class:`ShapeMismatchError` or :class:`SchemaError` if the record is inconsistent."""
        for name in ("states", "stds", "scores"):
            _require_tensor(name, getattr(self, name))
        if self.states.ndim != 5:
            raise ShapeMismatchError(f"states: expected 5 dims (G, N+1, C, H, W), got shape {tuple(self.states.shape)}")
        if not self.states.is_floating_point():
            raise ShapeMismatchError(f"states: expected a floating dtype, got {_dtype_name(self.states.dtype)}")
        g, n = self.group_size, self.num_steps
        if self.states.shape[1] != n + 1:
            raise ShapeMismatchError(
                f"states: expected shape[1] == len(timesteps) + 1 == {n + 1}, got shape {tuple(self.states.shape)}"
            )
        _require_shape("stds", self.stds, (n,), torch.float32)
        _require_shape("scores", self.scores, (g,), torch.float32)
        if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in self.timesteps):
            raise SchemaError(f"timesteps must be finite numbers, got {self.timesteps}")
        if len(self.seeds) != g or not all(isinstance(s, int) for s in self.seeds):
            raise SchemaError(f"seeds: expected {g} ints (one per sample), got {self.seeds}")
        for name, values in self.reward_details.items():
            if not isinstance(values, list) or len(values) != g:
                raise SchemaError(f"reward_details[{name!r}]: expected a list of {g} values, got {values!r}")
        if self.target is not None and (not isinstance(self.target, int) or self.target < 0):
            raise SchemaError(f"target must be an int >= 0 (a target image's index), got {self.target!r}")
        lowest = TARGET if self.target is not None else 0
        for pair in self.pairs:
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(i, int) and lowest <= i < g for i in pair)
                or pair[0] == pair[1]
                or pair[1] == TARGET
            ):
                winner = f"{TARGET} (the target) or a sample" if self.target is not None else "a sample"
                raise SchemaError(
                    f"pair {pair}: expected (winner, loser) with distinct indices, the winner {winner}, "
                    f"samples in [0, {g})"
                )
        if not isinstance(self.policy_version, int) or self.policy_version < 0:
            raise SchemaError(f"policy_version must be an int >= 0, got {self.policy_version!r}")


def encode_experience(rec: ExperienceRecord) -> bytes:
    rec.validate()
    meta = {
        "prompt": rec.prompt,
        "timesteps": [float(t) for t in rec.timesteps],
        "pairs": [list(p) for p in rec.pairs],
        "policy_version": rec.policy_version,
        "actor_id": rec.actor_id,
        "created_at": rec.created_at,
        "seeds": rec.seeds,
        "reward_details": rec.reward_details,
        "extra": rec.extra,
        "target": rec.target,
    }
    return _pack(KIND_EXPERIENCE, meta, {"states": rec.states, "stds": rec.stds, "scores": rec.scores})


def decode_experience(data: bytes | bytearray) -> ExperienceRecord:
    meta, tensors = _unpack(data, KIND_EXPERIENCE)
    if tensors.keys() != {"states", "stds", "scores"}:
        raise ShapeMismatchError(f"experience tensors: expected ['scores', 'states', 'stds'], got {sorted(tensors)}")
    rec = ExperienceRecord(
        prompt=_field(meta, "prompt", str),
        states=tensors["states"],
        timesteps=_field(meta, "timesteps", list),
        stds=tensors["stds"],
        scores=tensors["scores"],
        pairs=[tuple(p) if isinstance(p, list) else p for p in _field(meta, "pairs", list)],
        policy_version=_field(meta, "policy_version", int),
        actor_id=_field(meta, "actor_id", str),
        created_at=float(_field(meta, "created_at", (int, float))),
        seeds=_field(meta, "seeds", list),
        reward_details=_field(meta, "reward_details", dict),
        extra=_field(meta, "extra", dict),
        target=meta.get("target"),  # absent in records written before target mode: none
    )
    rec.validate()
    return rec


@dataclass(eq=False)
class WeightBundle:
    """Trainable weights of one policy version, published by the learner to the actors."""

    version: int  # policy version, >= 0
    tensors: dict[str, torch.Tensor]  # trainable weights by parameter name
    kind: Literal["lora", "full"]
    base_model: str  # identity of the base model these apply to
    metadata: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, dict]:
        """``{name: {"dtype": "float32", "shape": [...]}}`` sorted by name."""
        return _manifest(self.tensors)

    def validate(self) -> None:
        if not isinstance(self.version, int) or self.version < 0:
            raise SchemaError(f"version must be an int >= 0, got {self.version!r}")
        if self.kind not in ("lora", "full"):
            raise SchemaError(f"kind must be 'lora' or 'full', got {self.kind!r}")
        for name, t in self.tensors.items():
            _require_tensor(f"tensors[{name!r}]", t)


def encode_weights(bundle: WeightBundle) -> bytes:
    bundle.validate()
    meta = {
        "version": bundle.version,
        "kind": bundle.kind,
        "base_model": bundle.base_model,
        "metadata": bundle.metadata,
    }
    return _pack(KIND_WEIGHTS, meta, bundle.tensors)


def decode_weights(
    data: bytes | bytearray,
    expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
    *,
    checksum: bool = True,
) -> WeightBundle:
    """Decode a weight bundle; with ``expected`` ({name: (dtype, shape)}), require exactly those tensors.

    The tensors are views of ``data`` when it is a writable buffer (a ``bytearray``, as
    ``WeightStore.fetch`` returns), else of one copy. ``checksum=False`` skips the body's SHA-256, for
    bytes that ``WeightStore.fetch`` checked against the checksum taken of these very bytes at publishing.
    """
    meta, tensors = _unpack(data, KIND_WEIGHTS, checksum)
    if expected is not None:
        spec = {name: (_dtype_name(dtype), tuple(shape)) for name, (dtype, shape) in expected.items()}
        _check_spec(tensors, spec, "weights disagree with the expected spec")
    bundle = WeightBundle(
        version=_field(meta, "version", int),
        tensors=dict(sorted(tensors.items())),
        kind=_field(meta, "kind", str),
        base_model=_field(meta, "base_model", str),
        metadata=_field(meta, "metadata", dict),
    )
    bundle.validate()
    return bundle
