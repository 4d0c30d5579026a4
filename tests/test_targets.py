"""Target images with captions (pso/targets.py): loading from an imagefolder, parquet and the hub (offline), the
errors bad input gets, VAE encoding that `policy.decode` inverts on both shipped tiny models, the latent cache."""

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pso.config.schema import ModelConfig
from pso.policy import DistilledPolicy
from pso.targets import TargetLatentCache, encode_targets, load_targets, resize_crop
from pso.tiny.world import all_scenes, draw

SIZE = 32


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def noise(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def imagefolder(folder, images: dict[str, np.ndarray | bytes], lines: list) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(img if isinstance(img, bytes) else png(img))
    (folder / "metadata.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(folder)


def world_targets(folder, n: int = 6) -> str:
    """Tiny-world scenes (what the tiny models' VAE was trained on) as an imagefolder."""
    rng = np.random.default_rng(0)
    scenes = all_scenes()[:: len(all_scenes()) // n][:n]
    images = {f"{i}.png": draw(s, rng) for i, s in enumerate(scenes)}
    return imagefolder(folder, images, [{"file_name": f"{i}.png", "text": s.prompt} for i, s in enumerate(scenes)])


def test_imagefolder_targets(tmp_path):
    imgs = {"a.png": noise(0), "sub/b.jpg": noise(1, 64, 32)}
    lines = [{"file_name": "a.png", "text": " a style "}, {"file_name": "sub/b.jpg", "text": "b", "other": 1}]
    targets = load_targets(imagefolder(tmp_path / "t", imgs, lines), image_size=SIZE)
    assert targets.captions == ["a style", "b"] and targets.ids == [0, 1] and len(targets) == 2
    assert targets.images.shape == (2, 3, SIZE, SIZE) and targets.images.dtype == torch.uint8
    assert targets.files == [str(tmp_path / "t" / "a.png"), str(tmp_path / "t" / "sub/b.jpg")]
    pixels = targets.pixels()
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1
    # the rule: short side resized to SIZE, centre crop
    expected = np.array(resize_crop(Image.fromarray(noise(0)), SIZE))
    assert torch.equal(targets.images[0], torch.from_numpy(expected).permute(2, 0, 1))
    again = load_targets(str(tmp_path / "t"), image_size=SIZE)
    assert again.digest == targets.digest


def test_resize_crop_rule():
    im = Image.new("RGB", (100, 50))
    im.paste((255, 0, 0), (0, 0, 25, 50))  # the left quarter is cropped away
    out = resize_crop(im, 20)
    assert out.size == (20, 20) and np.asarray(out)[:, :, 0].max() < 40


def test_parquet_targets_with_struct_and_raw_bytes(tmp_path):
    table = pa.table(
        {
            "image": [{"bytes": png(noise(0)), "path": None}, {"bytes": png(noise(1)), "path": None}],
            "text": ["one", "two"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    targets = load_targets(tmp_path / "t.parquet", image_size=SIZE)
    assert targets.captions == ["one", "two"] and targets.files[1] == f"{tmp_path / 't.parquet'}, row 1"
    folder = tmp_path / "raw"
    folder.mkdir()
    pq.write_table(pa.table({"img": [png(noise(0))], "prompt": ["one"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"img": [png(noise(1))], "prompt": ["two"]}), folder / "part-1.parquet")
    raw = load_targets(folder, image_size=SIZE, image_column="img", caption_column="prompt")
    assert raw.captions == ["one", "two"] and torch.equal(raw.images, targets.images)
    with pytest.raises(ValueError, match=r"t.parquet: missing the column caption \(its columns: image, text\)"):
        load_targets(tmp_path / "t.parquet", image_size=SIZE, caption_column="caption")
    pq.write_table(pa.table({"image": [png(noise(0)), b"junk"], "text": ["a", "b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet, row 1: not a readable image"):
        load_targets(tmp_path / "bad.parquet", image_size=SIZE)
    pq.write_table(pa.table({"image": [png(noise(0))], "text": [None]}), tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match=r"nocap.parquet, row 0: no caption \(the 'text' column is missing or null\)"):
        load_targets(tmp_path / "nocap.parquet", image_size=SIZE)


def bomb(w: int, h: int) -> bytes:
    """A 1-bit PNG of w x h pixels: a few kB on disk, w * h pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")
    return buf.getvalue()


BAD_FOLDERS = [
    ({"a.png": b"\x89PNG\r\n\x1a\n garbage"}, [{"file_name": "a.png", "text": "x"}], r"a.png: not a readable image"),
    ({"a.png": png(noise(0))[:200]}, [{"file_name": "a.png", "text": "x"}], r"a.png: a corrupt image"),
    (
        {"a.png": noise(0)},
        [{"file_name": "a.png"}],
        r"metadata.jsonl, line 1 \(a.png\): no caption \(the 'text' column is missing or null\)",
    ),
    ({"a.png": noise(0)}, [{"file_name": "a.png", "text": "  "}], r"line 1 \(a.png\): the caption \('text'\) is empty"),
    ({"a.png": noise(0)}, [{"file_name": "a.png", "text": 3}], r"caption \('text'\) must be a string, got int"),
    ({}, [{"file_name": "gone.png", "text": "x"}], r"line 1: gone.png is listed in metadata.jsonl but missing from"),
    (
        {"a.png": noise(0), "b.png": noise(1)},
        [{"file_name": "a.png", "text": "x"}],
        r"b.png: an image in the folder with no entry in .*metadata.jsonl",
    ),
    ({}, [], r"no targets \(zero rows or images\)"),
    ({"a.png": noise(0)}, ["not json"], r"metadata.jsonl, line 1: not JSON"),
    ({"a.png": noise(0)}, [{"text": "x"}], r"line 1: no file_name"),
    ({"a.png": noise(0)}, [{"file_name": "../a.png", "text": "x"}], r"line 1: file_name '../a.png' is outside"),
    (
        {"a.png": noise(0)},
        [{"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}],
        r"line 2: a.png is listed twice \(first on line 1\)",
    ),
    (
        {"a.png": noise(0, 15, 40)},
        [{"file_name": "a.png", "text": "x"}],
        r"a.png: 40x15 is too small for image_size 32 \(the short side must be at least 16 px\)",
    ),
    (
        {"a.png": bomb(5000, 4000)},
        [{"file_name": "a.png", "text": "x"}],
        r"a.png: 5000x4000 pixels is over the limit of 16777216 \(a decompression bomb\?\)",
    ),
    (  # over PIL's own limit: refused while the header is read
        {"a.png": bomb(20000, 20000)},
        [{"file_name": "a.png", "text": "x"}],
        r"a.png: over the pixel limit of 16777216 \(a decompression bomb\?\)",
    ),
]


@pytest.mark.parametrize("images,lines,message", BAD_FOLDERS)
def test_bad_imagefolders_name_the_file_and_the_problem(tmp_path, images, lines, message):
    with pytest.raises(ValueError, match=message):
        load_targets(imagefolder(tmp_path / "t", images, lines), image_size=SIZE)


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no targets \(no metadata.jsonl, no images and no parquet files\)"):
        load_targets(tmp_path / "empty", image_size=SIZE)
    (tmp_path / "nometa").mkdir()
    (tmp_path / "nometa" / "x.png").write_bytes(png(noise(0)))
    with pytest.raises(ValueError, match=r'1 images but no metadata.jsonl to caption them: .*"file_name": "x.png"'):
        load_targets(tmp_path / "nometa", image_size=SIZE)
    with pytest.raises(ValueError, match=r"nowhere: no such file or folder"):
        load_targets(tmp_path / "nowhere", image_size=SIZE)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"t.csv: not a parquet file"):
        load_targets(tmp_path / "t.csv", image_size=SIZE)


def test_too_many_targets(tmp_path):
    images = {f"{i}.png": noise(i) for i in range(3)}
    folder = imagefolder(tmp_path / "t", images, [{"file_name": n, "text": n} for n in images])
    with pytest.raises(ValueError, match=r"3 targets, more than 2 \(the limit, max_images\)"):
        load_targets(folder, image_size=SIZE, max_images=2)
    assert len(load_targets(folder, image_size=SIZE, max_images=3)) == 3
    table = pa.table({"image": [png(noise(i)) for i in range(3)], "text": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"more than 2 targets \(the limit, max_images\)"):
        load_targets(tmp_path / "t.parquet", image_size=SIZE, max_images=2)


def test_a_hub_id_offline_says_how_to_give_the_data_locally(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "pso-test/no-such-style" is no local path here: read as a hub id
    for source in ("hf:pso-test/no-such-style", "pso-test/no-such-style"):
        with pytest.raises(ValueError) as e:
            load_targets(source, image_size=SIZE)
        message = str(e.value)
        assert "the Hugging Face dataset 'pso-test/no-such-style' (split 'train') for the targets" in message
        assert "hf download pso-test/no-such-style --repo-type dataset --local-dir DIR" in message
        assert "a folder of images with a metadata.jsonl, or parquet files with 'image' and 'text' columns" in message


@pytest.fixture(scope="module")
def tiny_policies():
    return {
        family: DistilledPolicy.from_config(ModelConfig(family=family, pretrained=f"builtin:{family}"), None)
        for family in ("tiny", "tiny-flow")
    }


@pytest.mark.parametrize("family", ["tiny", "tiny-flow"])
def test_decode_inverts_encode_on_the_tiny_models(tmp_path, tiny_policies, family):
    policy = tiny_policies[family]
    targets = load_targets(world_targets(tmp_path / "t"), image_size=policy.image_size)
    latents = encode_targets(policy, targets, batch_size=4)
    assert latents.shape == (len(targets), *policy.latent_shape) and latents.dtype == torch.float32
    assert 0.5 < latents.std() < 2  # the sampler's unit-variance state units, not raw VAE latents
    err = policy.decode(latents) - targets.pixels()
    assert err.abs().mean() < 0.05 and 10 * torch.log10(1 / err.pow(2).mean()) > 20  # measured: 0.033, 24 dB
    # the scaling is the one decode undoes: decoding without it is far off
    assert (policy.decode(latents * 2) - targets.pixels()).abs().mean() > 2 * err.abs().mean()
    with pytest.raises(ValueError, match=r"the targets are 16 px, the model samples 32 px"):
        encode_targets(policy, load_targets(str(tmp_path / "t"), image_size=16), batch_size=4)


def test_the_latent_cache(tmp_path, tiny_policies, caplog):
    policy = tiny_policies["tiny"]
    targets = load_targets(world_targets(tmp_path / "t", n=3), image_size=SIZE)
    cache = TargetLatentCache(tmp_path / "cache")
    latents = cache.get(policy, targets)
    (path,) = (tmp_path / "cache").iterdir()
    assert torch.equal(latents, encode_targets(policy, targets))
    assert torch.equal(load_file(path)["latents"], latents)
    # a restart reads the file, encoding nothing
    calls = []
    import pso.targets

    real = pso.targets.encode_targets
    pso.targets.encode_targets = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert torch.equal(cache.get(policy, targets), latents) and not calls
        # corrupt, stale (another key) or wrongly shaped files are ignored and rewritten
        with caplog.at_level(logging.WARNING, logger="pso.targets"):
            path.write_bytes(b"\x00" * 20)
            assert torch.equal(cache.get(policy, targets), latents) and len(calls) == 1
            assert "is unreadable" in caplog.text
            key = cache.key(policy, targets)
            save_file({"latents": latents + 1}, path, metadata={"format": cache.FORMAT, "key": "0" * 64})
            assert torch.equal(cache.get(policy, targets), latents) and len(calls) == 2
            assert "written for other targets or another VAE" in caplog.text
            save_file({"latents": latents[:1]}, path, metadata={"format": cache.FORMAT, "key": key})
            assert torch.equal(cache.get(policy, targets), latents) and len(calls) == 3
            assert "expected torch.float32 (3, 4, 8, 8)" in caplog.text
            save_file({"latents": latents * float("nan")}, path, metadata={"format": cache.FORMAT, "key": key})
            assert torch.equal(cache.get(policy, targets), latents) and len(calls) == 4
            assert "not finite" in caplog.text
        assert torch.equal(load_file(path)["latents"], latents)  # rewritten
    finally:
        pso.targets.encode_targets = real
    # other targets, or the other model's VAE config, get another file
    other = load_targets(world_targets(tmp_path / "u", n=2), image_size=SIZE)
    assert cache.key(policy, other) != cache.key(policy, targets)
    assert cache.key(tiny_policies["tiny-flow"], targets) != cache.key(policy, targets)


@pytest.mark.parametrize(
    "family,arch",
    [("flux-schnell", "flux"), ("flux2-klein", "flux2"), ("z-image-turbo", "zimage"), ("sd35-turbo", "sd3"),
     ("qwen-image-lightning", "qwenimage"), ("sana-sprint", "sana")],
)  # fmt: skip
def test_every_flow_architecture_encodes_targets_into_its_sampler_states(tiny_flow_models, family, arch):
    """Each denoiser's vae_encode inverts its own decode's latent transform (patches, batch-norm statistics,
    frames, shift and scale), so the targets come out in the shape of the sampler's final states."""
    model = ModelConfig(family=family, pretrained=str(tiny_flow_models(arch)), resolution=SIZE)
    policy = DistilledPolicy.from_config(model, None)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    latents = policy.denoiser.vae_encode(images)
    assert latents.shape == (2, *policy.latent_shape) and torch.isfinite(latents).all()
    assert policy.decode(latents).shape == (2, 3, SIZE, SIZE)
