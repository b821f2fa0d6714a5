"""Samplers: Algorithm 2 (ancestral), respaced ancestral, and DDIM (Song et al. 2021).

Every sampler loops over timesteps only; images and pixels are always whole tensors. Noise is
drawn on the generator's device and then moved, so one CPU generator gives the same images on
any device the model runs on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion, Model, randn
from ddpm.images import to_nhwc
from ddpm.precision import on_for_cuda, resolve_precision
from ddpm.validation import Problem, check_choice, check_range, raise_problems

METHODS = ("ancestral", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to draw images: the defaults are Algorithm 2 over all T steps, x̂0 clipped.

    * ``method="ancestral"`` with ``num_steps=None`` is Algorithm 2 over all T steps.
    * ``num_steps=k`` runs either method on k evenly spaced steps of the chain (respacing: β is
      recomputed from ᾱ on the subsequence, the network still sees the original indices).
    * ``method="ddim"`` with ``eta`` in [0, 1]: η = 0 is deterministic DDIM, η = 1 has the
      ancestral sampler's fixed-small variance.
    * ``clip_denoised`` clips the predicted x_0 to [-1, 1] at every step (the official sampler).
    """

    method: str = "ancestral"
    num_steps: int | None = None
    eta: float = 0.0
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        raise_problems("SamplerConfig", self.problems())

    def problems(self) -> list[Problem]:
        found = check_choice("method", self.method, METHODS)
        found += check_range("eta", self.eta, 0.0, 1.0)
        if self.method == "ancestral" and self.eta != 0.0:
            found.append(("eta", "applies to method 'ddim' only; the ancestral sampler takes 0"))
        if self.num_steps is not None and not (
            isinstance(self.num_steps, int) and self.num_steps >= 1
        ):
            found.append(("num_steps", f"must be an integer >= 1 or null, got {self.num_steps!r}"))
        return found

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `sample` that this config sets (a subclass's extra fields,
        such as the pipeline's, are not among them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerConfig)}


class _Bf16Network(nn.Module):
    """The network under bf16 autocast, returning fp32: the sampler's own arithmetic on x (the
    posterior mean, the noise, the clip) stays fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x, t).float()


def fast_network(
    model: nn.Module, *, bf16: bool = False, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """`model` as a sampler should call it on an accelerator: weights in channels_last, bf16
    autocast, `torch.compile`. The switches change the pixels (bf16 most), so what a sample set
    was drawn with belongs in its record; each is off by default."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = _Bf16Network(model) if bf16 else model
    if compile:
        network = torch.compile(network)
    return network.eval()


def network_switches(
    precision: str,
    device: torch.device | str,
    *,
    channels_last: bool | None = None,
    compile: bool | None = None,
    key: str = "precision",
    bf16_supported: bool | None = None,
) -> dict[str, bool]:
    """`fast_network`'s keyword switches for `device`, by the rule training uses
    (`ddpm.precision`): auto (None) is on for CUDA, off elsewhere. `key` and `bf16_supported`
    as in `resolve_precision`."""
    return {
        "bf16": resolve_precision(precision, device, key, bf16_supported=bf16_supported),
        "channels_last": on_for_cuda(channels_last, device),
        "compile": on_for_cuda(compile, device),
    }


def model_device(model: Model) -> torch.device:
    """Where a network's parameters live (the CPU for a plain callable or a parameterless one)."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _ancestral_step(
    chain: GaussianDiffusion,
    model: Model,
    x: Tensor,
    t: Tensor,
    clip_denoised: bool,
    generator: torch.Generator | None,
    last: bool,
) -> Tensor:
    """x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 at the `last` step (paper t = 1, index 0)."""
    out = chain.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    if last:
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
    last: bool,
) -> Tensor:
    """Song et al. (2021), Eq. 12 with σ_t(η) of their Eq. 16, on the (respaced) chain's ᾱ."""
    out = chain.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    eps = out["pred_eps"]
    alpha_bar = chain.extract(chain.alphas_cumprod, t, x)
    alpha_bar_prev = chain.extract(chain.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt(
        (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    )
    direction = torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * eps
    x_prev = torch.sqrt(alpha_bar_prev) * out["pred_x0"] + direction
    if last or eta == 0.0:
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
    """Draw images from p_θ, starting at x_T ~ N(0, I); see `SamplerConfig` for the settings.

    Runs on `device`, by default the model's. `diffusion` is left where it is: the sampler works
    on its own copy of the chain's constants on that device.
    ``return_trajectory`` also returns [(paper-style chain index, x on the CPU), …] from x_T to
    x_0, every `trajectory_stride` steps (the final x_0 is always included).
    """
    SamplerConfig(method, num_steps, eta, clip_denoised)  # raises ConfigError naming bad values
    if trajectory_stride < 1:
        raise ValueError(f"trajectory_stride must be >= 1; got {trajectory_stride}")
    device = torch.device(device) if device is not None else model_device(model)
    chain = diffusion.respaced(num_steps=num_steps) if num_steps is not None else diffusion
    chain = chain.copy_to(device)

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
            # The step index comes from the loop, not from t: reading t back would make every
            # step wait for the GPU.
            if method == "ancestral":
                x = _ancestral_step(chain, model, x, t, clip_denoised, generator, i == 0)
            else:
                x = _ddim_step(chain, model, x, t, clip_denoised, eta, generator, i == 0)
    finally:
        if was_training:
            model.train()
    if return_trajectory:
        trajectory.append((0, x.detach().cpu()))
        return x, trajectory
    return x


def draw_images(
    diffusion: GaussianDiffusion,
    model: Model,
    num_images: int,
    image_shape: tuple[int, int, int],
    config: SamplerConfig,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """`num_images` samples as uint8 NHWC (the on-disk layout), drawn in batches of
    `batch_size` from one generator; `image_shape` is (C, H, W)."""
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        x = sample(
            diffusion,
            model,
            (n, *image_shape),
            generator=generator,
            device=device,
            **config.kwargs(),
        )
        out.append(to_nhwc(x))
    return np.concatenate(out)
