"""Images a command reads: a folder of image files or a prepared split, in uint8 NHWC batches.

Image folders are read by `ddpm.data.ImageFolder`, the reader `prepare_dataset` uses, so a
folder is cropped, resized and converted the same way here as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm.cli.common import SAMPLE_GRID, CommandError, check_folder

# Manifest file of a prepared split (ddpm.data.shards.MANIFEST), repeated here so that parsing
# the command line needs no library import.
MANIFEST = "manifest.json"
# PIL modes that hold one channel: an image folder of these trains a grey model by default.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def split_dir(path: Path, split: str) -> Path | None:
    """The prepared split folder `path` names (itself, or its `split` sub-folder); None when it
    is a folder of image files instead."""
    if (path / MANIFEST).is_file():
        return path
    if (path / split / MANIFEST).is_file():
        return path / split
    return None


def first_image(folder: Path) -> Path | None:
    from ddpm.data.readers import IMAGE_EXTENSIONS

    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p != folder / SAMPLE_GRID
    )
    return files[0] if files else None


def is_grey(folder: Path) -> bool:
    """Whether the first image file in `folder` has one channel."""
    from ddpm.data.readers import open_image

    first = first_image(folder)
    if first is None:
        return False
    try:
        with open_image(first) as image:
            return image.mode in _GREY_MODES
    except (OSError, ValueError):
        return False  # prepare_dataset reports the file


def image_batches(
    path: Path,
    *,
    flag: str,
    split: str,
    batch_size: int,
    limit: int | None,
    shape: tuple[int, int, int] | None,
    image_size: int | None = None,
) -> tuple[int, Iterator[Any], str]:
    """(image count, iterator of uint8 NHWC batches, description) of a folder of image files or
    of a prepared split. `shape` (C, H, W): what the images must be; image files are
    center-cropped and resized to it by `ImageFolder`, shards must already have it. Without
    `shape`, files are read at `image_size` (default: the shorter side of the first file)."""
    check_folder(path, flag)
    found = split_dir(path, split)
    if found is not None:
        return _shard_batches(found, flag=flag, batch_size=batch_size, limit=limit, shape=shape)
    if shape is not None:
        channels, size = shape[0], shape[1]
    else:
        channels = 3  # the Inception network reads RGB (grey is repeated to three channels)
        size = _file_side(path, flag, image_size)
    return _file_batches(path, channels, size, batch_size=batch_size, limit=limit)


def _file_side(path: Path, flag: str, image_size: int | None) -> int:
    """The side to read the image files in `path` at: `image_size`, else the shorter side of
    the first file."""
    from ddpm.data.readers import open_image

    first = first_image(path)
    if first is None:
        raise CommandError(f"{flag}: {path} holds no .png/.jpg/.jpeg/.webp files")
    if image_size is not None:
        return image_size
    try:
        with open_image(first) as image:
            return min(image.size)
    except (OSError, ValueError) as err:
        raise CommandError(f"{flag}: {first} is not a readable image ({err})") from None


def _shard_batches(
    folder: Path, *, flag: str, batch_size: int, limit: int | None, shape: tuple | None
) -> tuple[int, Iterator[Any], str]:
    from ddpm.data import load_manifest, read_shard
    from ddpm.errors import reading

    with reading(folder, "prepared split"):
        manifest = load_manifest(folder)
    h, w, c = manifest["shape"]
    if shape is not None and (c, h, w) != tuple(shape):
        raise CommandError(
            f"{flag}: {folder} holds {h}x{w} images with {c} channel(s); the model takes "
            f"{shape[1]}x{shape[2]} with {shape[0]}: pass a folder of image files (they are "
            "resized on reading) or prepare the data at that size"
        )
    total = manifest["count"] if limit is None else min(limit, manifest["count"])

    def batches() -> Iterator[Any]:
        left = total
        for index in range(len(manifest["shards"])):
            if left <= 0:
                return
            with reading(folder, "prepared split"):
                images, _, _ = read_shard(folder, manifest, index)
            images = images[:left]
            left -= len(images)
            for start in range(0, len(images), batch_size):
                yield images[start : start + batch_size]

    return total, batches(), f"{total} images of the prepared split {folder}"


def _file_batches(
    folder: Path, channels: int, size: int, *, batch_size: int, limit: int | None
) -> tuple[int, Iterator[Any], str]:
    import numpy as np

    from ddpm.data import ImageFolder
    from ddpm.errors import reading

    # Every file must decode: a scoring command should not quietly skip data. The limit is
    # applied here rather than by max_images, so that the skipped grid does not count.
    with reading(folder, "image folder"):
        reader = ImageFolder(
            folder,
            image_size=size,
            mode="L" if channels == 1 else "RGB",
            test_fraction=0.0,
            max_corrupt_fraction=0.0,
        )
    has_grid = (folder / SAMPLE_GRID) in reader.files
    available = len(reader.files) - has_grid
    total = available if limit is None else min(limit, available)

    def batches() -> Iterator[Any]:
        batch: list[np.ndarray] = []
        taken = 0
        with reading(folder, "image folder"):
            for image, _, source in reader.iter_split("train"):
                if taken == total:
                    break
                if source == SAMPLE_GRID:
                    continue
                batch.append(image)
                taken += 1
                if len(batch) == batch_size:
                    yield np.stack(batch)
                    batch = []
        if batch:
            yield np.stack(batch)

    skipped = f" (not its {SAMPLE_GRID})" if has_grid else ""
    return total, batches(), f"{total} image files in {folder}{skipped} at {size}x{size}"
