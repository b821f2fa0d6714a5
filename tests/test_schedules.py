import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import (
    SCHEDULES,
    betas_for_subsequence,
    derived_constants,
    evenly_spaced_timesteps,
    index_of_paper_t,
    make_betas,
    paper_t,
)


def test_linear_schedule_matches_paper_end_points_and_alpha_bar_T():
    betas = make_betas("linear", 1000)
    assert betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # ᾱ_T = ∏ (1 - β_t) for the paper's schedule, computed independently in log space.
    log_alpha_bar = np.sum(np.log1p(-np.linspace(1e-4, 0.02, 1000)))
    assert math.exp(log_alpha_bar) == pytest.approx(4.036e-5, rel=1e-3)
    assert derived_constants(betas)["alphas_cumprod"][-1] == pytest.approx(4.036e-5, rel=1e-3)


def test_prior_term_is_below_a_ten_thousandth_bit_per_dim():
    diffusion = GaussianDiffusion.from_config("linear", 1000)
    # The worst case for L_T is data at the ends of [-1, 1].
    x0 = torch.tensor([-1.0, -0.3, 0.0, 0.7, 1.0], dtype=torch.float64).view(5, 1, 1, 1)
    prior = diffusion.prior_bpd(x0)
    assert torch.all(prior <= 1e-4)
    # Closed form at x0 = ±1: KL(N(√ᾱ, 1-ᾱ) ‖ N(0, 1)) / ln 2.
    a = float(diffusion.alphas_cumprod[-1])
    expected = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a) / math.log(2)
    assert float(prior[0]) == pytest.approx(expected, rel=1e-9)
    assert 1e-6 < expected < 1e-4


def test_timestep_mapping_is_written_once_and_consistent():
    assert paper_t(0) == 1 and index_of_paper_t(1) == 0
    assert paper_t(999) == 1000 and index_of_paper_t(paper_t(123)) == 123
    c = derived_constants(make_betas("linear", 10))
    # Index 0 is the paper's t = 1: ᾱ_1 = 1 - β_1, ᾱ_0 = 1 and β̃_1 = 0.
    assert c["alphas_cumprod"][0] == pytest.approx(1 - c["betas"][0])
    assert c["alphas_cumprod_prev"][0] == 1.0
    assert c["posterior_variance"][0] == 0.0
    # The posterior mean at t = 1 returns x_0 exactly (coef1 = 1, coef2 = 0).
    assert c["posterior_mean_coef1"][0] == pytest.approx(1.0)
    assert c["posterior_mean_coef2"][0] == pytest.approx(0.0)
    # The clipped log-variance and the fixed-large variance use β̃ of the paper's t = 2 at t = 1.
    assert c["posterior_log_variance_clipped"][0] == pytest.approx(
        math.log(c["posterior_variance"][1])
    )
    assert c["large_variance"][0] == pytest.approx(c["posterior_variance"][1])
    np.testing.assert_allclose(c["large_variance"][1:], c["betas"][1:])


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_every_schedule_is_valid_for_any_T(name, T):
    betas = make_betas(name, T)
    assert betas.shape == (T,)
    assert np.all((betas > 0) & (betas < 1))
    c = derived_constants(betas)
    assert np.all(np.diff(c["alphas_cumprod"]) < 0) or T == 1
    assert np.all(np.isfinite(c["posterior_log_variance_clipped"]))


def test_schedule_shapes():
    T = 1000
    quad = make_betas("quadratic", T)
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(1e-2, math.sqrt(0.02), T))
    np.testing.assert_allclose(make_betas("constant", T), 0.02)
    cosine = make_betas("cosine", T)
    assert cosine.max() == pytest.approx(0.999)  # the cap binds at t = T
    # Nichol & Dhariwal's ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2)/ᾱ(0), checked at t = T/2.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.prod(1 - cosine[:500]) == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    sigmoid = make_betas("sigmoid", T)
    assert sigmoid[0] == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)))
    assert sigmoid[T // 2] == pytest.approx(
        1e-4 + (0.02 - 1e-4) / (1 + math.exp(-6 / 999)), rel=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(name="exponential", num_timesteps=10), "allowed: linear, quadratic"),
        (dict(name="linear", num_timesteps=0), "num_timesteps"),
        (dict(name="linear", num_timesteps=2.5), "num_timesteps"),
        (dict(name="linear", num_timesteps=10, beta_start=0.0), "beta_start"),
        (dict(name="linear", num_timesteps=10, beta_end=1.0), "beta_end"),
        (dict(name="constant", num_timesteps=10, beta_end=-0.1), "beta_end"),
    ],
)
def test_bad_schedule_arguments_name_the_parameter(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_betas(**kwargs)


def test_respaced_betas_keep_alpha_bar_at_kept_steps():
    betas = make_betas("linear", 1000)
    alpha_bar = np.cumprod(1 - betas)
    kept = evenly_spaced_timesteps(1000, 50)
    assert kept[0] == 0 and kept[-1] == 999 and kept.size == 50
    new = betas_for_subsequence(alpha_bar, kept)
    np.testing.assert_allclose(np.cumprod(1 - new), alpha_bar[kept], rtol=1e-12)
    with pytest.raises(ValueError, match="num_steps"):
        evenly_spaced_timesteps(1000, 1001)
