import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl


def test_iterating_the_forward_step_matches_the_closed_form():
    """Eq. 2 applied t times by Monte Carlo agrees with Eq. 4's mean and variance."""
    diffusion = GaussianDiffusion.from_config("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.tensor([-0.8, 0.1, 0.9], dtype=torch.float64)
    x = x0.repeat(n, 1)
    betas = diffusion.betas
    checkpoints = {1, 10, 250, 1000}  # paper t
    for step in range(1, 1001):
        beta = betas[step - 1]
        x = torch.sqrt(1 - beta) * x + torch.sqrt(beta) * torch.randn(
            x.shape, generator=gen, dtype=torch.float64
        )
        if step in checkpoints:
            t = torch.full((3,), step - 1, dtype=torch.long)
            mean, var, _ = diffusion.q_mean_variance(x0.view(3, 1, 1, 1), t)
            mean, var = mean.flatten(), var.flatten()
            se_mean = torch.sqrt(var / n)
            assert torch.all((x.mean(0) - mean).abs() < 5 * se_mean), step
            se_var = var * math.sqrt(2 / n)
            assert torch.all((x.var(0) - var).abs() < 5 * se_var), step


def test_q_sample_is_the_reparameterised_closed_form():
    diffusion = GaussianDiffusion.from_config("cosine", 100)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 5, 50, 99])
    a = diffusion.alphas_cumprod[t].float().view(4, 1, 1, 1)
    torch.testing.assert_close(
        diffusion.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise
    )


def test_posterior_equals_bayes_rule_on_the_two_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), done by completing the square."""
    diffusion = GaussianDiffusion.from_config("linear", 1000)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 17, 500, 999])
    x0 = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    xt = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    for row, i in enumerate(t.tolist()):
        prior_mean = math.sqrt(ab[i - 1]) * x0[row]
        prior_var = 1 - ab[i - 1]
        precision = 1 / prior_var + (1 - b[i]) / b[i]
        bayes_var = 1 / precision
        bayes_mean = bayes_var * (prior_mean / prior_var + math.sqrt(1 - b[i]) * xt[row] / b[i])
        assert float(var[row].flatten()[0]) == pytest.approx(bayes_var, rel=1e-9)
        assert float(log_var[row].flatten()[0]) == pytest.approx(math.log(bayes_var), rel=1e-9)
        torch.testing.assert_close(mean[row], bayes_mean, rtol=1e-9, atol=1e-12)


def test_eps_mean_equals_eq_11_and_parameterisations_agree():
    """μ_θ = 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε); the x0 and v parameterisations give the same mean."""
    gen = torch.Generator().manual_seed(2)
    base = dict(schedule="linear", num_timesteps=100)
    eps_diffusion = GaussianDiffusion.from_config(**base, mean_type="eps")
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 50, 98, 99])
    xt = eps_diffusion.q_sample(x0, t, eps)
    out = eps_diffusion.p_mean_variance(lambda x, s: eps, xt, t)
    alpha = (1 - eps_diffusion.betas[t]).view(-1, 1, 1, 1)
    ab = eps_diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
    eq11 = (xt - (1 - alpha) / torch.sqrt(1 - ab) * eps) / torch.sqrt(alpha)
    torch.testing.assert_close(out["mean"], eq11)
    torch.testing.assert_close(out["pred_x0"], x0)

    x0_diffusion = GaussianDiffusion.from_config(**base, mean_type="x0")
    torch.testing.assert_close(x0_diffusion.p_mean_variance(lambda x, s: x0, xt, t)["mean"], eq11)
    v_diffusion = GaussianDiffusion.from_config(**base, mean_type="v")
    v = v_diffusion.velocity(x0, t, eps)
    v_out = v_diffusion.p_mean_variance(lambda x, s: v, xt, t)
    torch.testing.assert_close(v_out["mean"], eq11)
    torch.testing.assert_close(v_out["pred_eps"], eps)


def test_fixed_and_learned_variances():
    d_small = GaussianDiffusion.from_config("linear", 1000, var_type="fixed_small")
    d_large = GaussianDiffusion.from_config("linear", 1000, var_type="fixed_large")
    like = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    small = d_small.model_log_variance(t, like).exp().flatten()
    large = d_large.model_log_variance(t, like).exp().flatten()
    beta_tilde_2 = float(d_small.posterior_variance[1])
    assert small.tolist() == pytest.approx(
        [beta_tilde_2, beta_tilde_2, float(d_small.posterior_variance[999])]
    )
    assert large.tolist() == pytest.approx([beta_tilde_2, float(d_large.betas[1]), 0.02])
    learned = GaussianDiffusion.from_config(
        "linear", 1000, var_type="learned_range", loss_type="hybrid"
    )
    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    lv = learned.model_log_variance(torch.tensor([500, 500]), ends, ends).exp().flatten()
    assert lv.tolist() == pytest.approx(
        [float(learned.posterior_variance[500]), float(learned.betas[500])]
    )


def test_simple_loss_is_eq_14_for_the_given_t_and_noise():
    diffusion = GaussianDiffusion.from_config("linear", 50)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 10, 49])
    prediction = torch.randn(3, 1, 4, 4)
    losses = diffusion.training_losses(lambda x, s: prediction, x0, t=t, noise=noise)
    torch.testing.assert_close(losses["loss"], ((noise - prediction) ** 2).mean(dim=(1, 2, 3)))
    # With the ideal prediction the loss vanishes.
    assert (
        diffusion.training_losses(lambda x, s: noise, x0, t=t, noise=noise)["loss"].abs().max() == 0
    )


def test_hybrid_and_vlb_losses():
    diffusion = GaussianDiffusion.from_config(
        "linear", 20, var_type="learned_range", loss_type="hybrid"
    )
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn(2, 1, 4, 4)
    t = torch.tensor([3, 7])
    output = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    losses = diffusion.training_losses(lambda x, s: output, x0, t=t, noise=noise)
    # ε is perfect, so the MSE is 0 and the hybrid loss is λ·T·L_{t-1}, which is > 0 (wrong σ).
    assert losses["mse"].abs().max() == 0
    torch.testing.assert_close(losses["loss"], 0.001 * losses["vb"])
    assert torch.all(losses["vb"] > 0)
    losses["loss"].sum().backward()
    # The bound's gradient reaches the variance channels only (mean detached, Nichol & Dhariwal).
    assert output.grad[:, :1].abs().max() == 0 and output.grad[:, 1:].abs().max() > 0

    vlb = GaussianDiffusion.from_config("linear", 20, loss_type="vlb")
    zero_t = torch.tensor([0, 0])
    out = vlb.training_losses(lambda x, s: noise, x0, t=zero_t, noise=noise)
    # At t = 1 the term is the decoder NLL: ≥ 0 bits and T times the per-step value.
    assert torch.all(out["loss"] > 0)
    terms = vlb.vb_terms_bpd(lambda x, s: noise, x0, vlb.q_sample(x0, zero_t, noise), zero_t)[
        "output"
    ]
    torch.testing.assert_close(out["loss"], 20 * terms)


def test_discretized_decoder_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, math.log(0.1)), (0.95, math.log(0.02)), (-0.3, math.log(1e-3))]:
        m = torch.full_like(levels, mean)
        s = torch.full_like(levels, log_scale)
        log_p = discretized_gaussian_log_likelihood(levels, m, s)
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)

    # σ = 1e-4 is 1/39 of the half-bin 1/255, so a Gaussian centred on a level leaks Φ(-39) < 1e-300
    # to its neighbours, while one centred on a bin edge splits its mass exactly in two. Together
    # these pin every edge at level ± 1/255, which a decoder snapping x to the wrong grid breaks.
    def narrow_log_p(x, mean):
        return discretized_gaussian_log_likelihood(
            x, torch.full_like(x, mean), torch.full_like(x, math.log(1e-4))
        )

    # Level 153 is x = 0.2; levels 0 and 255 own the open-ended edge bins.
    for k in (0, 153, 255):
        near = levels[max(k - 1, 0) : k + 2]
        log_p = narrow_log_p(near, float(levels[k]))
        for level, value in zip(near.tolist(), log_p.tolist(), strict=True):
            if level == float(levels[k]):
                assert value == pytest.approx(0.0, abs=1e-9), k
            else:
                assert value < -100, (k, level)
    # Half-way between levels k and k + 1. The midpoint and the library's edge x ± 1/255 differ by
    # rounding only (~1e-16, i.e. ~1e-12 σ, and d log Φ/dz ≈ 0.8 at 0): log p = log ½ to ~1e-12, so
    # 1e-9 is float slack, while an edge off by a mere 0.01 σ would move log p by ~0.01.
    for k in (0, 153, 254):
        near = levels[max(k - 1, 0) : k + 3]
        log_p = narrow_log_p(near, (k + 0.5) / 127.5 - 1)
        for level, value in zip(near.tolist(), log_p.tolist(), strict=True):
            if level in (float(levels[k]), float(levels[k + 1])):
                assert value == pytest.approx(math.log(0.5), abs=1e-9), (k, level)
            else:
                assert value < -100, (k, level)


def test_normal_kl_closed_form():
    kl = normal_kl(
        torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0))
    )
    expected = math.log(2.0) + (1 + 1) / (2 * 4) - 0.5
    assert float(kl) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(mean_type="score"), "mean_type: got 'score'; allowed: 'eps', 'x0', 'v'"),
        (dict(var_type="learned"), "var_type: got 'learned'"),
        (dict(loss_type="l1"), "loss_type: got 'l1'"),
        (dict(var_type="learned_range", loss_type="simple"), "var_type: learned_range variance"),
        (dict(vlb_weight=-1.0), "vlb_weight: must be a finite number >= 0"),
        (dict(schedule="fancy"), "schedule: got 'fancy'; allowed: 'linear'"),
        (dict(num_timesteps=0), "num_timesteps: must be an integer >= 1"),
        (dict(beta_end=1.5), r"beta_end: must be in \(0, 1\)"),
    ],
)
def test_bad_diffusion_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        GaussianDiffusion.from_config(**kwargs)


def test_wrong_model_output_shape_is_reported():
    diffusion = GaussianDiffusion.from_config("linear", 10)
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, 6, 4, 4), x0)


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_x0_and_v_targets(mean_type):
    diffusion = GaussianDiffusion.from_config("linear", 100, mean_type=mean_type)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 1, 3, 3, generator=gen) * 2 - 1
    noise = torch.randn(4, 1, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 60, 99])
    a = diffusion.alphas_cumprod[t].float().view(4, 1, 1, 1)
    # v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022), written out here rather than via the library.
    target = x0 if mean_type == "x0" else a.sqrt() * noise - (1 - a).sqrt() * x0
    perfect = diffusion.training_losses(lambda x, s: target, x0, t=t, noise=noise)
    assert perfect["loss"].abs().max() < 1e-10
    off = diffusion.training_losses(lambda x, s: target + 0.1, x0, t=t, noise=noise)
    torch.testing.assert_close(off["loss"], torch.full((4,), 0.01))


def test_hybrid_with_fixed_variance_adds_the_weighted_bound_to_the_mean_loss():
    diffusion = GaussianDiffusion.from_config("linear", 20, loss_type="hybrid", vlb_weight=0.5)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 1, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=gen)
    t = torch.tensor([3, 7])
    prediction = (noise + 0.3).requires_grad_(True)
    losses = diffusion.training_losses(lambda x, s: prediction, x0, t=t, noise=noise)
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.5 * losses["vb"])
    # With a fixed variance the bound's gradient does reach the mean (it is L_simple + λ·L_vlb).
    (0.5 * losses["vb"]).sum().backward()
    assert prediction.grad.abs().max() > 0


def test_learned_variance_at_the_first_step_interpolates_beta_1_and_clipped_beta_tilde():
    d = GaussianDiffusion.from_config("linear", 1000, var_type="learned_range", loss_type="hybrid")
    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    lv = d.model_log_variance(torch.tensor([0, 0]), ends, ends).exp().flatten()
    assert lv.tolist() == pytest.approx([float(d.posterior_variance[1]), 1e-4])


def test_swapped_beta_range_is_rejected():
    with pytest.raises(ValueError, match=r"beta_end: must be >= beta_start \(0.02\), got 0.0001"):
        GaussianDiffusion.from_config("linear", 10, beta_start=0.02, beta_end=1e-4)


def test_constants_stay_float64_on_the_device():
    d = GaussianDiffusion.from_config("linear", 10).to("cpu")
    assert d.alphas_cumprod.dtype == torch.float64 and d.device.type == "cpu"
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float32)
    assert d.q_sample(x, torch.tensor([1, 2]), x).dtype == torch.float32


def test_noising_frames_put_the_paper_t_over_each_column():
    from ddpm.images import noising_frames

    diffusion = GaussianDiffusion.from_config("linear", 1000)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    timesteps, columns = noising_frames(diffusion, images, 5, torch.Generator().manual_seed(0))
    # Library index i is the paper's t = i + 1; the first column is x_0 itself.
    assert timesteps == [0, 251, 501, 750, 1000]
    assert [c.shape for c in columns] == [(3, 8, 8, 1)] * 5
    np.testing.assert_array_equal(columns[0], images.permute(0, 2, 3, 1).numpy())
    # At t = T, sqrt(alpha_bar) ~ 0.006: the last column is the noise, not the image.
    last = columns[-1].astype(float)
    assert abs(np.corrcoef(last.ravel(), columns[0].astype(float).ravel())[0, 1]) < 0.3
    assert columns[1].std() > 0 and not np.array_equal(columns[1], columns[0])
