"""Batched, device-aware feature extraction into streaming float64 statistics, and cached
reference statistics of a training set.

An extractor is any module with `features_and_logits(images) -> (features [N, D], logits [N, K])`
and the attributes `feature_dim`, `num_classes` and `extractor_id` (FIDInceptionV3 and
SmallClassifier). Images are float NCHW in [-1, 1] (library convention) or uint8 NHWC / NHW as
stored on disk; `prepare_images` converts the latter.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ddpm.images import to_model_range, to_uint8
from ddpm.io_utils import file_digest, write_json
from ddpm.metrics.frechet import (
    FD_BOOTSTRAP_REPLICATES,
    FeatureStats,
    float64_rows,
    frechet_distance,
    frechet_distance_stderr,
)
from ddpm.metrics.inception_score import ScoreAccumulator

__all__ = [
    "accumulate_features",
    "classifier_metrics",
    "file_sha256",
    "inception_metrics",
    "iterate_batches",
    "mode_coverage",
    "prepare_images",
    "reference_stats",
]

# Samples are clipped to [-1, 1]; anything well outside means images in [0, 255] or [0, 1] scale
# were passed by mistake, which would silently give meaningless features.
_RANGE_TOLERANCE = 1e-3


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def prepare_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] (C = 1 or 3) → float NCHW in [-1, 1]; float NCHW checked
    and quantised.

    Float input (samples) must already be NCHW in [-1, 1]. It is rounded to the 256 levels of
    8-bit images, round((x + 1) * 127.5), and mapped back: the paper's protocol and pytorch-fid
    score samples saved as PNGs, and sub-level detail the training data never had would
    otherwise shift the features. The result stays on the input's device.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"uint8 images must be [N, H, W] or [N, H, W, C] with C in (1, 3) (on-disk HWC "
                f"layout), got shape {tuple(x.shape)}"
            )
        return to_model_range(x.permute(0, 3, 1, 2))
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"float images must be NCHW in [-1, 1], got shape {tuple(x.shape)}")
    if x.numel():
        low, high = float(x.min()), float(x.max())
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"float images must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]; "
                "pass uint8 for [0, 255] data or map [0, 1] data with 2x - 1"
            )
    return to_model_range(to_uint8(x))


def iterate_batches(images, batch_size: int) -> Iterator[torch.Tensor | np.ndarray]:
    """Consecutive slices of an in-memory array or tensor (views: no copy of the whole set)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def _images_of(batch):
    # DataLoaders over labelled datasets yield (images, labels); only the images matter here.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def accumulate_features(
    extractor: torch.nn.Module,
    batches: Iterable,
    *,
    device: str | torch.device | None = None,
    splits: int = 10,
    progress: bool = False,
    desc: str = "features",
    collect: list[np.ndarray] | None = None,
) -> tuple[FeatureStats, ScoreAccumulator]:
    """One streaming pass: feature mean/covariance (float64) and the score/histogram accumulator.

    `device` moves the extractor there first (default: where its parameters already are).
    Batches may be tensors/arrays of images or (images, labels, ...) tuples. `collect`, when
    given, also gets each batch's features (float64, CPU), for what needs every sample (a
    bootstrap) rather than the statistics.
    """
    if device is not None:
        extractor.to(device)
    device = _device_of(extractor)
    was_training = extractor.training
    extractor.eval()
    stats = FeatureStats(extractor.feature_dim)
    scores = ScoreAccumulator(extractor.num_classes, splits=splits)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    try:
        for batch in batches:
            images = _images_of(batch)
            if not isinstance(images, torch.Tensor):
                # A copy: arrays from a memory map or Ray's object store are read-only, which
                # torch.from_numpy warns about; one batch of uint8 is cheap to copy.
                images = torch.tensor(np.asarray(images))
            # Move before converting: uint8 crosses to an accelerator in a quarter of the bytes.
            images = prepare_images(images.to(device, non_blocking=True))
            features, logits = extractor.features_and_logits(images)
            rows = float64_rows(features)
            stats.update(rows)
            scores.update(logits)
            if collect is not None:
                collect.append(rows)
    finally:
        extractor.train(was_training)
    return stats, scores


def reference_stats(
    extractor: torch.nn.Module,
    batches: Iterable,
    cache_dir: str | os.PathLike,
    dataset_key: str,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> FeatureStats:
    """Feature statistics of a reference set (the training split), computed once and cached.

    The cache entry is keyed by `dataset_key` (e.g. the sha256 of the split's manifest.json) and
    the extractor's identity (name and weights sha256), so a changed dataset or network never
    reuses stale statistics. `batches` is only consumed on a cache miss. The entry is a .npz of
    the statistics plus a .json sidecar holding the key, written after the .npz, so an entry
    without its sidecar (an interrupted write) counts as missing. An unreadable sidecar or .npz
    also counts as missing (with a warning naming the file): the cache can always be rebuilt.
    """
    key = {"dataset": str(dataset_key), "extractor": extractor.extractor_id}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = Path(cache_dir) / f"refstats-{extractor.name}-{digest}"
    stats_path, key_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if stats_path.is_file() and key_path.is_file():
        cached = _read_cache_entry(stats_path, key_path, key)
        if cached is not None:
            return cached
    stats, _ = accumulate_features(
        extractor, batches, device=device, progress=progress, desc="reference features"
    )
    if stats.count < 2:
        raise ValueError(f"reference set for {key} gave {stats.count} images; need at least 2")
    stats.save(stats_path)
    write_json(key_path, {"key": key, "count": stats.count, "dim": stats.dim})
    return stats


def _read_cache_entry(stats_path: Path, key_path: Path, key: dict) -> FeatureStats | None:
    """The cached statistics if the sidecar matches `key`; None (a miss) otherwise."""
    try:
        sidecar = json.loads(key_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(
            f"{key_path}: unreadable reference-statistics sidecar ({err}); recomputing",
            stacklevel=3,
        )
        return None
    if not isinstance(sidecar, dict) or sidecar.get("key") != key:
        return None
    try:
        return FeatureStats.load(stats_path)
    except ValueError as err:  # load names the file in its message
        warnings.warn(f"{err}; recomputing the reference statistics", stacklevel=3)
        return None


def mode_coverage(histogram) -> dict:
    """Mode coverage from a class histogram of samples.

    classes_present: fraction of classes predicted at least once; class_entropy: entropy of the
    predicted-class distribution divided by log(num_classes) (1 = perfectly balanced, 0 = one
    class); class_histogram: the counts.
    """
    counts = np.asarray(histogram, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2 or (counts < 0).any() or counts.sum() == 0:
        raise ValueError(f"histogram must be >= 2 non-negative counts, not all zero; got {counts}")
    p = counts / counts.sum()
    nonzero = p[p > 0]
    return {
        "classes_present": float((counts > 0).mean()),
        "class_entropy": float((nonzero * np.log(1.0 / nonzero)).sum() / np.log(counts.size)),
        "class_histogram": counts.tolist(),
    }


def _score_samples(
    extractor, batches, reference, device, splits, progress, bootstrap: int = 0
) -> dict:
    collected: list[np.ndarray] | None = [] if bootstrap else None
    stats, scores = accumulate_features(
        extractor,
        batches,
        device=device,
        splits=splits,
        progress=progress,
        desc="sample features",
        collect=collected,
    )
    if reference.dim != stats.dim:
        raise ValueError(f"reference statistics have dim {reference.dim}, features {stats.dim}")
    score, score_std = scores.score()
    stderr = None
    if collected:
        stderr = frechet_distance_stderr(
            np.concatenate(collected), reference.mean, reference.cov, replicates=bootstrap
        )
    return {
        "frechet_distance": frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov),
        "frechet_distance_stderr": stderr,
        "score": score,
        "score_std": score_std,
        "num_samples": stats.count,
        "histogram": scores.histogram,
    }


def inception_metrics(
    network: torch.nn.Module,
    batches: Iterable,
    reference: FeatureStats,
    *,
    device: str | torch.device | None = None,
    splits: int = 10,
    progress: bool = False,
) -> dict:
    """FID against `reference` and Inception Score (mean, std over `splits`) of sample batches.

    Refuses a network without its real weights: numbers from a random Inception are not FID.
    """
    _ = network.extractor_id
    out = _score_samples(network, batches, reference, device, splits, progress)
    return {
        "fid": out["frechet_distance"],
        "inception_score": out["score"],
        "inception_score_std": out["score_std"],
        "num_samples": out["num_samples"],
    }


def classifier_metrics(
    classifier: torch.nn.Module,
    batches: Iterable,
    reference: FeatureStats,
    *,
    device: str | torch.device | None = None,
    splits: int = 10,
    progress: bool = False,
    bootstrap: int = FD_BOOTSTRAP_REPLICATES,
) -> dict:
    """Offline quality metrics from the domain classifier; deliberately not called FID.

    classifier_fd: Fréchet distance of its penultimate features to `reference`, and
    classifier_fd_stderr its bootstrap standard error over the samples (`bootstrap` replicates,
    `frechet_distance_stderr`; 0: none, the entry is None);
    classifier_score: exp(E KL(p(y|x) ‖ p(y))) with its softmax, between 1 and num_classes;
    plus mode coverage of the predicted classes (see `mode_coverage`).
    """
    out = _score_samples(classifier, batches, reference, device, splits, progress, bootstrap)
    return {
        "classifier_fd": out["frechet_distance"],
        "classifier_fd_stderr": out["frechet_distance_stderr"],
        "classifier_score": out["score"],
        "classifier_score_std": out["score_std"],
        "num_samples": out["num_samples"],
        **mode_coverage(out["histogram"]),
    }
