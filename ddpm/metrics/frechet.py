"""Fréchet distance between Gaussians, and a streaming float64 feature-statistics accumulator.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to network features:
    d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½).
The usual implementation takes a general matrix square root of the non-symmetric product Σ1 Σ2
(`scipy.linalg.sqrtm`, a Schur decomposition in complex arithmetic). Only the trace is needed, and
tr((Σ1 Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1 Σ2. That product is similar to
a symmetric positive semi-definite matrix, so a symmetric eigenvalue solver gives those eigenvalues
in real arithmetic, several times faster and without spurious imaginary parts.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ddpm.io_utils import atomic_write

__all__ = [
    "FD_BOOTSTRAP_REPLICATES",
    "FeatureStats",
    "frechet_distance",
    "frechet_distance_stderr",
    "trace_sqrt_product",
]

# Replicates of the bootstrap standard error: the estimate of a standard error from B replicates
# is itself uncertain by about 1/sqrt(2B) of it, 5% at 200.
FD_BOOTSTRAP_REPLICATES = 200


def _as_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{name}: mean must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: covariance must be [D, D] = {(mu.shape[0], mu.shape[0])} for a mean of "
            f"length {mu.shape[0]}, got shape {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or infinity")
    # eigh/cholesky read one triangle only, so an asymmetric input would be silently misread.
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name}: covariance is not symmetric")
    return mu, sigma


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, device: str | torch.device | None = None
) -> float:
    """tr((Σ1 Σ2)^½) for symmetric positive semi-definite Σ1, Σ2, via a symmetric eigensolver.

    With any factor Σ1 = F Fᵀ, the product Σ1 Σ2 = F (Fᵀ Σ2 F) F⁻¹ is similar to Fᵀ Σ2 F, which is
    symmetric PSD, so its eigenvalues (real, ≥ 0 up to rounding) are those of Σ1 Σ2. The Cholesky
    factor is the cheapest F; when Σ1 is singular (fewer samples than dimensions) Cholesky fails and
    the symmetric square root F = Σ1^½ from an eigendecomposition takes its place. Computed in
    float64 with torch (faster than numpy's LAPACK calls on our CPUs, and usable on a GPU).
    """
    s1 = torch.as_tensor(sigma1, dtype=torch.float64, device=device)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64, device=device)
    return float(_trace_sqrt_with_factor(_psd_factor(s1), s2))


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = Σ: Cholesky, or Σ^½ from an eigendecomposition when Σ is singular."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) != 0:
        w, v = torch.linalg.eigh(sigma)
        # Eigenvalues of a PSD matrix can come out as tiny negatives from rounding; they are zeros.
        factor = (v * w.clamp(min=0).sqrt()) @ v.T
    return factor


def _trace_sqrt_with_factor(factor: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """tr((F Fᵀ Σ)^½) from the factor F of the first matrix (see trace_sqrt_product)."""
    inner = factor.T @ sigma @ factor
    inner = 0.5 * (inner + inner.T)  # remove rounding asymmetry before the symmetric solver
    return torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, device: str | torch.device | None = None) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    Not clamped at zero: for identical statistics it returns rounding noise of either sign, as
    pytorch-fid does, so that the two agree to the last digits. `device` (default CPU) is where
    the float64 linear algebra runs.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, device=device)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_stderr(
    features,
    mu_ref,
    sigma_ref,
    *,
    replicates: int = FD_BOOTSTRAP_REPLICATES,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> float:
    """Bootstrap standard error of the Fréchet distance of `features` [N, D] (the samples) to the
    reference statistics N(mu_ref, sigma_ref).

    Only the samples are resampled: runs scored against the same reference set share its noise,
    so it does not separate them. Each replicate draws N rows with replacement (numpy's PCG64
    from `seed`: the same draws on every machine) and takes the distance of their statistics;
    the result is the replicates' standard deviation. The distance is biased upwards by about
    tr(Σ)/N, more so for a resample with repeated rows, so the replicates' mean is not an
    estimate of anything here; their spread is.
    """
    x = np.asarray(features, dtype=np.float64)
    mu_ref, sigma_ref = _as_stats(mu_ref, sigma_ref, "reference statistics")
    if x.ndim != 2 or x.shape[1] != mu_ref.shape[0] or x.shape[0] < 2:
        raise ValueError(
            f"features must be [N >= 2, {mu_ref.shape[0]}] to match the reference, got {x.shape}"
        )
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2, got {replicates}")
    draws = np.random.default_rng(seed)
    rows = torch.as_tensor(x, device=device)
    reference_mean = torch.as_tensor(mu_ref, device=device)
    reference_cov = torch.as_tensor(sigma_ref, device=device)
    # The reference is the same in every replicate: factor it once, and each replicate's
    # tr((Σ Σ_ref)^½) is one symmetric eigensolve (the roles of the two matrices are symmetric).
    reference_factor = _psd_factor(reference_cov)
    distances = []
    for _ in range(replicates):
        index = torch.as_tensor(draws.integers(0, len(x), len(x)), device=rows.device)
        resample = rows[index]
        mean = resample.mean(0)
        centred = resample - mean
        cov = centred.T @ centred / (len(x) - 1)
        distance = (
            (mean - reference_mean).square().sum()
            + cov.trace()
            + reference_cov.trace()
            - 2 * _trace_sqrt_with_factor(reference_factor, cov)
        )
        distances.append(float(distance))
    return float(np.std(distances, ddof=1))


def float64_rows(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Features as a float64 numpy array on the CPU (no copy when they already are one)."""
    if isinstance(features, torch.Tensor):
        return features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)


class FeatureStats:
    """Streaming mean and covariance of D-dimensional features in float64.

    Memory is O(D²) whatever the number of samples. Instead of raw sums of x and x xᵀ (which lose
    digits to cancellation when the mean is large against the spread) it keeps the running mean and
    the centred scatter matrix Σ (x − mean)(x − mean)ᵀ, combining batches and shards with the exact
    pairwise update of Chan, Golub and LeVeque (1979). `merge` uses the same update, so sharded or
    distributed accumulation gives the single-pass result up to rounding.
    """

    def __init__(self, dim: int):
        if int(dim) < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._scatter = np.zeros((self.dim, self.dim), dtype=np.float64)

    def _combine(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self._mean
        self._scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self._mean += delta * (count / total)
        self.count = total

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features [N, D] (any float dtype, any device); returns self."""
        x = float64_rows(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape [N, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        if x.shape[0] == 0:
            return self
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        self._combine(x.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator (e.g. another shard's) into this one; returns self."""
        if not isinstance(other, FeatureStats) or other.dim != self.dim:
            raise ValueError(f"can only merge FeatureStats of dimension {self.dim}, got {other!r}")
        self._combine(other.count, other._mean, other._scatter)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features accumulated yet")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by N − 1, as numpy.cov and pytorch-fid do)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        return self._scatter / (self.count - 1)

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"

    def save(self, path: str | os.PathLike) -> None:
        """Write count, mean, scatter and (for convenience to other tools) mu/sigma, atomically."""
        arrays = {"count": np.int64(self.count), "mean": self._mean, "scatter": self._scatter}
        if self.count >= 2:
            arrays.update(mu=self._mean, sigma=self.cov)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: unreadable statistics file ({err})") from err
        missing = {"count", "mean", "scatter"} - set(arrays)
        if missing:
            raise ValueError(
                f"{path}: not a FeatureStats file, missing keys {sorted(missing)} "
                f"(has {sorted(arrays)})"
            )
        count, mean, scatter = int(arrays["count"]), arrays["mean"], arrays["scatter"]
        if mean.ndim != 1 or scatter.shape != (mean.shape[0], mean.shape[0]) or count < 0:
            raise ValueError(
                f"{path}: inconsistent statistics: mean {mean.shape}, scatter {scatter.shape}, "
                f"count {count}"
            )
        stats = cls(mean.shape[0])
        stats.count = count
        stats._mean = mean.astype(np.float64)
        stats._scatter = scatter.astype(np.float64)
        return stats
