import ast
import hashlib
import inspect
import json
import re
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from pso import codecs
from pso.codecs import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    CorruptError,
    ExperienceRecord,
    KindMismatchError,
    SchemaError,
    ShapeMismatchError,
    TruncatedError,
    VersionMismatchError,
    WeightBundle,
    decode_experience,
    decode_weights,
    encode_experience,
    encode_weights,
    tensor_spec,
)

HEADER = 47  # struct.calcsize("<4sHBQ32s")


def make_record(g: int = 3, n: int = 4, dtype: torch.dtype = torch.float32, **overrides) -> ExperienceRecord:
    gen = torch.Generator().manual_seed(0)
    fields = dict(
        prompt="a red cube on a blue sphere ✓",
        states=torch.randn(g, n + 1, 4, 8, 8, generator=gen).to(dtype),
        timesteps=[999.0, 749.5, 499.0, 249.25][:n],
        stds=torch.tensor([0.3, 0.2, 0.1, 0.0][:n]),
        scores=torch.rand(g, generator=gen),
        pairs=[(0, 1), (2, 1)],
        policy_version=7,
        actor_id="actor-3",
        created_at=1718000000.125,
        seeds=[11, 12, 13][:g],
        reward_details={"clip": [0.1, 0.2, 0.3][:g], "aesthetic": [5.0, 6.5, 4.25][:g]},
        extra={"family": "sd-turbo", "num_steps": n, "sampler": "sde"},
    )
    fields.update(overrides)
    return ExperienceRecord(**fields)


def make_bundle(dtype: torch.dtype = torch.float32) -> WeightBundle:
    gen = torch.Generator().manual_seed(1)
    return WeightBundle(
        version=5,
        tensors={
            "unet.up.lora_B.weight": torch.randn(16, 4, generator=gen).to(dtype),
            "unet.down.lora_A.weight": torch.randn(4, 16, generator=gen).to(dtype),
        },
        kind="lora",
        base_model="stabilityai/sd-turbo@main",
        metadata={"rank": 4, "alpha": 4.0, "step": 120},
    )


def envelope(kind: int, body: bytes) -> bytes:
    """Wrap ``body`` in the documented header, with a valid checksum."""
    return struct.pack("<4sHBQ32s", MAGIC, FORMAT_VERSION, kind, len(body), hashlib.sha256(body).digest()) + body


def seal(kind: int, meta: dict, tensors: dict) -> bytes:
    """Build a record by hand from the documented format."""
    manifest = {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for k, t in tensors.items()}
    js = json.dumps({**meta, "tensors": manifest}).encode()
    return envelope(kind, struct.pack("<I", len(js)) + js + st_save(tensors))


def experience_meta(rec: ExperienceRecord) -> dict:
    return {
        "prompt": rec.prompt,
        "timesteps": rec.timesteps,
        "pairs": [list(p) for p in rec.pairs],
        "policy_version": rec.policy_version,
        "actor_id": rec.actor_id,
        "created_at": rec.created_at,
        "seeds": rec.seeds,
        "reward_details": rec.reward_details,
        "extra": rec.extra,
    }


def experience_tensors(rec: ExperienceRecord) -> dict:
    return {"states": rec.states, "stds": rec.stds, "scores": rec.scores}


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_experience_round_trip_is_exact(dtype):
    rec = make_record(dtype=dtype)
    data = encode_experience(rec)
    assert data[:4] == b"PSOB" and struct.unpack_from("<HB", data, 4) == (1, 1)

    out = decode_experience(data)
    assert out.states.dtype == dtype and torch.equal(out.states, rec.states)
    assert torch.equal(out.stds, rec.stds) and torch.equal(out.scores, rec.scores)
    for name in ("prompt", "timesteps", "pairs", "policy_version", "actor_id", "created_at", "seeds"):
        assert getattr(out, name) == getattr(rec, name), name
    assert out.reward_details == rec.reward_details and out.extra == rec.extra
    assert all(isinstance(p, tuple) for p in out.pairs)
    assert (out.group_size, out.num_steps) == (3, 4)


def test_experience_round_trip_is_canonical_and_matches_documented_format():
    rec = make_record()
    data = encode_experience(rec)
    assert encode_experience(decode_experience(data)) == data
    assert decode_experience(seal(1, experience_meta(rec), experience_tensors(rec))).seeds == rec.seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_round_trip_is_exact(dtype):
    bundle = make_bundle(dtype)
    out = decode_weights(encode_weights(bundle), expected=tensor_spec(bundle.tensors))
    assert list(out.tensors) == sorted(bundle.tensors)
    for name, t in bundle.tensors.items():
        assert out.tensors[name].dtype == dtype and torch.equal(out.tensors[name], t)
    assert (out.version, out.kind, out.base_model, out.metadata) == (
        5,
        "lora",
        bundle.base_model,
        bundle.metadata,
    )
    assert out.manifest() == bundle.manifest()


def test_manifest_and_tensor_spec():
    bundle = make_bundle(torch.bfloat16)
    assert bundle.manifest() == {
        "unet.down.lora_A.weight": {"dtype": "bfloat16", "shape": [4, 16]},
        "unet.up.lora_B.weight": {"dtype": "bfloat16", "shape": [16, 4]},
    }
    assert list(bundle.manifest()) == sorted(bundle.tensors)
    assert tensor_spec(bundle.tensors)["unet.up.lora_B.weight"] == (torch.bfloat16, (16, 4))


def test_weights_encode_non_contiguous_and_grad_tensors():
    weight = torch.nn.Parameter(torch.randn(4, 6))
    bundle = WeightBundle(version=0, tensors={"w": weight, "wt": weight.t()}, kind="full", base_model="m")
    out = decode_weights(encode_weights(bundle))
    assert torch.equal(out.tensors["wt"], weight.detach().t()) and not out.tensors["w"].requires_grad


# --- envelope errors ---------------------------------------------------------------------------------


def test_errors_are_value_errors():
    for cls in (TruncatedError, CorruptError, VersionMismatchError, KindMismatchError, ShapeMismatchError):
        assert issubclass(cls, CodecError) and issubclass(cls, ValueError)
    assert issubclass(SchemaError, CodecError)


@pytest.mark.parametrize("offset", [HEADER + 2, -1, HEADER - 1])
def test_flipped_byte_fails_checksum(offset):
    data = bytearray(encode_weights(make_bundle()))
    data[offset] ^= 0x01
    with pytest.raises(CorruptError, match="checksum mismatch"):
        decode_weights(bytes(data))


def test_bad_magic():
    data = b"NOPE" + encode_experience(make_record())[4:]
    with pytest.raises(CorruptError, match=r"not a PSO record: expected magic b'PSOB', got b'NOPE'"):
        decode_experience(data)


def test_truncated_header():
    data = encode_experience(make_record())
    with pytest.raises(TruncatedError, match=f"expected at least {HEADER} header bytes, got 10"):
        decode_experience(data[:10])
    with pytest.raises(TruncatedError, match="got 0"):
        decode_experience(b"")


def test_truncated_body():
    data = encode_weights(make_bundle())
    body_len = len(data) - HEADER
    msg = re.escape(f"expected {len(data)} bytes (header {HEADER} + body {body_len}), got {len(data) - 5}")
    with pytest.raises(TruncatedError, match=msg):
        decode_weights(data[:-5])
    with pytest.raises(TruncatedError, match=f"got {HEADER}$"):
        decode_weights(data[:HEADER])


def test_trailing_bytes():
    data = encode_weights(make_bundle())
    with pytest.raises(CorruptError, match=f"expected {len(data)} bytes, got {len(data) + 3} \\(3 trailing bytes\\)"):
        decode_weights(data + b"xyz")


def test_wrong_version():
    data = bytearray(encode_experience(make_record()))
    struct.pack_into("<H", data, 4, FORMAT_VERSION + 1)
    with pytest.raises(VersionMismatchError, match="format version 2 is not supported, expected 1"):
        decode_experience(bytes(data))


def test_wrong_kind():
    with pytest.raises(KindMismatchError, match=r"expected experience record \(kind 1\), got weight bundle \(kind 2\)"):
        decode_experience(encode_weights(make_bundle()))
    with pytest.raises(KindMismatchError, match=r"expected weight bundle \(kind 2\), got experience record"):
        decode_weights(encode_experience(make_record()))
    data = bytearray(encode_weights(make_bundle()))
    data[6] = 9
    with pytest.raises(KindMismatchError, match=r"got unknown kind \(kind 9\)"):
        decode_weights(bytes(data))


# --- payload errors behind a valid checksum ----------------------------------------------------------


def test_unparsable_json_and_safetensors():
    body = struct.pack("<I", 5) + b"{nope" + st_save({})
    data = envelope(2, body)
    with pytest.raises(CorruptError, match="unparsable JSON metadata"):
        decode_weights(data)

    good = seal(2, {"version": 1, "kind": "full", "base_model": "m", "metadata": {}}, {"w": torch.ones(3)})
    body = good[HEADER:-4]
    data = envelope(2, body)
    with pytest.raises(CorruptError, match="unparsable safetensors payload"):
        decode_weights(data)


def test_json_length_beyond_body():
    body = struct.pack("<I", 1000) + b"{}"
    data = envelope(2, body)
    with pytest.raises(CorruptError, match="JSON length 1000 exceeds the 2 bytes left in the body"):
        decode_weights(data)


def test_missing_metadata_field():
    rec = make_record()
    meta = experience_meta(rec)
    del meta["actor_id"]
    with pytest.raises(CorruptError, match="missing metadata field 'actor_id'"):
        decode_experience(seal(1, meta, experience_tensors(rec)))
    with pytest.raises(CorruptError, match="metadata field 'version' has type str"):
        decode_weights(seal(2, {"version": "1", "kind": "full", "base_model": "m", "metadata": {}}, {}))


def test_tensor_disagrees_with_manifest():
    data = seal(2, {"version": 1, "kind": "full", "base_model": "m", "metadata": {}}, {"w": torch.ones(3)})
    js_len = struct.unpack_from("<I", data, HEADER)[0]
    meta = json.loads(data[HEADER + 4 : HEADER + 4 + js_len])
    meta["tensors"]["w"]["shape"] = [4]
    js = json.dumps(meta).encode()
    body = struct.pack("<I", len(js)) + js + data[HEADER + 4 + js_len :]
    data = envelope(2, body)
    with pytest.raises(ShapeMismatchError, match=re.escape("w: expected shape (4,) dtype float32, got shape (3,)")):
        decode_weights(data)


def test_decode_validates_experience_schema():
    rec = make_record()
    with pytest.raises(SchemaError, match=r"pair 5: expected \(winner, loser\)"):
        decode_experience(seal(1, experience_meta(rec) | {"pairs": [5]}, experience_tensors(rec)))
    meta = experience_meta(rec) | {"pairs": [[0, 3]]}
    with pytest.raises(SchemaError, match=r"pair \(0, 3\): expected \(winner, loser\)"):
        decode_experience(seal(1, meta, experience_tensors(rec)))
    tensors = experience_tensors(rec) | {"stds": torch.zeros(5)}
    with pytest.raises(ShapeMismatchError, match=re.escape("stds: expected shape (4,) dtype float32, got shape (5,)")):
        decode_experience(seal(1, experience_meta(rec), tensors))
    tensors = experience_tensors(rec)
    del tensors["scores"]
    with pytest.raises(ShapeMismatchError, match=r"expected \['scores', 'states', 'stds'\], got \['states', 'stds'\]"):
        decode_experience(seal(1, experience_meta(rec), tensors))


# --- schema and shape errors at encode ---------------------------------------------------------------


def test_states_steps_mismatch_refused_at_encode():
    rec = make_record()
    rec.states = rec.states[:, :4]
    with pytest.raises(ShapeMismatchError, match=re.escape("states: expected shape[1] == len(timesteps) + 1 == 5")):
        encode_experience(rec)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"states": torch.zeros(3, 5, 8, 8)},
            r"states: expected 5 dims \(G, N\+1, C, H, W\), got shape \(3, 5, 8, 8\)",
        ),
        (
            {"states": torch.zeros(3, 5, 1, 2, 2, dtype=torch.int64)},
            "states: expected a floating dtype, got int64",
        ),
        ({"scores": torch.zeros(2)}, re.escape("scores: expected shape (3,) dtype float32, got shape (2,)")),
        ({"scores": torch.zeros(3, dtype=torch.float64)}, "scores: .* got shape \\(3,\\) dtype float64"),
    ],
)
def test_shape_errors_at_encode(overrides, match):
    with pytest.raises(ShapeMismatchError, match=match):
        encode_experience(make_record(**overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"pairs": [(0, 3)]},
            r"pair \(0, 3\): expected \(winner, loser\) with distinct indices, .* samples in \[0, 3\)",
        ),
        ({"pairs": [(-1, 0)]}, r"pair \(-1, 0\)"),
        ({"pairs": [(1, 1)]}, r"pair \(1, 1\)"),
        ({"seeds": [1, 2]}, r"seeds: expected 3 ints \(one per sample\), got \[1, 2\]"),
        ({"reward_details": {"clip": [0.5]}}, r"reward_details\['clip'\]: expected a list of 3 values"),
        ({"policy_version": -1}, "policy_version must be an int >= 0, got -1"),
        ({"timesteps": [999.0, float("nan"), 1.0, 0.5]}, "timesteps must be finite numbers"),
        ({"extra": {"obj": object()}}, "metadata is not JSON-serialisable"),
        ({"stds": [0.1, 0.1, 0.1, 0.0]}, "stds must be a torch.Tensor, got list"),
        ({"target": 0, "pairs": [(0, -1)]}, r"pair \(0, -1\): .* the winner -1 \(the target\) or a sample"),
        ({"target": -2, "pairs": [(-1, 0)]}, "target must be an int >= 0"),
        ({"target": "0", "pairs": [(-1, 0)]}, "target must be an int >= 0"),
    ],
)
def test_schema_errors_at_encode(overrides, match):
    with pytest.raises(SchemaError, match=match):
        encode_experience(make_record(**overrides))


def test_target_records_round_trip():
    """A group of references to target image 4: every pair's winner is the target."""
    rec = make_record(target=4, pairs=[(-1, 0), (-1, 1), (-1, 2)])
    back = decode_experience(encode_experience(rec))
    assert back.target == 4 and back.pairs == [(-1, 0), (-1, 1), (-1, 2)]
    assert decode_experience(encode_experience(make_record())).target is None


def test_weight_bundle_schema_errors():
    with pytest.raises(SchemaError, match="version must be an int >= 0, got -2"):
        encode_weights(WeightBundle(version=-2, tensors={}, kind="lora", base_model="m"))
    with pytest.raises(SchemaError, match="kind must be 'lora' or 'full', got 'dora'"):
        encode_weights(WeightBundle(version=0, tensors={}, kind="dora", base_model="m"))


# --- expected spec on decode -------------------------------------------------------------------------


def test_expected_spec_shape_and_dtype_mismatch():
    bundle = make_bundle()
    spec = tensor_spec(bundle.tensors) | {"unet.down.lora_A.weight": (torch.float32, (8, 16))}
    msg = "unet.down.lora_A.weight: expected shape (8, 16) dtype float32, got shape (4, 16) dtype float32"
    with pytest.raises(ShapeMismatchError, match=re.escape(msg)):
        decode_weights(encode_weights(bundle), expected=spec)
    spec = tensor_spec(bundle.tensors) | {"unet.up.lora_B.weight": (torch.bfloat16, (16, 4))}
    with pytest.raises(ShapeMismatchError, match="lora_B.weight: expected .* dtype bfloat16, got .* dtype float32"):
        decode_weights(encode_weights(bundle), expected=spec)


def test_expected_spec_missing_and_unexpected_names():
    bundle = make_bundle()
    spec = tensor_spec(bundle.tensors)
    spec["unet.mid.lora_A.weight"] = spec.pop("unet.up.lora_B.weight")
    msg = r"missing tensors \['unet.mid.lora_A.weight'\]; unexpected tensors \['unet.up.lora_B.weight'\]"
    with pytest.raises(ShapeMismatchError, match=msg):
        decode_weights(encode_weights(bundle), expected=spec)


# --- no pickle ---------------------------------------------------------------------------------------


def test_module_does_not_use_pickle():
    tree = ast.parse(inspect.getsource(codecs))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[0] in {"pickle", "dill", "cloudpickle", "marshal"}}
    torch_io = [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "torch"
    ]
    assert "load" not in torch_io and "save" not in torch_io


# --- in-place decoding -------------------------------------------------------------------------------


def test_payload_is_aligned_and_tensors_are_views_of_a_writable_buffer():
    bundle = make_bundle()
    data = bytearray(encode_weights(bundle))
    js_len = struct.unpack_from("<I", data, HEADER)[0]
    assert (HEADER + 4 + js_len) % 8 == 0  # the JSON is padded with spaces, still valid JSON
    out = decode_weights(data)
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for t in out.tensors.values():
        assert base <= t.data_ptr() < base + len(data)
    out.tensors["unet.up.lora_B.weight"].zero_()  # writable, and the buffer is the caller's to give away
    assert data != encode_weights(bundle)


def test_read_only_and_unaligned_inputs_decode_exactly():
    bundle = make_bundle()
    data = encode_weights(bundle)
    out = decode_weights(data)  # bytes: one copy, the input is never written through
    out.tensors["unet.up.lora_B.weight"].zero_()
    assert data == encode_weights(bundle)
    meta = {"version": 5, "kind": "lora", "base_model": "m", "metadata": {}}
    unpadded = seal(2, meta, bundle.tensors)  # the documented format without padding: payload not aligned
    for name, t in decode_weights(bytearray(unpadded)).tensors.items():
        assert torch.equal(t, bundle.tensors[name])


def test_checksum_false_skips_only_the_hash():
    data = bytearray(encode_weights(make_bundle()))
    data[-1] ^= 0x01  # a tensor byte
    with pytest.raises(CorruptError, match="checksum mismatch"):
        decode_weights(data)
    assert decode_weights(data, checksum=False).version == 5
    data[4] = 9  # the envelope is still checked
    with pytest.raises(VersionMismatchError):
        decode_weights(data, checksum=False)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["w"].update(dtype="F7"), "F7"),
        (lambda h: h["w"].update(data_offsets=[0, 8]), "do not hold shape"),
        (lambda h: h["w"].update(data_offsets=[0, 12]), "gap or overlap"),
        (lambda h: h.pop("w"), "cover 12 of the 24 data bytes"),
    ],
)
def test_safetensors_header_is_checked(edit, match):
    payload = st_save({"w": torch.ones(3), "v": torch.zeros(3)})
    (n,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + n])
    edit(header)
    js = json.dumps(header).encode()
    payload = struct.pack("<Q", len(js)) + js + payload[8 + n :]
    meta = json.dumps({"version": 1, "kind": "full", "base_model": "m", "metadata": {}, "tensors": {}}).encode()
    with pytest.raises(CorruptError, match=f"unparsable safetensors payload: .*{match}"):
        decode_weights(envelope(2, struct.pack("<I", len(meta)) + meta + payload))
