"""β schedules and every constant derived from them, in float64.

Timestep convention (the classic DDPM off-by-one lives here, nowhere else)
---------------------------------------------------------------------------
The paper counts t = 1 … T; this library counts the array index ``i = 0 … T-1``.
Index ``i`` *is* the paper's ``t = i + 1``:

* ``betas[i]``          = β_{i+1}
* ``alphas_cumprod[i]`` = ᾱ_{i+1} = ∏_{s ≤ i+1} α_s
* ``alphas_cumprod_prev[i]`` = ᾱ_i (with ᾱ_0 = 1, so ``alphas_cumprod_prev[0] == 1``)

Networks receive the 0-based index ``i``; the last reverse step (paper t = 1, Algorithm 2's
"z = 0 if t = 1") is index 0, and the prior x_T sits at index T-1. `paper_t` and `index_of_paper_t`
convert between the two and are the only place the +1 is written down.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "quadratic", "constant", "cosine", "sigmoid")

# Nichol & Dhariwal (2021) cap β at 0.999 to avoid the singularity at t = T of the cosine schedule.
COSINE_MAX_BETA = 0.999
COSINE_OFFSET = 0.008
# Longest chain a schedule is built for: the paper's T is 1000, improved DDPM's 4000. A crafted
# config's num_timesteps of 1e10 would otherwise ask ~75 GiB for its float64 arrays.
MAX_TIMESTEPS = 100_000


def paper_t(index: int) -> int:
    """The paper's 1-based timestep for 0-based array index `index`."""
    return index + 1


def index_of_paper_t(t: int) -> int:
    """The 0-based array index holding the paper's timestep `t` (1 … T)."""
    return t - 1


def _check_beta_range(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must lie in the open interval (0, 1); got {value!r}")


def make_betas(
    name: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Return the β_1 … β_T of schedule `name` as a float64 array of length `num_timesteps`.

    * ``linear``    — the paper: β rises linearly from `beta_start` to `beta_end` (1e-4 → 0.02).
    * ``quadratic`` — linear in √β between the same end points (the official code's "quad").
    * ``constant``  — β_t = `beta_end` for all t (the official code's "const").
    * ``cosine``    — Nichol & Dhariwal (2021): ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2) / ᾱ(0),
      β_t = min(1 - ᾱ_t/ᾱ_{t-1}, 0.999), s = 0.008. Ignores `beta_start`/`beta_end`.
    * ``sigmoid``   — β follows a logistic curve over [-6, 6] rescaled to [`beta_start`, `beta_end`]
      (as in GeoDiff, Xu et al. 2022): slow start and end, fast middle.

    `beta_start`/`beta_end` are taken as given for any T; the paper's pair was chosen for T = 1000,
    so a short chain with them leaves ᾱ_T far from 0 (check `prior_bits_per_dim` in likelihood).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1; got {num_timesteps}")
    if num_timesteps > MAX_TIMESTEPS:
        raise ValueError(
            f"num_timesteps={num_timesteps} is over this library's limit of {MAX_TIMESTEPS:,}"
        )
    if name != "cosine":
        _check_beta_range("beta_start", beta_start)
        _check_beta_range("beta_end", beta_end)
    if name in ("linear", "quadratic", "sigmoid") and beta_start > beta_end:
        raise ValueError(
            f"beta_start ({beta_start!r}) must not exceed beta_end ({beta_end!r}) for the {name} "
            "schedule: noise must grow along the chain"
        )

    T = int(num_timesteps)
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "constant":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), COSINE_MAX_BETA) for i in range(T)],
            dtype=np.float64,
        )
    else:  # sigmoid
        ramp = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        betas = ramp * (beta_end - beta_start) + beta_start
    validate_betas(betas)
    return betas


def validate_betas(betas: np.ndarray) -> np.ndarray:
    """Check that `betas` is a non-empty 1-D float array with every β in (0, 1)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array; got shape {betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"every beta must lie in (0, 1); beta at index {i} (paper t={paper_t(i)}) "
            f"is {betas[i]!r}"
        )
    return betas


def derived_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every constant the forward process, posterior and samplers need, in float64.

    Index `i` is the paper's t = i + 1 (see the module docstring).
    """
    betas = validate_betas(betas)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

    # Eq. 7: β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t; it is exactly 0 at t = 1 (index 0).
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # log(0) at t = 1 is replaced by the next value, as the official code does: the first reverse
    # step has no noise in sampling, but the decoder and the KL still need a finite log-variance.
    first_finite = posterior_variance[1] if betas.size > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first_finite, posterior_variance[1:]))
    # Fixed-large variance σ_t² = β_t, with β̃_2 at t = 1 as in the official code (a β_1 decoder
    # variance would be far too small for the 8-bit data's bin width).
    large_variance = np.append(first_finite, betas[1:])

    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        # Eq. 7: μ̃_t = coef1 · x_0 + coef2 · x_t
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * np.sqrt(alphas)
        / (1.0 - alphas_cumprod),
        "large_variance": large_variance,
        "large_log_variance": np.log(large_variance),
    }


def betas_for_subsequence(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """β of a shorter chain that visits only `timesteps` (ascending 0-based indices).

    The shorter chain keeps ᾱ at the kept steps unchanged: β'_k = 1 - ᾱ_{τ_k} / ᾱ_{τ_{k-1}}, with
    ᾱ_{τ_{-1}} = 1. This is the respacing of Nichol & Dhariwal (2021).
    """
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if timesteps.ndim != 1 or timesteps.size < 1:
        raise ValueError("timesteps must be a non-empty 1-D array of indices")
    if np.any(np.diff(timesteps) <= 0):
        raise ValueError("timesteps must be strictly increasing")
    if timesteps[0] < 0 or timesteps[-1] >= alphas_cumprod.size:
        raise ValueError(
            f"timesteps must lie in 0 … {alphas_cumprod.size - 1}; "
            f"got {timesteps[0]} … {timesteps[-1]}"
        )
    kept = alphas_cumprod[timesteps]
    previous = np.append(1.0, kept[:-1])
    return 1.0 - kept / previous


def evenly_spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` 0-based indices spread evenly over 0 … T-1, always keeping 0 and T-1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer; got {num_steps!r}")
    if not (1 <= num_steps <= num_timesteps):
        raise ValueError(
            f"num_steps must lie in 1 … {num_timesteps} (the chain's T); got {num_steps}"
        )
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    return np.unique(steps)
