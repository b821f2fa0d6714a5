"""Samplers: Algorithm 2 (ancestral), respaced ancestral, and DDIM (Song et al. 2021).

Every sampler loops over timesteps only; images and pixels are always whole tensors. Noise is
drawn on the generator's device and then moved, so one CPU generator gives the same images on
any device the model runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion, Model, randn

METHODS = ("ancestral", "ddim")


def _ancestral_step(
    chain: GaussianDiffusion,
    model: Model,
    x: Tensor,
    t: Tensor,
    clip_denoised: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 at the last step (paper t = 1, index 0)."""
    out = chain.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    if int(t[0]) == 0:
        return out["mean"]
    noise = randn(tuple(x.shape), generator, x.device, x.dtype)
    return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise


def _ddim_step(
    chain: GaussianDiffusion,
    model: Model,
    x: Tensor,
    t: Tensor,
    clip_denoised: bool,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Song et al. (2021), Eq. 12 with σ_t(η) of their Eq. 16, on the (respaced) chain's ᾱ."""
    out = chain.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    eps = out["pred_eps"]
    alpha_bar = chain._extract(chain.alphas_cumprod, t, x)
    alpha_bar_prev = chain._extract(chain.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt(
        (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    )
    direction = torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * eps
    x_prev = torch.sqrt(alpha_bar_prev) * out["pred_x0"] + direction
    if int(t[0]) == 0 or eta == 0.0:
        return x_prev
    return x_prev + sigma * randn(tuple(x.shape), generator, x.device, x.dtype)


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    method: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
    trajectory_stride: int = 1,
    progress: bool = False,
) -> Tensor | tuple[Tensor, list[tuple[int, Tensor]]]:
    """Draw images from p_θ, starting at x_T ~ N(0, I).

    * ``method="ancestral"`` with ``num_steps=None`` is Algorithm 2 over all T steps.
    * ``num_steps=k`` runs either method on k evenly spaced steps of the chain (respacing: β is
      recomputed from ᾱ on the subsequence, the network still sees the original indices).
    * ``method="ddim"`` with ``eta`` in [0, 1]: η = 0 is deterministic DDIM, η = 1 has the
      ancestral sampler's fixed-small variance.
    * ``clip_denoised`` clips the predicted x_0 to [-1, 1] at every step (the official sampler).
    * ``return_trajectory`` also returns [(paper-style chain index, x on the CPU), …] from x_T to
      x_0, every `trajectory_stride` steps (the final x_0 is always included).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if method == "ancestral" and eta != 0.0:
        raise ValueError("eta applies to method 'ddim' only; the ancestral sampler takes eta=0")
    if trajectory_stride < 1:
        raise ValueError(f"trajectory_stride must be >= 1; got {trajectory_stride}")
    if device is None:
        device = diffusion.betas.device
    device = torch.device(device)
    chain = diffusion if num_steps is None else diffusion.respaced(num_steps=num_steps)
    chain = chain.to(device)

    if noise is None:
        x = randn(tuple(shape), generator, device)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(shape)}")
        x = noise.to(device)

    # Sampling is inference: dropout off, whatever mode the caller left the network in.
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    trajectory: list[tuple[int, Tensor]] = []
    indices = range(chain.num_timesteps - 1, -1, -1)
    try:
        for step, i in enumerate(tqdm(indices, desc=f"sampling ({method})", disable=not progress)):
            if return_trajectory and step % trajectory_stride == 0:
                trajectory.append((int(chain.timestep_map[i]) + 1, x.detach().cpu()))
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            if method == "ancestral":
                x = _ancestral_step(chain, model, x, t, clip_denoised, generator)
            else:
                x = _ddim_step(chain, model, x, t, clip_denoised, eta, generator)
    finally:
        if was_training:
            model.train()
    if return_trajectory:
        trajectory.append((0, x.detach().cpu()))
        return x, trajectory
    return x
