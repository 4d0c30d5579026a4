"""Offline preference pairs in the Pick-a-Pic v2 layout (pso/preference_data.py), on a tiny parquet file."""

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pso.preference_data import PreferenceStream, preference

SIZE = 16
# row i: caption "c{i}"; labels per row (ties at 2, 5, 9), the image at CORRUPT is not an image
LABELS = [(1, 0), (0, 1), (0.5, 0.5), (1, 0), (0, 1), (0.5, 0.5), (1, 0), (1, 0), (0, 1), (0.5, 0.5), (0, 1), (1, 0)]
TIES = {2, 5, 9}
CORRUPT = 7


def png(seed: int, size: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_pickapic(path, rows: int = len(LABELS), extra: bool = True, offset: int = 0):
    cols = {
        "caption": [f"c{i + offset}" for i in range(rows)],
        "jpg_0": [b"not an image" if i + offset == CORRUPT else png(2 * (i + offset)) for i in range(rows)],
        "jpg_1": [png(2 * (i + offset) + 1) for i in range(rows)],
        "label_0": [float(LABELS[i + offset][0]) for i in range(rows)],
        "label_1": [float(LABELS[i + offset][1]) for i in range(rows)],
    }
    if extra:
        cols["best_image_uid"] = ["x"] * rows  # a Pick-a-Pic column the stream ignores
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture
def pickapic(tmp_path):
    return write_pickapic(tmp_path / "pickapic.parquet")


GOOD = [i for i in range(len(LABELS)) if i not in TIES and i != CORRUPT]


def captions(stream):
    return [pair.caption for pair in stream]


def test_two_ranks_are_disjoint_and_cover_the_set_skipping_ties_and_bad_rows(pickapic, caplog):
    streams = [PreferenceStream(pickapic, rank=r, world_size=2, image_size=SIZE) for r in range(2)]
    with caplog.at_level(logging.WARNING, logger="pso.preference_data"):
        seen = [list(s) for s in streams]
    names = [[p.caption for p in pairs] for pairs in seen]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1], key=lambda c: int(c[1:])) == [f"c{i}" for i in GOOD]
    # one file: datasets' rule keeps example i on rank i % world_size; index is the position in the shard
    for rank, pairs in enumerate(seen):
        assert all(int(p.caption[1:]) == rank + 2 * p.index for p in pairs)
    assert sum(s.ties for s in streams) == len(TIES)
    assert sum(s.bad_rows for s in streams) == 1 and streams[CORRUPT % 2].bad_reasons == {"image": 1}
    assert [s.position for s in streams] == [6, 6]
    assert "example 3, jpg_0: not a readable image" in caplog.text  # c7 is example 3 of rank 1
    pair = seen[0][0]
    assert pair.winner.shape == pair.loser.shape == (3, SIZE, SIZE) and pair.winner.dtype == torch.float32
    assert 0 <= pair.winner.min() and pair.winner.max() <= 1


def test_the_winner_is_the_labelled_image(pickapic):
    from pso.targets import image_tensor

    by_caption = {p.caption: p for p in PreferenceStream(pickapic, rank=0, world_size=1, image_size=SIZE)}
    for i in (0, 1):  # row 0 prefers jpg_0, row 1 jpg_1
        winner_seed = 2 * i + (0 if LABELS[i] == (1, 0) else 1)
        expected = image_tensor(png(winner_seed), SIZE, "w").float() / 255
        assert torch.equal(by_caption[f"c{i}"].winner, expected)
        assert not torch.equal(by_caption[f"c{i}"].loser, expected)


def test_resume_from_a_position_gives_exactly_the_remaining_rows(pickapic):
    full = PreferenceStream(pickapic, rank=1, world_size=2, image_size=SIZE)
    everything = [(p.index, p.caption) for p in full]
    first = PreferenceStream(pickapic, rank=1, world_size=2, image_size=SIZE)
    it = iter(first)
    taken = [next(it), next(it)]
    position = first.state()["position"]
    assert position == taken[-1].index + 1
    resumed = PreferenceStream(pickapic, rank=1, world_size=2, image_size=SIZE, start=position)
    rest = [(p.index, p.caption) for p in resumed]
    assert [(p.index, p.caption) for p in taken] + rest == everything
    assert resumed.position == full.position
    # iterating the same stream again continues from its position, too
    assert [(p.index, p.caption) for p in it] == rest


def test_several_files_split_by_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_pickapic(folder / "a.parquet", rows=6)
    write_pickapic(folder / "b.parquet", rows=6, offset=6)
    names = [captions(PreferenceStream(folder, rank=r, world_size=2, image_size=SIZE)) for r in range(2)]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1], key=lambda c: int(c[1:])) == [f"c{i}" for i in GOOD]


def test_bad_labels_captions_and_small_images_are_counted_not_fatal(tmp_path, caplog):
    table = pa.table(
        {
            "caption": ["ok", None, "", "labels", "small", "ok2"],
            "jpg_0": [png(0), png(1), png(2), png(3), png(4, size=4), png(5)],
            "jpg_1": [png(10), png(11), png(12), png(13), png(14), png(15)],
            "label_0": [1.0, 1.0, 0.0, 1.0, 0.0, None],
            "label_1": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    stream = PreferenceStream(tmp_path / "bad.parquet", rank=0, world_size=1, image_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="pso.preference_data"):
        assert captions(stream) == ["ok"]
    assert stream.bad_rows == 5 and stream.bad_reasons == {"caption": 2, "labels": 2, "image": 1}
    assert "labels 1.0/1.0 are neither a preference (1/0, 0/1) nor a tie (0.5/0.5)" in caplog.text
    assert "too small for image_size 16" in caplog.text


def test_labels():
    assert preference(1, 0) == 0 and preference(0.0, 1.0) == 1 and preference(0.5, 0.5) is None
    for bad in ((1, 1), (0, 0), (None, 1), (float("nan"), 0), (0.7, 0.3)):
        with pytest.raises(ValueError):
            preference(*bad)


def test_a_file_not_in_the_pickapic_layout_names_the_missing_columns(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [png(0)], "label_0": [1.0]}), tmp_path / "x.parquet")
    missing = r"x.parquet \(not in the Pick-a-Pic v2 layout\): missing the columns jpg_1, label_1 "
    with pytest.raises(ValueError, match=missing):
        PreferenceStream(tmp_path / "x.parquet", rank=0, world_size=1, image_size=SIZE)


def test_bad_sources_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        PreferenceStream(tmp_path / "missing.parquet", rank=0, world_size=1, image_size=SIZE)
    with pytest.raises(ValueError, match="no parquet files"):
        PreferenceStream(tmp_path, rank=0, world_size=1, image_size=SIZE)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        PreferenceStream(tmp_path, rank=2, world_size=2, image_size=SIZE)


def test_a_hub_id_offline_says_how_to_give_the_data_locally(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        PreferenceStream("hf:pso-test/no-such-pickapic", rank=0, world_size=1, image_size=SIZE)
    message = str(e.value)
    assert "pso-test/no-such-pickapic" in message and "hf download pso-test/no-such-pickapic" in message
    assert "parquet files with the Pick-a-Pic v2 columns caption, jpg_0, jpg_1, label_0, label_1" in message
