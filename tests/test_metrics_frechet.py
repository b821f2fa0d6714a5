"""Fréchet distance, streaming feature statistics and Inception Score."""

import time

import numpy as np
import pytest

from ddpm.metrics import (
    FeatureStats,
    frechet_distance,
    frechet_distance_stderr,
    inception_score,
    mode_coverage,
)
from ddpm.metrics.inception_score import ScoreAccumulator


def random_stats(rng, dim, samples=None):
    """Mean and covariance of `samples` random correlated features (full rank if samples > dim)."""
    samples = samples or 2 * dim
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    x = rng.standard_normal((samples, dim)) @ mix + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def test_zero_for_equal_statistics_full_rank_and_singular():
    rng = np.random.default_rng(0)
    mu, sigma = random_stats(rng, 64, samples=200)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)
    # 40 samples of 64-d features: rank 39. Rounding leaves the 25 zero eigenvalues of the
    # product at ~1e-16 relative, and their square roots at ~1e-8, so the result is zero only
    # to ~1e-8 of the trace (pytorch-fid's sqrtm route gives the same order).
    mu, sigma = random_stats(rng, 64, samples=40)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_symmetric_and_positive():
    rng = np.random.default_rng(1)
    a, b = random_stats(rng, 48), random_stats(rng, 48)
    d_ab, d_ba = frechet_distance(*a, *b), frechet_distance(*b, *a)
    assert d_ab > 0
    assert d_ab == pytest.approx(d_ba, rel=1e-10)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(2)
    mu1, sigma = random_stats(rng, 32)
    mu2 = mu1 + rng.standard_normal(32)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(
        float(np.sum((mu1 - mu2) ** 2)), rel=1e-9
    )


def test_diagonal_covariances_match_closed_form():
    # For commuting covariances the trace term is Σ √(a_i b_i): d² = ‖Δμ‖² + Σ (√a_i − √b_i)².
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 3, 40), rng.uniform(0.1, 3, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_singular_covariance_matches_general_eigenvalues():
    # Σ1 of rank 30 in 50-d makes Cholesky fail; compare with the eigenvalues of the product
    # Σ1 Σ2 from a general (non-symmetric) solver.
    rng = np.random.default_rng(4)
    mu1, s1 = random_stats(rng, 50, samples=31)
    mu2, s2 = random_stats(rng, 50)
    eig = np.linalg.eigvals(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    expected -= 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


# pytorch-fid passes scipy's deprecated `disp` argument to sqrtm: their warning, not ours.
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_matches_pytorch_fid_at_2048_dims():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(5)
    dim = 2048
    # Full-rank random covariances, one matrix product each (drawing samples would cost more).
    mix1, mix2 = rng.standard_normal((2, dim, dim)) / np.sqrt(dim)
    s1, s2 = mix1 @ mix1.T + 0.01 * np.eye(dim), mix2 @ mix2.T + 0.01 * np.eye(dim)
    mu1, mu2 = rng.standard_normal((2, dim))
    start = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    ours_s = time.perf_counter() - start
    theirs = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    print(f"ours {ours:.6f} in {ours_s:.2f}s, pytorch-fid {theirs:.6f}")
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_rejects_bad_statistics():
    rng = np.random.default_rng(6)
    mu, sigma = random_stats(rng, 8)
    with pytest.raises(ValueError, match="covariance must be"):
        frechet_distance(mu, sigma[:4, :4], mu, sigma)
    asym = sigma.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, asym, mu, sigma)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, *random_stats(rng, 6))


def test_streaming_stats_equal_numpy_on_offset_data():
    # A large common offset is where raw sums of x and x xᵀ lose digits; centred updates do not.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 1e4
    stats = FeatureStats(16)
    for start, stop in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        stats.update(x[start:stop])
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_merge_equals_single_pass_and_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((900, 12)) * 3 + 5
    single = FeatureStats(12).update(x)
    shards = [FeatureStats(12).update(part) for part in np.array_split(x, [100, 101, 640])]
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    assert merged.count == single.count == 900
    np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, single.cov, rtol=1e-10)
    merged.merge(FeatureStats(12))  # an empty shard changes nothing
    assert merged.count == 900

    path = tmp_path / "stats.npz"
    merged.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temp file left
    loaded = FeatureStats.load(path)
    assert loaded.count == 900
    np.testing.assert_array_equal(loaded.mean, merged.mean)
    np.testing.assert_array_equal(loaded.cov, merged.cov)
    with np.load(path) as data:  # mu/sigma keys make the file usable by pytorch-fid too
        np.testing.assert_array_equal(data["sigma"], merged.cov)


def test_stats_bad_input_errors(tmp_path):
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        stats.update(np.zeros((3, 5)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = stats.cov
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="garbage.npz"):
        FeatureStats.load(garbage)


def test_inception_score_confident_uniform_predictions_equal_class_count():
    classes = 10
    labels = np.arange(1000) % classes
    logits = 60.0 * np.eye(classes)[labels]
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6)
    assert std < 1e-6
    mean, _ = inception_score(np.eye(classes)[labels], from_logits=False)  # exact zeros allowed
    assert mean == pytest.approx(classes, rel=1e-12)


def test_inception_score_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(9).standard_normal(7), (100, 1))
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_direct_formula_and_streaming():
    rng = np.random.default_rng(10)
    logits = 3 * rng.standard_normal((500, 6))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    direct = []
    for chunk in np.array_split(p, 5):
        kl = (chunk * (np.log(chunk) - np.log(chunk.mean(0)))).sum(1)
        direct.append(np.exp(kl.mean()))
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(np.mean(direct), rel=1e-10)
    assert std == pytest.approx(np.std(direct), rel=1e-8)
    assert 1.0 < mean < 6.0

    acc = ScoreAccumulator(6, splits=5)
    for part in np.array_split(logits, [7, 200, 333]):
        acc.update(part)
    regrouped = np.concatenate([logits[k::5] for k in range(5)])  # round-robin split order
    assert acc.score() == pytest.approx(inception_score(regrouped, splits=5), rel=1e-10)
    np.testing.assert_array_equal(acc.histogram, np.bincount(logits.argmax(1), minlength=6))


def test_mode_coverage_on_constructed_histograms():
    half = mode_coverage([5, 5, 0, 0])
    assert half["classes_present"] == 0.5
    assert half["class_entropy"] == pytest.approx(np.log(2) / np.log(4))
    assert half["class_histogram"] == [5, 5, 0, 0]
    assert mode_coverage([3, 3, 3, 3])["class_entropy"] == pytest.approx(1.0)
    assert mode_coverage([9, 0, 0])["class_entropy"] == 0.0
    with pytest.raises(ValueError, match="histogram"):
        mode_coverage([0, 0])


def test_bootstrap_stderr_matches_the_spread_over_fresh_sample_sets():
    # Samples N(m, I) in 4 dimensions against the reference N(0, I): the distance is about
    # |m|² + small covariance terms, so its spread over fresh sets of N samples is about
    # 2|m| / √N (the mean's part). The bootstrap of one set must find that spread.
    dim, n, shift = 4, 400, 1.5
    rng = np.random.default_rng(7)
    reference_mean, reference_cov = np.zeros(dim), np.eye(dim)
    offset = np.full(dim, shift / 2)  # |m| = 1.5

    def fresh_set():
        return rng.normal(size=(n, dim)) + offset

    spread = np.std(
        [
            frechet_distance(x.mean(0), np.cov(x, rowvar=False), reference_mean, reference_cov)
            for x in (fresh_set() for _ in range(300))
        ],
        ddof=1,
    )
    assert spread == pytest.approx(2 * shift / np.sqrt(n), rel=0.15)
    features = fresh_set()
    stderr = frechet_distance_stderr(features, reference_mean, reference_cov)
    assert stderr == pytest.approx(spread, rel=0.2)
    # Seeded: the same draws, the same value; another seed, another (close) value.
    assert frechet_distance_stderr(features, reference_mean, reference_cov) == stderr
    other = frechet_distance_stderr(features, reference_mean, reference_cov, seed=1)
    assert other != stderr and other == pytest.approx(stderr, rel=0.25)


def test_bootstrap_stderr_rejects_features_that_do_not_match():
    with pytest.raises(ValueError, match=r"features must be \[N >= 2, 3\]"):
        frechet_distance_stderr(np.zeros((10, 4)), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="replicates must be >= 2"):
        frechet_distance_stderr(np.zeros((10, 3)), np.zeros(3), np.eye(3), replicates=1)
