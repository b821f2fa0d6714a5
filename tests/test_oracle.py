"""The Gaussian oracle of DESIGN.md: exact ε* for x_0 ~ N(m, s²), then sample and bound.

With ε* every sampler is an affine Gaussian recursion x ← a·x + b + σ·z, so the mean and variance
it must produce can be computed exactly in float64, from the schedule alone, without the library's
sampling code. The tests check two things separately:

1. the sampler matches that exact prediction within Monte-Carlo error (this catches bugs); and
2. the prediction is close to (m, s) — how close is a property of the sampler (fixed variances and
   few steps shrink or widen the spread), so each tolerance is derived from the recursion and
   stated, not tuned to pass.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm.diffusion import GaussianDiffusion
from ddpm.likelihood import bits_per_dim, dataset_bits_per_dim, mc_bits_per_dim
from ddpm.sampling import sample
from ddpm.schedules import betas_for_subsequence, evenly_spaced_timesteps


class GaussianOracle(torch.nn.Module):
    """ε*(x_t, t) = √(1-ᾱ_t) (x_t - √ᾱ_t m) / (ᾱ_t s² + 1 - ᾱ_t): the optimal noise predictor."""

    def __init__(self, alphas_cumprod: torch.Tensor, m: float, s: float):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.m, self.s = m, s

    def forward(self, x, t):
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.m) / (a * self.s**2 + 1 - a)


def exact_final_moments(alpha_bar_chain, m, s, variance=None, ddim_eta=None):
    """Mean and variance of x_0 after the reverse chain with ε*, by the affine recursion.

    `alpha_bar_chain` is ᾱ on the steps visited (ascending). `variance` is "small", "large" or
    None for DDIM. Independent of the library: written from the paper's Eqs. 7 and 11.
    """
    ab = np.asarray(alpha_bar_chain, dtype=np.float64)
    ab_prev = np.append(1.0, ab[:-1])
    beta = 1 - ab / ab_prev
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for i in range(ab.size - 1, -1, -1):
        c = math.sqrt(1 - ab[i]) / (ab[i] * s**2 + 1 - ab[i])
        # ε* = c·x - c·√ᾱ·m, and x̂_0 = (x - √(1-ᾱ) ε*)/√ᾱ = p·x + q
        p = (1 - math.sqrt(1 - ab[i]) * c) / math.sqrt(ab[i])
        q = math.sqrt(1 - ab[i]) * c * m
        if ddim_eta is None:
            coef1 = beta[i] * math.sqrt(ab_prev[i]) / (1 - ab[i])
            coef2 = (1 - ab_prev[i]) * math.sqrt(1 - beta[i]) / (1 - ab[i])
            a_lin, b_lin = coef1 * p + coef2, coef1 * q
            tilde = beta[i] * (1 - ab_prev[i]) / (1 - ab[i])
            # No noise is added at the last step (Algorithm 2), whatever σ_1 is.
            sigma2 = 0.0 if i == 0 else (tilde if variance == "small" else beta[i])
        else:
            sigma2 = ddim_eta**2 * (1 - ab_prev[i]) / (1 - ab[i]) * (1 - ab[i] / ab_prev[i])
            if i == 0:
                sigma2 = 0.0
            d = math.sqrt(max(1 - ab_prev[i] - sigma2, 0.0))
            # x' = √ᾱ_prev x̂_0 + d·ε*, with ε* = c·x - c·√ᾱ·m
            a_lin = math.sqrt(ab_prev[i]) * p + d * c
            b_lin = math.sqrt(ab_prev[i]) * q - d * c * math.sqrt(ab[i]) * m
        mean = a_lin * mean + b_lin
        var = a_lin**2 * var + sigma2
    return mean, var


def ddim_oracle_samples(eta, seed, m=0.3, s=0.5, num_steps=50):
    """8,000 values from DDIM with the exact oracle on the 1000-step linear chain."""
    diffusion = GaussianDiffusion.from_config("linear", 1000, var_type="fixed_small")
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    return sample(
        diffusion,
        oracle,
        (2000, 1, 2, 2),
        method="ddim",
        num_steps=num_steps,
        eta=eta,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(seed),
    ).double()


def assert_moments_match(x, mean, var):
    """The sample mean and variance of `x` agree with (mean, var) within 5 standard errors."""
    n = x.numel()
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
    assert abs(float(x.var()) / var - 1) < 5 * math.sqrt(2 / n)


T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
ALPHA_BAR = np.cumprod(1 - BETAS)

# The recursion's own std bias (√Var/s - 1) for (m, s) = (0.3, 0.5) and (-0.5, 0.1):
#   ancestral σ²=β̃: -0.8%, -3.7%   ancestral σ²=β: +0.2%, +0.8%
#   respaced 250 steps: -2.8%, -10.9%   DDIM η=0, 100 steps: -2.8%, -11.7%
# A narrow data distribution (s = 0.1) needs more steps; the bounds below cover both cases.
SAMPLERS = [
    # (id, sample kwargs, var_type, chain ᾱ, recursion kwargs, |mean-m| bound, |std/s - 1| bound)
    ("ancestral-small", dict(), "fixed_small", ALPHA_BAR, dict(variance="small"), 0.01, 0.05),
    ("ancestral-large", dict(), "fixed_large", ALPHA_BAR, dict(variance="large"), 0.01, 0.05),
    (
        "respaced-250",
        dict(num_steps=250),
        "fixed_small",
        ALPHA_BAR[evenly_spaced_timesteps(T, 250)],
        dict(variance="small"),
        0.01,
        0.12,
    ),
    (
        "ddim-eta0-100",
        dict(method="ddim", num_steps=100),
        "fixed_small",
        ALPHA_BAR[evenly_spaced_timesteps(T, 100)],
        dict(ddim_eta=0.0),
        0.01,
        0.12,
    ),
]


@pytest.mark.parametrize(("m", "s"), [(0.3, 0.5), (-0.5, 0.1)])
@pytest.mark.parametrize(
    ("kwargs", "var_type", "chain", "recursion", "mean_tol", "std_tol"),
    [case[1:] for case in SAMPLERS],
    ids=[case[0] for case in SAMPLERS],
)
def test_samplers_recover_the_gaussian(m, s, kwargs, var_type, chain, recursion, mean_tol, std_tol):
    diffusion = GaussianDiffusion.from_config("linear", T, var_type=var_type)
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    n_images = 1500
    x = sample(
        diffusion,
        oracle,
        (n_images, 1, 2, 2),
        clip_denoised=False,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).double()
    exact_mean, exact_var = exact_final_moments(chain, m, s, **recursion)
    # (1) the sampler does what the mathematics says, to Monte-Carlo error (5 standard errors).
    assert_moments_match(x, exact_mean, exact_var)
    # (2) what the mathematics says is close to N(m, s²): fixed variances and respacing bias the
    # spread by at most the stated fraction (computed by the recursion; see SAMPLERS).
    assert abs(exact_mean - m) < mean_tol * max(1.0, abs(m))
    assert abs(math.sqrt(exact_var) / s - 1) < std_tol


def test_respaced_chain_visits_the_right_alpha_bars():
    diffusion = GaussianDiffusion.from_config("linear", T)
    chain = diffusion.respaced(num_steps=100)
    kept = evenly_spaced_timesteps(T, 100)
    np.testing.assert_allclose(chain.alphas_cumprod.numpy(), ALPHA_BAR[kept], rtol=1e-12)
    np.testing.assert_allclose(chain.betas.numpy(), betas_for_subsequence(ALPHA_BAR, kept))
    assert chain.timestep_map.tolist() == kept.tolist()
    # A respaced chain of a respaced chain still maps to the original indices.
    again = chain.respaced(num_steps=10)
    assert set(again.timestep_map.tolist()) <= set(kept.tolist())


def test_ddim_eta_one_equals_ancestral_fixed_small_in_distribution():
    """η = 1 gives σ² = β̃ on the chain, so DDIM's moments equal ancestral fixed-small's."""
    chain = ALPHA_BAR[evenly_spaced_timesteps(T, 50)]
    assert exact_final_moments(chain, 0.3, 0.5, ddim_eta=1.0) == pytest.approx(
        exact_final_moments(chain, 0.3, 0.5, variance="small"), rel=1e-9
    )
    mean, var = exact_final_moments(chain, 0.3, 0.5, variance="small")
    assert_moments_match(ddim_oracle_samples(eta=1.0, seed=3), mean, var)


def test_samplers_are_reproducible_and_can_return_the_trajectory():
    diffusion = GaussianDiffusion.from_config("linear", 50)
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.0, 0.5)
    run = lambda seed: sample(  # noqa: E731
        diffusion, oracle, (3, 1, 4, 4), generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert not torch.equal(run(7), run(8))
    final, trajectory = sample(
        diffusion,
        oracle,
        (3, 1, 4, 4),
        generator=torch.Generator().manual_seed(7),
        return_trajectory=True,
        trajectory_stride=10,
    )
    assert [t for t, _ in trajectory] == [50, 40, 30, 20, 10, 0]
    torch.testing.assert_close(trajectory[-1][1], final)
    assert final.abs().max() <= 1.0  # clip_denoised defaults to True, as the official sampler


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(method="langevin"), "allowed: ancestral, ddim"),
        (dict(method="ddim", eta=1.5), "eta must lie in"),
        (dict(method="ddim", eta=-0.1), "eta must lie in"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=51), "num_steps"),
    ],
)
def test_bad_sampler_arguments(kwargs, fragment):
    diffusion = GaussianDiffusion.from_config("linear", 50)
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.0, 0.5)
    with pytest.raises(ValueError, match=fragment):
        sample(diffusion, oracle, (1, 1, 2, 2), **kwargs)


def discretized_gaussian_entropy_bits(m, s):
    """Exact entropy of N(m, s²) quantised to the 256 levels of 8-bit data in [-1, 1]."""
    edges = np.concatenate([[-np.inf], (np.arange(1, 256) - 0.5) / 127.5 - 1, [np.inf]])
    p = np.diff(norm.cdf(edges, m, s))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.fixture(scope="module")
def quantised_gaussian_batch():
    m, s = 0.3, 0.5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=gen, dtype=torch.float64) * s + m
    return torch.clamp(torch.round((x + 1) * 127.5), 0, 255).to(torch.uint8), m, s


@pytest.mark.parametrize(("var_type", "reference"), [("fixed_small", 8.59), ("fixed_large", 7.92)])
def test_bound_with_the_oracle_is_above_the_entropy(quantised_gaussian_batch, var_type, reference):
    images, m, s = quantised_gaussian_batch
    entropy = discretized_gaussian_entropy_bits(m, s)
    assert entropy == pytest.approx(7.50, abs=0.005)
    diffusion = GaussianDiffusion.from_config("linear", T, var_type=var_type)
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    x0 = images.double() / 127.5 - 1
    bound = bits_per_dim(diffusion, oracle, x0, generator=torch.Generator().manual_seed(1))
    total = bound["total"]
    stderr = float(total.std() / math.sqrt(total.numel()))
    # The reference numbers come from an independent float64 computation on the same setting;
    # the batch mean of 64 images carries a standard error of about 0.08 bits.
    assert float(total.mean()) == pytest.approx(reference, abs=3 * stderr)
    # A bound can't go below the entropy; the gap is what the fixed variances cost (larger for the
    # too-small σ² = β̃: ≈ 1.0 bit, against ≈ 0.4 bit for σ² = β).
    assert float(total.mean()) > entropy
    assert float(total.mean()) - entropy < {"fixed_small": 1.4, "fixed_large": 0.8}[var_type]
    assert float(bound["prior"].max()) < 1e-4
    # The decoder term L_0 and the first KL terms carry most of the bound.
    assert float(bound["terms"][:, :50].sum(1).mean()) > 0.7 * float(total.mean())

    # The Monte-Carlo estimate agrees with the full sum within its standard error.
    mc = mc_bits_per_dim(diffusion, oracle, x0, num_t=6, generator=torch.Generator().manual_seed(2))
    combined = math.hypot(mc["stderr"], stderr)
    assert abs(mc["mean"] - float(total.mean())) < 3 * combined
    assert mc["bpd"].shape == (64,)


def test_dataset_bits_per_dim_streams_batches_and_agrees_with_one_batch(quantised_gaussian_batch):
    images, m, s = quantised_gaussian_batch
    diffusion = GaussianDiffusion.from_config("linear", 100, var_type="fixed_large")
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    gen = torch.Generator().manual_seed(5)
    halves = [
        bits_per_dim(diffusion, oracle, part, generator=gen) for part in (images[:40], images[40:])
    ]
    by_hand = torch.cat([half["total"] for half in halves])
    streamed = dataset_bits_per_dim(
        diffusion, oracle, [images[:40], images[40:]], generator=torch.Generator().manual_seed(5)
    )
    assert streamed["images"] == 64
    # Same generator, same draw order: the streamed statistics are those of the two batches.
    assert streamed["bits_per_dim"] == pytest.approx(float(by_hand.mean()), rel=1e-9)
    assert streamed["stderr"] == pytest.approx(float(by_hand.std() / 8), rel=1e-6)
    assert len(streamed["terms"]) == 100
    assert sum(streamed["terms"]) + streamed["prior_bits_per_dim"] == pytest.approx(
        streamed["bits_per_dim"], rel=1e-6
    )
    mc = dataset_bits_per_dim(diffusion, oracle, [images], exact=False, num_t=4)
    assert abs(mc["bits_per_dim"] - streamed["bits_per_dim"]) < 4 * math.hypot(
        mc["stderr"], streamed["stderr"]
    )
    with pytest.raises(ValueError, match="no images"):
        dataset_bits_per_dim(diffusion, oracle, [])


def closed_form_kl_bits(x0, x_t, t, m, s, var_type):
    """KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) per pixel in bits, for the oracle, in float64.

    Independent of the library: the posterior from Eq. 7 and the oracle's mean from Eq. 11, both
    written out from the β schedule.
    """
    b = BETAS
    ab = ALPHA_BAR
    ab_prev = np.append(1.0, ab[:-1])
    coef1 = b[t] * math.sqrt(ab_prev[t]) / (1 - ab[t])
    coef2 = (1 - ab_prev[t]) * math.sqrt(1 - b[t]) / (1 - ab[t])
    posterior_var = b[t] * (1 - ab_prev[t]) / (1 - ab[t])
    eps = math.sqrt(1 - ab[t]) * (x_t - math.sqrt(ab[t]) * m) / (ab[t] * s**2 + 1 - ab[t])
    model_mean = (x_t - b[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(1 - b[t])
    model_var = posterior_var if var_type == "fixed_small" else b[t]
    true_mean = coef1 * x0 + coef2 * x_t
    kl = 0.5 * (
        np.log(model_var / posterior_var)
        + posterior_var / model_var
        + (true_mean - model_mean) ** 2 / model_var
        - 1
    )
    return kl / math.log(2)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_each_bound_term_equals_the_closed_form(var_type):
    diffusion = GaussianDiffusion.from_config("linear", T, var_type=var_type)
    m, s = 0.3, 0.5
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.round((torch.rand(5, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1) * 127.5)
    x0 = x0 / 127.5
    x_t = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 30, 400, 999])
    got = diffusion.vb_terms_bpd(oracle, x0, x_t, t)["output"]
    for row, i in enumerate(t.tolist()):
        expected = closed_form_kl_bits(x0[row].numpy(), x_t[row].numpy(), i, m, s, var_type).mean()
        assert float(got[row]) == pytest.approx(expected, rel=1e-9)
    # At t = 1 the term is the decoder NLL of Eq. 13: Φ-differences over the 8-bit bins, with
    # σ² = β̃_2 as the official code clips it (both variance choices), computed with scipy.
    zero = torch.zeros(5, dtype=torch.long)
    x_1 = math.sqrt(ALPHA_BAR[0]) * x0 + math.sqrt(1 - ALPHA_BAR[0]) * x_t  # a draw of q(x_1|x_0)
    decoder = diffusion.vb_terms_bpd(oracle, x0, x_1, zero)["output"]
    sd = math.sqrt(BETAS[1] * (1 - ALPHA_BAR[0]) / (1 - ALPHA_BAR[1]))
    for row in range(5):
        x, z = x0[row].numpy(), x_1[row].numpy()
        eps = math.sqrt(1 - ALPHA_BAR[0]) * (z - math.sqrt(ALPHA_BAR[0]) * m)
        eps = eps / (ALPHA_BAR[0] * s**2 + 1 - ALPHA_BAR[0])
        mean = (z - BETAS[0] / math.sqrt(1 - ALPHA_BAR[0]) * eps) / math.sqrt(1 - BETAS[0])
        upper = np.where(x > 0.999, np.inf, x + 1 / 255)
        lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
        p = norm.cdf(upper, mean, sd) - norm.cdf(lower, mean, sd)
        assert float(decoder[row]) == pytest.approx(-np.log2(p).mean(), rel=1e-6)


def test_stratified_timesteps_partition_and_weights():
    from ddpm.likelihood import _stratified_timesteps

    for T_, k in [(1000, 4), (1000, 6), (10, 4), (2, 4), (3, 8)]:
        gen = torch.Generator().manual_seed(0)
        steps, weights = _stratified_timesteps(T_, k, 4000, gen)
        # Every draw lies in 1 … T-1, one per stratum, strata in increasing, disjoint order.
        assert steps.min() >= 1 and steps.max() <= T_ - 1
        assert torch.all(steps[:, 1:] > steps[:, :-1])
        seen = set(steps.flatten().tolist())
        # E[w · f(t)] per stratum = Σ_{t in stratum} f(t): check with f = 1 (stratum sizes add
        # to T-1) and f(t) = 1/t (the shape of the bound), against exact sums.
        assert float(weights.mean(0).sum()) == pytest.approx(T_ - 1, rel=0.03)
        estimate = float((weights / steps.double()).sum(1).mean())
        exact = sum(1.0 / t for t in range(1, T_))
        assert estimate == pytest.approx(exact, rel=1e-9)  # w = 1/p ∝ t, so w/t is constant
        assert seen <= set(range(1, T_))


def test_mc_estimate_is_unbiased_for_the_bound():
    """Averaged over seeds, the MC estimate matches the full sum averaged over its own draws."""
    diffusion = GaussianDiffusion.from_config(
        "linear", 100, beta_start=1e-3, beta_end=0.2, var_type="fixed_small"
    )
    m, s = 0.3, 0.5
    oracle = GaussianOracle(diffusion.alphas_cumprod, m, s)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 2, 2, generator=gen, dtype=torch.float64) * s + m
    x0 = torch.clamp(torch.round((x + 1) * 127.5), 0, 255) / 127.5 - 1
    full = [
        float(
            bits_per_dim(diffusion, oracle, x0, generator=torch.Generator().manual_seed(k))[
                "total"
            ].mean()
        )
        for k in range(8)
    ]
    mc = [
        mc_bits_per_dim(diffusion, oracle, x0, num_t=4, generator=torch.Generator().manual_seed(k))[
            "mean"
        ]
        for k in range(100, 140)
    ]
    full_mean, mc_mean = np.mean(full), np.mean(mc)
    standard_error = math.hypot(
        np.std(full) / math.sqrt(len(full)), np.std(mc) / math.sqrt(len(mc))
    )
    assert abs(mc_mean - full_mean) < 4 * standard_error
    # The spread across seeds is what makes it useful as a validation metric: well under 1 bit.
    assert np.std(mc) < 0.5
    with pytest.raises(ValueError, match="num_t"):
        mc_bits_per_dim(diffusion, oracle, x0, num_t=0)


def test_likelihood_rejects_images_off_the_8_bit_grid():
    diffusion = GaussianDiffusion.from_config("linear", 10)
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.0, 0.5)
    with pytest.raises(ValueError, match="8-bit data"):
        bits_per_dim(diffusion, oracle, torch.rand(2, 1, 2, 2) * 255)  # 0 … 255 floats
    with pytest.raises(ValueError, match="8-bit data"):
        mc_bits_per_dim(diffusion, oracle, torch.rand(2, 1, 2, 2) * 0.5)  # continuous values
    ok = mc_bits_per_dim(diffusion, oracle, torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8))
    assert ok["bpd"].shape == (2,)


def test_ddim_with_intermediate_eta_matches_its_recursion():
    chain = ALPHA_BAR[evenly_spaced_timesteps(T, 50)]
    mean, var = exact_final_moments(chain, 0.3, 0.5, ddim_eta=0.5)
    assert_moments_match(ddim_oracle_samples(eta=0.5, seed=6), mean, var)
    # η = 0.5 sits between the deterministic and the ancestral spreads.
    low = exact_final_moments(chain, 0.3, 0.5, ddim_eta=0.0)[1]
    high = exact_final_moments(chain, 0.3, 0.5, ddim_eta=1.0)[1]
    assert min(low, high) < var < max(low, high)


def test_respaced_trajectory_is_labelled_with_the_original_timesteps():
    diffusion = GaussianDiffusion.from_config("linear", 100)
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.0, 0.5)
    _, trajectory = sample(diffusion, oracle, (2, 1, 2, 2), num_steps=5, return_trajectory=True)
    kept = evenly_spaced_timesteps(100, 5)
    assert [t for t, _ in trajectory] == [int(i) + 1 for i in kept[::-1]] + [0]
    again = diffusion.respaced(num_steps=10).respaced(num_steps=4)
    ten = evenly_spaced_timesteps(100, 10)
    assert again.timestep_map.tolist() == ten[evenly_spaced_timesteps(10, 4)].tolist()
    with pytest.raises(ValueError, match="eta applies to method 'ddim' only"):
        sample(diffusion, oracle, (1, 1, 2, 2), eta=0.5)
