"""Parquet shards of uint8 HWC images plus a `manifest.json`, written atomically and reproducibly.

Layout of one split:

    <split_dir>/shard-00000.parquet, shard-00001.parquet, ...
    <split_dir>/manifest.json

Each shard has one row per image: `image` (binary: raw uint8 HWC bytes in C order, or a PNG
file when `encoding="png"`), `label` (int64, -1 when unlabelled) and `source` (string naming
where the image came from). Raw is the default: decoding is a reshape instead of a PNG decode per
image, and zstd at the Parquet level recovers most of PNG's saving on small images.

The manifest records the dataset, split, shape [H, W, C], count, label names and counts, the
encoding, the reader's configuration and, per shard, its file name, rows, bytes and sha256.

Reproducibility: the writer fixes every Parquet option that could vary (compression, one row
group per shard, no dictionary or statistics on the image column); Parquet files carry no
timestamps, so the same rows give byte-identical shards with the same pyarrow version.

Atomicity: a split is built in a hidden staging folder beside its destination and renamed into
place once its manifest is written, so readers see either the old complete split or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from ddpm.images import png_bytes
from ddpm.io_utils import atomic_write, file_digest, write_json

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:05d}.parquet"
SHARD_KEYS = ("file", "rows", "bytes", "sha256")
FORMAT = "ddpm-shards/1"
ENCODINGS = ("raw", "png")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("source", pa.string())])
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_shard_name(name: Any, where: str) -> str:
    """A manifest's shard `file` is a plain file name inside its split folder: no '/', no
    backslash, not '.', '..' or empty (so never '../../elsewhere/x.parquet' or '/etc/passwd');
    else ValueError starting with `where` (the manifest and the field)."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in ("/", "\\", "\0"))
    ):
        raise ValueError(
            f"{where} {name!r} must be a file name inside the split folder (no '/', '\\', "
            "'..' or absolute path)"
        )
    return name


# Largest image side a manifest may declare: images are decoded (and batches allocated) at its
# shape, so it bounds what one image costs (4096 x 4096 x 3 = 48 MiB).
MAX_SHAPE_SIDE = 4096


def check_shape(shape: Any, where: str) -> tuple[int, int, int]:
    """A manifest's `shape`: [H, W, C] with sides in 1..MAX_SHAPE_SIDE and C 1 or 3; else
    ValueError starting with `where`."""
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_count(v) for v in shape)
        or not (1 <= shape[0] <= MAX_SHAPE_SIDE and 1 <= shape[1] <= MAX_SHAPE_SIDE)
        or shape[2] not in (1, 3)
    ):
        text = repr(shape) if len(repr(shape)) < 80 else repr(shape)[:77] + "..."
        raise ValueError(
            f"{where} {text} must be [H, W, C] with H and W in 1..{MAX_SHAPE_SIDE} and C 1 or 3"
        )
    return shape[0], shape[1], shape[2]


def _shard_path(split_dir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    return Path(split_dir) / check_shard_name(entry["file"], f"{Path(split_dir) / MANIFEST}: file")


def check_split_name(split: str) -> str:
    """Split names become folder names: keep them to a safe character set."""
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
    return split


# Written into every folder `staged_directory` creates: the next run may replace a folder that
# holds it, and no other (see `made_by_project`).
MADE_MARKER = ".made-by-ddpm"
_MARKER_TEXT = (
    "This folder was written by ddpm (ddpm.data.shards.staged_directory); the next run that\n"
    "writes here replaces it whole. A folder without this file is never replaced.\n"
)


def _ddpm_split_folder(folder: Path) -> bool:
    """A split folder as older code wrote it: a ddpm manifest and only the shards it lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        shards = {entry["file"] for entry in manifest["shards"]}
        names = {entry.name for entry in folder.iterdir()}
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return False
    return names <= {MANIFEST, MADE_MARKER, *shards}


def made_by_project(folder: str | os.PathLike) -> bool:
    """Whether `folder` is one this project wrote, so replacing it erases nothing of anyone
    else's: it holds the `MADE_MARKER` file, or (written before the marker existed) it is a
    prepared split (a ddpm manifest and only its shards) or a prepared dataset (only such
    splits)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / MADE_MARKER).is_file() or _ddpm_split_folder(folder):
        return True
    entries = list(folder.iterdir())
    return bool(entries) and all(e.is_dir() and _ddpm_split_folder(e) for e in entries)


def check_replaceable(target: str | os.PathLike) -> None:
    """FileExistsError naming `target` unless it is absent, an empty folder or a folder this
    project made (`made_by_project`): a mistyped output path must never delete someone's files.
    """
    target = Path(target)
    if not target.is_symlink() and not target.exists():
        return
    if target.is_symlink():
        kind = "a symbolic link"
    elif not target.is_dir():
        kind = "a file"
    elif not any(target.iterdir()) or made_by_project(target):
        return
    else:
        kind = "a folder"
    raise FileExistsError(
        f"{target} exists and is {kind} not made by this project (no {MADE_MARKER} file, and "
        f"not prepared splits alone): refusing to replace it, which would delete what it holds; "
        "choose another output folder, or remove it yourself if nothing in it is needed"
    )


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `target`; on success it replaces `target`.

    `target` may be absent, an empty folder or one this project made (`check_replaceable`; the
    new folder gets the `MADE_MARKER` file); anything else is refused before any work starts
    and again before the swap. On an exception the staging folder is deleted and `target` is
    untouched. The swap is two renames (old aside, new in); a crash between them leaves the
    old copy under `.NAME.old-*` and no `target`, never a half-written `target`.
    """
    target = Path(os.path.abspath(target))
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        (staging / MADE_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes 0700 folders; others read the shards
        check_replaceable(target)
        if target.exists():
            old = target.parent / f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def shard_bytes(
    images: list[bytes],
    labels: list[int],
    sources: list[str],
    metadata: dict[str, str] | None = None,
) -> bytes:
    """One shard as Parquet bytes. Every writer option that could vary is fixed, so equal rows
    (and `metadata`, stored in the schema) give byte-identical files."""
    schema = SCHEMA if not metadata else SCHEMA.with_metadata(metadata)
    table = pa.table(
        {
            "image": pa.array(images, type=pa.binary()),
            "label": pa.array(labels, type=pa.int64()),
            "source": pa.array(sources, type=pa.string()),
        },
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(len(images), 1),
        compression="zstd",
        compression_level=3,
        use_dictionary=["label"],
        write_statistics=["label"],
        write_page_index=False,
        store_schema=True,
    )
    return sink.getvalue().to_pybytes()


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """One uint8 HWC image as a shard stores it."""
    return np.ascontiguousarray(image).tobytes() if encoding == "raw" else png_bytes(image)


def write_shard(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """Write one shard's bytes atomically; returns its manifest entry."""
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(data)
    return {
        "file": path.name,
        "rows": pq.read_metadata(pa.BufferReader(data)).num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def shard_entry(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest entry of a shard file already on disk."""
    path = Path(path)
    return {
        "file": path.name,
        "rows": pq.read_metadata(path).num_rows,
        "bytes": path.stat().st_size,
        "sha256": file_digest(path),
    }


def shard_metadata(path: str | os.PathLike) -> tuple[dict[str, str], int] | None:
    """(schema metadata, rows) of a shard file; None when it is missing or unreadable (e.g.
    truncated by a crash)."""
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError):
        return None
    raw = metadata.schema.to_arrow_schema().metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}, metadata.num_rows


def write_manifest(
    split_dir: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    shape: list[int],
    encoding: str,
    label_names: list[str],
    label_counts: list[int],
    shards: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `split_dir/manifest.json` (atomically) for shards already written; returns it."""
    manifest = {
        "format": FORMAT,
        "dataset": dataset,
        "split": split,
        "shape": list(shape),
        "count": sum(int(s["rows"]) for s in shards),
        "encoding": encoding,
        "label_names": list(label_names),
        "label_counts": list(label_counts),
        "shards": list(shards),
        **(extra or {}),
    }
    write_json(Path(split_dir) / MANIFEST, manifest)
    return manifest


def write_split_files(
    samples: Iterable[tuple[np.ndarray, int, str]],
    split_dir: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    label_names: list[str],
    reader_config: dict[str, Any],
    shard_rows: int = 4096,
    encoding: str = "raw",
    manifest_extra: Callable[[], dict[str, Any]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `samples` as shards plus manifest straight into `split_dir` (use `write_split`
    for the atomic version). Holds at most `shard_rows` images in memory. Returns the manifest.

    `manifest_extra` is called after the samples are exhausted, so a reader can add what it
    learnt while reading (e.g. the image folder's skipped-file report).
    """
    check_split_name(split)
    if not isinstance(shard_rows, int) or shard_rows <= 0:
        raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    shape: tuple[int, ...] | None = None
    n_classes = len(label_names)
    label_counts = [0] * n_classes
    shards: list[dict[str, Any]] = []
    buffers: tuple[list[bytes], list[int], list[str]] = ([], [], [])

    def flush() -> None:
        name = SHARD_NAME.format(len(shards))
        shards.append(write_shard(split_dir / name, shard_bytes(*buffers)))
        for buffer in buffers:
            buffer.clear()

    for image, label, source in tqdm(samples, desc=f"{dataset}/{split}", disable=not progress):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(
                f"{source}: images must be uint8 HxWxC arrays, got "
                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            )
        if shape is None:
            shape = image.shape
            if shape[2] not in (1, 3):
                raise ValueError(f"{source}: images must have 1 or 3 channels, got {shape}")
        elif image.shape != shape:
            raise ValueError(
                f"{source}: shape {image.shape} differs from the first image's {shape}"
            )
        label = int(label)
        if n_classes:
            if not 0 <= label < n_classes:
                raise ValueError(f"{source}: label {label} outside 0..{n_classes - 1}")
            label_counts[label] += 1
        elif label != -1:
            raise ValueError(f"{source}: label {label} given but the dataset has no label names")
        buffers[0].append(encode_image(image, encoding))
        buffers[1].append(label)
        buffers[2].append(str(source))
        if len(buffers[0]) == shard_rows:
            flush()
    if buffers[0]:
        flush()
    if shape is None:
        raise ValueError(f"{dataset}: split {split!r} produced no images")
    return write_manifest(
        split_dir,
        dataset=dataset,
        split=split,
        shape=list(shape),
        encoding=encoding,
        label_names=label_names,
        label_counts=label_counts,
        shards=shards,
        extra={"reader": reader_config, **(manifest_extra() if manifest_extra else {})},
    )


def write_split(samples, split_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """`write_split_files` into a staging folder that replaces `split_dir` only on success."""
    with staged_directory(split_dir) as staging:
        return write_split_files(samples, staging, **kwargs)


# --------------------------------------------------------------------------------------------
# Reading


def resolve_split_dir(root: str | os.PathLike, split: str | None = None) -> Path:
    """`root/split` when a split is named, else `root` itself (which must hold a manifest)."""
    path = Path(root) if split is None else Path(root) / check_split_name(split)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {path}: not a prepared split folder")
    return path


def load_manifest(split_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a split's manifest: keys present, shard files present with listed sizes."""
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST} in {split_dir}: not a prepared split folder"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = {"format", "shape", "count", "encoding", "label_names", "shards"} - set(manifest)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{path}: format {manifest['format']!r}, this code reads {FORMAT!r}")
    if manifest["encoding"] not in ENCODINGS:
        raise ValueError(f"{path}: encoding {manifest['encoding']!r} not in {ENCODINGS}")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: 'shards' must be a list of shard entries")
    for index, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise ValueError(f"{path}: shards[{index}] must be an object with keys {SHARD_KEYS}")
        missing = [key for key in SHARD_KEYS if key not in shard]
        if missing:
            raise ValueError(
                f"{path}: shards[{index}] is missing key(s) {missing}; each shard entry needs "
                f"{list(SHARD_KEYS)}"
            )
        check_shard_name(shard["file"], f"{path}: shards[{index}].file")
        for key in ("rows", "bytes"):
            if not _is_count(shard[key]):
                raise ValueError(
                    f"{path}: shards[{index}].{key} {shard[key]!r} must be an integer >= 0"
                )
        if not isinstance(shard["sha256"], str) or not _SHA256.match(shard["sha256"]):
            raise ValueError(
                f"{path}: shards[{index}].sha256 {shard['sha256']!r} must be 64 lowercase hex "
                "digits"
            )
    if not _is_count(manifest["count"]):
        raise ValueError(f"{path}: count {manifest['count']!r} must be an integer >= 0")
    check_shape(manifest["shape"], f"{path}: shape")
    if sum(s["rows"] for s in manifest["shards"]) != manifest["count"]:
        raise ValueError(f"{path}: shard rows do not add up to count={manifest['count']}")
    for shard in manifest["shards"]:
        file = split_dir / shard["file"]
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in {path} is missing")
        if file.stat().st_size != shard["bytes"]:
            raise ValueError(
                f"shard {file} has {file.stat().st_size} bytes, {path} lists {shard['bytes']}"
            )
    return manifest


def verify_checksums(split_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Hash every shard file and compare with the manifest's sha256; raise naming the first bad
    shard. Reads each file once in 1 MiB chunks, without parsing it (cheaper than `verify_split`).
    """
    for entry in manifest["shards"]:
        path = _shard_path(split_dir, entry)
        digest = file_digest(path, "sha256")
        if digest != entry["sha256"]:
            raise ValueError(
                f"shard {path} is corrupt: sha256 {digest} does not match {entry['sha256']} "
                f"in its {MANIFEST}; prepare the dataset again"
            )


def read_shard(
    split_dir: str | os.PathLike, manifest: dict[str, Any], index: int, verify: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shard `index` of a split: (uint8 images [n, H, W, C], int64 labels [n], source ids).

    With `verify`, the file's sha256 is checked against the manifest before it is parsed.
    """
    entry = manifest["shards"][index]
    path = _shard_path(split_dir, entry)
    data = path.read_bytes()
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(
                f"shard {path} is corrupt: sha256 {digest} does not match {entry['sha256']} "
                f"in its {MANIFEST}; prepare the dataset again"
            )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"shard {path}: not a readable Parquet file ({err})") from err
    if table.num_rows != entry["rows"]:
        raise ValueError(f"shard {path} has {table.num_rows} rows, manifest lists {entry['rows']}")
    shape = tuple(manifest["shape"])
    column = table.column("image").combine_chunks()
    n = len(column)
    if manifest["encoding"] == "raw":
        # All images have the same size, so the column's value buffer is the [n, H, W, C] array.
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[
            column.offset : column.offset + n + 1
        ]
        values = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        if values.size != n * int(np.prod(shape)):
            raise ValueError(f"shard {path}: image bytes do not match shape {list(shape)}")
        # Copy out of Arrow's read-only buffer: torch wants writable arrays, and the table can go.
        images = values.reshape((n, *shape)).copy()
    else:
        images = np.empty((n, *shape), dtype=np.uint8)
        h, w, c = shape
        mode = "L" if c == 1 else "RGB"
        for i, png in enumerate(column.to_pylist()):
            # The size and mode come from the PNG header; an image of another shape is refused
            # before it is decoded (a 9500 x 9500 PNG is 88 KB, and 90 MB decoded).
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(png))
                with image:
                    if image.size != (w, h) or image.mode != mode:
                        raise ValueError(
                            f"shard {path} row {i}: a {image.width}x{image.height} {image.mode} "
                            f"image; its {MANIFEST} shape {list(shape)} needs {w}x{h} {mode}"
                        )
                    images[i] = np.asarray(image, dtype=np.uint8).reshape(shape)
            except (OSError, SyntaxError, Image.DecompressionBombError) as err:
                raise ValueError(f"shard {path} row {i}: not a readable PNG ({err})") from err
    labels = np.array(table.column("label").to_numpy(), dtype=np.int64)
    return images, labels, table.column("source").to_pylist()


def verify_split(root: str | os.PathLike, split: str | None = None) -> dict[str, Any]:
    """Check every shard of a split against its manifest (sha256 and rows); return the manifest."""
    split_dir = resolve_split_dir(root, split)
    manifest = load_manifest(split_dir)
    for index in range(len(manifest["shards"])):
        read_shard(split_dir, manifest, index, verify=True)
    return manifest


def load_split(
    root: str | os.PathLike, split: str | None = None, max_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split in memory: (uint8 images [N, C, H, W], int64 labels [N]).

    Shards are read in manifest order and verified. Memory is N*H*W*C bytes: meant for the
    metrics and tests on digits or CIFAR-10, not for 256x256 datasets.
    """
    split_dir = resolve_split_dir(root, split)
    manifest = load_manifest(split_dir)
    total = manifest["count"] if max_rows is None else min(int(max_rows), manifest["count"])
    h, w, c = manifest["shape"]
    images = torch.empty((total, c, h, w), dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.int64)
    filled = 0
    for index in range(len(manifest["shards"])):
        if filled == total:
            break
        shard_images, shard_labels, _ = read_shard(split_dir, manifest, index)
        take = min(len(shard_images), total - filled)
        images[filled : filled + take] = torch.from_numpy(shard_images[:take]).permute(0, 3, 1, 2)
        labels[filled : filled + take] = torch.from_numpy(shard_labels[:take])
        filled += take
    return images, labels
