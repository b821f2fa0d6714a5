"""Sample-quality metrics: Fréchet distance, FID Inception features, Inception Score, and a small
domain classifier for offline metrics (classifier_fd, classifier_score, mode coverage)."""

from ddpm.metrics.classifier import (
    SmallClassifier,
    evaluate_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ddpm.metrics.features import (
    accumulate_features,
    classifier_metrics,
    file_sha256,
    inception_metrics,
    iterate_batches,
    mode_coverage,
    prepare_images,
    reference_stats,
)
from ddpm.metrics.frechet import (
    FD_BOOTSTRAP_REPLICATES,
    FeatureStats,
    frechet_distance,
    frechet_distance_stderr,
    trace_sqrt_product,
)
from ddpm.metrics.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    default_fid_weights_path,
    load_fid_inception,
    resolve_fid_weights,
)
from ddpm.metrics.inception_score import ScoreAccumulator, inception_score

__all__ = [
    "FD_BOOTSTRAP_REPLICATES",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "FeatureStats",
    "ScoreAccumulator",
    "SmallClassifier",
    "accumulate_features",
    "classifier_metrics",
    "default_fid_weights_path",
    "evaluate_accuracy",
    "file_sha256",
    "frechet_distance",
    "frechet_distance_stderr",
    "inception_metrics",
    "inception_score",
    "iterate_batches",
    "load_classifier",
    "load_fid_inception",
    "mode_coverage",
    "prepare_images",
    "reference_stats",
    "resolve_fid_weights",
    "save_classifier",
    "train_classifier",
    "trace_sqrt_product",
]
