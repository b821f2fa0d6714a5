"""The Gaussian diffusion of Ho et al. (2020): forward process, posterior, reverse model, losses.

This module knows nothing about the network: a model is any callable ``model(x_t, t) -> output``
where ``t`` holds 0-based timestep indices (see `ddpm.schedules` for the mapping to the paper's t).
Each method implements one equation of the paper; equation numbers are the paper's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ddpm.errors import short_repr
from ddpm.schedules import (
    MAX_TIMESTEPS,
    SCHEDULES,
    betas_for_subsequence,
    derived_constants,
    evenly_spaced_timesteps,
    make_betas,
)
from ddpm.validation import Problem, check_choice, raise_problems

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid")

Model = Callable[[Tensor, Tensor], Tensor]


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to `device`.

    Drawing where the generator lives makes one CPU generator give the same numbers whatever
    device the model runs on.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    device = torch.device(device)
    if gen_device.type == "cpu" and device.type == "cuda":
        # From pinned memory the copy is queued behind the GPU's work instead of waiting for
        # it, so a sampling loop with a CPU generator never stalls on a host sync.
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def _parameterisation_problems(
    mean_type: str, var_type: str, loss_type: str, vlb_weight: float
) -> list[Problem]:
    """What the network predicts and how it is trained: the rules shared by `DiffusionConfig` and
    `GaussianDiffusion` (which also takes arbitrary betas)."""
    problems = [
        *_choice("mean_type", mean_type, MEAN_TYPES),
        *_choice("var_type", var_type, VAR_TYPES),
        *_choice("loss_type", loss_type, LOSS_TYPES),
    ]
    if var_type == "learned_range" and loss_type == "simple":
        problems.append(
            (
                "var_type",
                "learned_range variance is only trained by loss_type vlb or hybrid, not simple "
                "(L_simple gives it no gradient)",
            )
        )
    if not (
        isinstance(vlb_weight, (int, float))
        and not isinstance(vlb_weight, bool)
        and 0 <= vlb_weight < float("inf")
    ):
        problems.append(
            ("vlb_weight", f"must be a finite number >= 0, got {short_repr(vlb_weight)}")
        )
    return problems


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> list[Problem]:
    """`check_choice` for a value that may come from a crafted file: a non-string is named by
    a short repr, never compared or printed whole."""
    if not isinstance(value, str):
        return [(name, f"got {short_repr(value)}; allowed: {', '.join(map(repr, allowed))}")]
    if value not in allowed and len(value) > 40:
        return [(name, f"got {short_repr(value)}; allowed: {', '.join(map(repr, allowed))}")]
    return check_choice(name, value, allowed)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Everything that defines a diffusion process: the β schedule and the parameterisation.

    Plain data (a checkpoint stores it as a dict and rebuilds the process from it). Defaults are
    the paper's: T = 1000 linear steps from 1e-4 to 0.02, ε-prediction, σ²_t = β_t, L_simple.
    """

    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: str = "eps"
    var_type: str = "fixed_large"
    loss_type: str = "simple"
    vlb_weight: float = 0.001

    def __post_init__(self) -> None:
        raise_problems("DiffusionConfig", self.problems())

    def problems(self) -> list[Problem]:
        found = _choice("schedule", self.schedule, SCHEDULES)
        steps = self.num_timesteps
        if isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 1):
            found.append(("num_timesteps", f"must be an integer >= 1, got {short_repr(steps)}"))
        elif steps > MAX_TIMESTEPS:
            # Refused before any schedule array exists (1e10 steps would be ~75 GiB of them).
            found.append(
                ("num_timesteps", f"{steps} is over this library's limit of {MAX_TIMESTEPS:,}")
            )
        betas_ok = True
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and 0.0 < value < 1.0
            ):
                found.append((name, f"must be in (0, 1), got {short_repr(value)}"))
                betas_ok = False
        if betas_ok and self.beta_start > self.beta_end:
            found.append(
                ("beta_end", f"must be >= beta_start ({self.beta_start}), got {self.beta_end}")
            )
        found += _parameterisation_problems(
            self.mean_type, self.var_type, self.loss_type, self.vlb_weight
        )
        return found

    def build(self) -> GaussianDiffusion:
        betas = make_betas(
            self.schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end
        )
        return GaussianDiffusion(
            betas,
            mean_type=self.mean_type,
            var_type=self.var_type,
            loss_type=self.loss_type,
            vlb_weight=self.vlb_weight,
        )


def mean_over_pixels(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of Eq. 13: a Gaussian integrated over the 8-bit bin around each x in [-1, 1].

    The bins are 2/255 wide; the edge bins extend to ±∞. Uses the exact normal CDF (the official
    code uses a tanh approximation), with log-CDFs in the tails so that tiny probabilities stay
    finite, and the bin mass taken on the side of the mean where the CDF difference is accurate.
    """
    if not (x.shape == mean.shape == log_scale.shape):
        raise ValueError(
            f"shapes differ: x {x.shape}, mean {mean.shape}, log_scale {log_scale.shape}"
        )
    inv_stdv = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255.0) * inv_stdv
    lower = (x - mean - 1.0 / 255.0) * inv_stdv
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper edge): the lowest bin
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge): the top bin
    # P(lower < Z < upper): subtract CDFs on whichever side of 0 keeps them away from 1.
    mass = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(mass.clamp(min=1e-300 if mass.dtype == torch.float64 else 1e-12))
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_mass)
    )


class GaussianDiffusion:
    """Forward process, posterior and reverse-process parameterisation for one β schedule.

    Every constant is computed once in float64 (`ddpm.schedules.derived_constants`) and kept in
    float64: ``.to(device)`` moves them once and never changes their dtype (this is deliberately
    not an ``nn.Module``, whose ``.float()``/``.half()`` would silently round them). `extract`
    casts the gathered values to the input's dtype. Devices without float64 (Apple's MPS) get
    float32 copies.
    """

    def __init__(
        self,
        betas: np.ndarray,
        mean_type: str = "eps",
        var_type: str = "fixed_large",
        loss_type: str = "simple",
        vlb_weight: float = 0.001,
        timestep_map: np.ndarray | None = None,
    ) -> None:
        raise_problems(
            "GaussianDiffusion",
            _parameterisation_problems(mean_type, var_type, loss_type, vlb_weight),
        )
        self.mean_type = mean_type
        self.var_type = var_type
        self.loss_type = loss_type
        self.vlb_weight = float(vlb_weight)
        constants = derived_constants(betas)
        self.num_timesteps = int(constants["betas"].shape[0])
        self._constant_names = [*constants, "timestep_map"]
        for name, value in constants.items():
            setattr(self, name, torch.from_numpy(value))
        # A respaced chain keeps the original chain's indices, because that is what the network
        # was trained to see; the identity map for an ordinary chain.
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map must have one entry per step ({self.num_timesteps}); "
                f"got {timestep_map.shape}"
            )
        self.timestep_map = torch.from_numpy(timestep_map)

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Move every constant to `device` (in place; returns self). Dtypes stay float64."""
        device = torch.device(device)
        for name in self._constant_names:
            value = getattr(self, name)
            if device.type == "mps" and value.dtype == torch.float64:
                value = value.float()
            setattr(self, name, value.to(device))
        return self

    def copy_to(self, device: torch.device | str) -> GaussianDiffusion:
        """A copy whose constants live on `device`; this object stays where it is."""
        return copy.copy(self).to(device)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @classmethod
    def from_config(cls, *args: object, **kwargs: object) -> GaussianDiffusion:
        """`DiffusionConfig(*args, **kwargs).build()`, e.g. ``from_config("linear", 1000)``."""
        return DiffusionConfig(*args, **kwargs).build()

    @property
    def output_channels_multiplier(self) -> int:
        """How many times the image's channels the network outputs (2 for a learned variance)."""
        return 2 if self.var_type == "learned_range" else 1

    def respaced(
        self, num_steps: int | None = None, timesteps: np.ndarray | None = None
    ) -> GaussianDiffusion:
        """A shorter chain over a subsequence of this chain's steps (Nichol & Dhariwal 2021).

        β is recomputed from ᾱ on the kept steps, so q(x_t | x_0) is unchanged at every kept step;
        the network is still called with the original indices (`timestep_map`).
        """
        if (num_steps is None) == (timesteps is None):
            raise ValueError("give exactly one of num_steps or timesteps")
        if timesteps is None:
            timesteps = evenly_spaced_timesteps(self.num_timesteps, num_steps)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        betas = betas_for_subsequence(self.alphas_cumprod.cpu().numpy(), timesteps)
        original = self.timestep_map.cpu().numpy()[timesteps]
        chain = GaussianDiffusion(
            betas,
            mean_type=self.mean_type,
            var_type=self.var_type,
            loss_type=self.loss_type,
            vlb_weight=self.vlb_weight,
            timestep_map=original,
        )
        return chain.to(self.betas.device)

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def extract(constant: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """constant[t] shaped [N, 1, 1, …] to broadcast against `like`, in `like`'s dtype."""
        out = constant.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """t ~ Uniform{0 … T-1} (Algorithm 1, line 3), drawn on the generator's device."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device
        )
        return t.to(device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The indices the network sees for chain indices `t` (differs only for respaced chains)."""
        return self.timestep_map.to(t.device)[t.long()]

    # -- forward process -------------------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) -> (mean, variance, log-variance)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self.extract(self.one_minus_alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self.extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Eq. 4 reparameterised: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Eqs. 6–7: q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) -> (mean, variance, clipped log-var)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x0
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- conversions between parameterisations ---------------------------------------------------

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert Eq. 4: x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Eq. 4 solved for ε."""
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022) ⇒ x_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The v target: √ᾱ_t ε - √(1 - ᾱ_t) x_0."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    # -- reverse process -------------------------------------------------------------------------

    def model_log_variance(
        self, t: Tensor, like: Tensor, var_output: Tensor | None = None
    ) -> Tensor:
        """log σ_t² of p_θ(x_{t-1} | x_t): fixed (Section 3.2) or interpolated (improved DDPM)."""
        if self.var_type == "fixed_small":
            return self.extract(self.posterior_log_variance_clipped, t, like).expand_as(like)
        if self.var_type == "fixed_large":
            return self.extract(self.large_log_variance, t, like).expand_as(like)
        if var_output is None:
            raise ValueError("var_type 'learned_range' needs the network's variance channels")
        # The network outputs v in [-1, 1]; log σ² = frac · log β_t + (1 - frac) · log β̃_t.
        frac = (var_output + 1.0) / 2.0
        max_log = self.extract(self.log_betas, t, like)
        min_log = self.extract(self.posterior_log_variance_clipped, t, like)
        return frac * max_log + (1.0 - frac) * min_log

    def split_model_output(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into its mean part and (learned variance only) variance part."""
        channels = x_t.shape[1]
        expected = channels * self.output_channels_multiplier
        if (
            output.shape[0] != x_t.shape[0]
            or output.shape[1] != expected
            or output.shape[2:] != x_t.shape[2:]
        ):
            raise ValueError(
                f"model output has shape {tuple(output.shape)}; "
                f"expected {(x_t.shape[0], expected, *x_t.shape[2:])}"
                f" for var_type {self.var_type!r}"
            )
        if self.var_type == "learned_range":
            return output[:, :channels], output[:, channels:]
        return output, None

    def p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I).

        With ε-prediction and no clipping, μ_θ = μ̃_t(x̂_0(ε_θ), x_t) equals Eq. 11 exactly:
        1/√α_t · (x_t - β_t/√(1 - ᾱ_t) · ε_θ). Clipping x̂_0 to [-1, 1] (the official sampler)
        is the one deviation, and only when asked.
        """
        if model_output is None:
            model_output = model(x_t, self.model_timesteps(t))
        mean_output, var_output = self.split_model_output(model_output, x_t)
        log_variance = self.model_log_variance(t, x_t, var_output)

        if self.mean_type == "eps":
            pred_x0 = self.predict_x0_from_eps(x_t, t, mean_output)
        elif self.mean_type == "x0":
            pred_x0 = mean_output
        else:
            pred_x0 = self.predict_x0_from_v(x_t, t, mean_output)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.mean_type == "eps" and not clip_denoised:
            pred_eps = mean_output
        else:
            pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "log_variance": log_variance,
            "variance": torch.exp(log_variance),
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    # -- variational bound ------------------------------------------------------------------------

    def vb_terms_bpd(
        self,
        model: Model,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One term of Eq. 5 per image, in bits per dimension.

        For t > 1 (index > 0): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)).
        For t = 1 (index 0):   L_0 = -log p_θ(x_0 | x_1) under the discretized decoder of Eq. 13.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_output=model_output
        )
        kl = mean_over_pixels(
            normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        )
        decoder_nll = -mean_over_pixels(
            discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        )
        terms = torch.where(t == 0, decoder_nll, kl) / math.log(2.0)
        return {"output": terms, "pred_x0": out["pred_x0"]}

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per image in bits/dim; no parameters."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return mean_over_pixels(kl) / math.log(2.0)

    # -- training losses ---------------------------------------------------------------------------

    def training_losses(
        self,
        model: Model,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-image losses for one draw of (t, ε) (Algorithm 1).

        * ``simple`` — Eq. 14: ‖target - network output‖² averaged over pixels, the target being ε,
          x_0 or v according to `mean_type`.
        * ``vlb``    — T · L_{t-1} in bits/dim: an unbiased one-sample estimate of Σ_t L_{t-1}
          (the true bound of Eq. 5 less the parameter-free L_T).
        * ``hybrid`` — simple + `vlb_weight` · T · L_{t-1} (Nichol & Dhariwal's λ = 0.001). With a
          learned variance the bound's gradient reaches the variance only, as they prescribe.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t))
        mean_output, var_output = self.split_model_output(output, x_t)

        terms: dict[str, Tensor] = {}
        if self.loss_type in ("simple", "hybrid"):
            target = {"eps": noise, "x0": x0, "v": None}[self.mean_type]
            if target is None:
                target = self.velocity(x0, t, noise)
            terms["mse"] = mean_over_pixels((target - mean_output) ** 2)
        if self.loss_type in ("vlb", "hybrid"):
            bound_output = output
            if self.loss_type == "hybrid" and var_output is not None:
                bound_output = torch.cat([mean_output.detach(), var_output], dim=1)
            vb = self.vb_terms_bpd(model, x0, x_t, t, model_output=bound_output)["output"]
            terms["vb"] = vb * self.num_timesteps
        if self.loss_type == "simple":
            terms["loss"] = terms["mse"]
        elif self.loss_type == "vlb":
            terms["loss"] = terms["vb"]
        else:
            terms["loss"] = terms["mse"] + self.vlb_weight * terms["vb"]
        return terms
