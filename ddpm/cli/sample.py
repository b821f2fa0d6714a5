"""`ddpm sample`: draw images from a checkpoint into PNGs + grid.png, or one .npz array."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ddpm.cli.common import (
    SAMPLE_GRID,
    CommandError,
    Counted,
    add_device,
    device,
    grid,
    positive_int,
    progress,
    write_png,
)

# The defaults of SamplerConfig (ddpm.sampling), repeated so that parsing needs no torch import;
# tests/test_cli.py holds them equal.
SAMPLER = "ancestral"
ETA = 0.0
SEED = 0
BATCH_SIZE = 64
# SamplerConfig's field -> the flag that sets it, for its error messages.
_FLAGS = {"method": "--sampler", "num_steps": "--steps", "eta": "--eta"}


def add_parser(commands) -> None:
    p = commands.add_parser(
        "sample",
        help="draw images from a checkpoint",
        description="Draw images from a checkpoint (EMA export or full checkpoint). Image shape, "
        "channels and schedule come from the checkpoint; the same seed and batch size give the "
        "same images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="ema.pt or checkpoint.pt")
    p.add_argument("--num", type=positive_int, required=True, metavar="N", help="images to draw")
    p.add_argument(
        "--sampler", choices=("ancestral", "ddim"), default=SAMPLER, help="(%(default)s)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        metavar="K",
        help="evenly spaced steps of the chain (default: all T)",
    )
    p.add_argument(
        "--eta", type=float, default=ETA, help="DDIM noise: 0 deterministic, 1 DDPM (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=SEED, help="(%(default)s)")
    p.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, metavar="B", help="(%(default)s)"
    )
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR|FILE.npz",
        help="a folder for N PNGs + grid.png, or a .npz file for one uint8 NHWC array 'images'",
    )
    add_device(p)
    p.set_defaults(run=run)


def _sampler_config(args: argparse.Namespace, num_timesteps: int):
    from ddpm.sampling import SamplerConfig
    from ddpm.validation import ConfigError

    try:
        config = SamplerConfig(args.sampler, args.steps, args.eta, not args.no_clip)
    except ConfigError as err:
        raise CommandError(
            "; ".join(f"{_FLAGS.get(name, name)}: {message}" for name, message in err.problems)
        ) from None
    if args.steps is not None and args.steps > num_timesteps:
        raise CommandError(
            f"--steps {args.steps}: the model's chain has only {num_timesteps} steps"
        )
    return config


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ddpm.sampling import draw_images
    from ddpm.training import load_ema_model

    where = device(args.device)
    model, diffusion, meta = load_ema_model(args.checkpoint, where)
    config = _sampler_config(args, diffusion.num_timesteps)
    steps = args.steps or diffusion.num_timesteps
    batches = math.ceil(args.num / args.batch_size)
    # The noise comes from one CPU generator, so a seed gives the same images on any device.
    generator = torch.Generator().manual_seed(args.seed)
    desc = f"sampling ({args.sampler})"
    with tqdm(total=batches * steps, desc=desc, unit="step", disable=not progress()) as bar:
        images = draw_images(
            diffusion,
            Counted(model, bar),
            args.num,
            model.config.image_shape,
            config,
            batch_size=args.batch_size,
            generator=generator,
            device=where,
        )
    out = Path(args.out)
    if out.suffix == ".npz":
        _write_npz(out, images)
        return 0
    _write_folder(out, images)
    print(
        f"wrote {len(images)} PNGs and grid.png to {out} (model step {meta['step']}, "
        f"{args.sampler}, {steps} steps, seed {args.seed})"
    )
    return 0


def _write_npz(out: Path, images) -> None:
    import numpy as np

    from ddpm.io_utils import atomic_write

    with atomic_write(out, "wb") as handle:
        np.savez(handle, images=images)
    print(f"wrote {len(images)} images {tuple(images.shape[1:])} (uint8 NHWC) to {out}")


def _write_folder(out: Path, images) -> None:
    from tqdm.auto import tqdm

    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder, or a path ending in .npz")
    out.mkdir(parents=True, exist_ok=True)
    indices = range(len(images))
    for index in tqdm(
        indices, desc="writing PNGs", unit="img", leave=False, disable=not progress()
    ):
        write_png(out / f"{index:06d}.png", images[index])
    write_png(out / SAMPLE_GRID, grid(images))
