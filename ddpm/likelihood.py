"""Negative log-likelihood bounds in bits/dim: the number in the paper's Table 1.

The bound of Eq. 5, L = L_T + Σ_{t>1} L_{t-1} + L_0, is evaluated per image for 8-bit data scaled
to [-1, 1]. `bits_per_dim` sums every term (T network calls per batch); `mc_bits_per_dim` is an
unbiased, much cheaper estimate for use as a validation metric.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion, Model, randn
from ddpm.images import as_discrete_data


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return randn(tuple(x.shape), generator, x.device, x.dtype)


@torch.no_grad()
def bits_per_dim(
    diffusion: GaussianDiffusion,
    model: Model,
    images: Tensor,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The full variational bound per image, in bits/dim.

    Returns ``total`` [N] (= prior + Σ terms), ``prior`` [N] (L_T) and ``terms`` [N, T] where
    ``terms[:, i]`` is L_0 for i = 0 and L_{i} = KL(q(x_i | x_{i+1}, x_0) ‖ p_θ) otherwise
    (paper numbering; index i is the paper's t = i + 1). Each term uses its own draw of x_t.
    """
    x0 = as_discrete_data(images)
    n = x0.shape[0]
    terms = torch.zeros(n, diffusion.num_timesteps, dtype=torch.float64, device=x0.device)
    for i in tqdm(
        range(diffusion.num_timesteps - 1, -1, -1), desc="bits/dim", disable=not progress
    ):
        t = torch.full((n,), i, device=x0.device, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, _randn_like(x0, generator))
        out = diffusion.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised)
        terms[:, i] = out["output"].double()
    prior = diffusion.prior_bpd(x0).double()
    return {"total": terms.sum(dim=1) + prior, "prior": prior, "terms": terms}


def _stratified_timesteps(
    num_timesteps: int, num_t: int, batch: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw `num_t` timesteps per image from 1 … T-1 for an unbiased estimate of Σ_t L_t.

    The KL terms fall off roughly like 1/t (most of the bound sits in the first few dozen steps),
    so uniform draws give a very noisy sum. Instead the range is cut into geometrically growing
    strata, one draw per stratum with p(t) ∝ 1/t inside it; the weight 1/p(t) keeps the estimate
    unbiased. On the Gaussian-oracle test this cuts the estimator's spread about 15-fold against
    uniform strata at num_t = 4. Returns indices [N, k] and weights [N, k].
    """
    edges = np.unique(np.geomspace(1, num_timesteps, num_t + 1).round().astype(np.int64))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    steps, weights = [], []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        candidates = torch.arange(low, high, dtype=torch.long)
        probs = 1.0 / candidates.double()
        probs /= probs.sum()
        pick = torch.multinomial(
            probs.to(gen_device).expand(batch, -1), 1, generator=generator
        ).cpu()
        steps.append(candidates[pick[:, 0]])
        weights.append(1.0 / probs[pick[:, 0]])
    return torch.stack(steps, dim=1), torch.stack(weights, dim=1)


@torch.no_grad()
def mc_bits_per_dim(
    diffusion: GaussianDiffusion,
    model: Model,
    images: Tensor,
    num_t: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | float]:
    """An unbiased Monte-Carlo estimate of the bound of Eq. 5, per image, in bits/dim.

    L_T (no network) and L_0 (the decoder, which dominates the bound and would dominate the
    variance if sampled) are computed exactly; the KL terms t = 1 … T-1 are estimated from
    `num_t` importance-weighted, stratified draws of t per image (`_stratified_timesteps`).
    Costs num_t + 1 network calls per batch, against T for
    `bits_per_dim`. Returns ``bpd`` [N], its batch ``mean`` and the ``stderr`` of that mean.
    """
    if num_t < 1:
        raise ValueError(f"num_t must be >= 1; got {num_t}")
    x0 = as_discrete_data(images)
    n = x0.shape[0]
    device = x0.device
    zero = torch.zeros(n, device=device, dtype=torch.long)
    decoder = diffusion.vb_terms_bpd(
        model, x0, diffusion.q_sample(x0, zero, _randn_like(x0, generator)), zero
    )
    total = diffusion.prior_bpd(x0).double() + decoder["output"].double()
    if diffusion.num_timesteps > 1:
        steps, weights = _stratified_timesteps(diffusion.num_timesteps, num_t, n, generator)
        for k in range(steps.shape[1]):
            t = steps[:, k].to(device)
            x_t = diffusion.q_sample(x0, t, _randn_like(x0, generator))
            term = diffusion.vb_terms_bpd(model, x0, x_t, t)["output"].double()
            total += weights[:, k].to(device) * term
    stderr = float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"bpd": total, "mean": float(total.mean()), "stderr": stderr}
