"""`ddpm bpd`: the variational bound (Eq. 5) in bits/dim on a set of images, mean ± stderr."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ddpm.cli.common import CommandError, Counted, add_device, device, positive_int, progress
from ddpm.cli.images import image_batches

BATCH_SIZE = 64
SEED = 0
SPLIT = "test"


def add_parser(commands) -> None:
    p = commands.add_parser(
        "bpd",
        help="negative log-likelihood bound in bits/dim",
        description="The variational bound (Eq. 5) in bits/dim on a set of images: a Monte-Carlo "
        "estimate by default, all T terms with --exact. Prints mean ± standard error over images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="a folder of image files (center-cropped and resized to the model's size and "
        "channels), or a prepared split folder (a dataset root: its --split)",
    )
    p.add_argument("--exact", action="store_true", help="all T terms (T network calls a batch)")
    p.add_argument("--num", type=positive_int, metavar="N", help="score only N images")
    p.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, metavar="B", help="(%(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=SEED, help="seed of the t and noise draws (%(default)s)"
    )
    p.add_argument("--split", default=SPLIT, help="split of a prepared dataset root (%(default)s)")
    add_device(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ddpm.evaluation import mean_and_stderr
    from ddpm.likelihood import bits_per_dim, mc_bits_per_dim, mc_plan
    from ddpm.training import load_ema_model

    where = device(args.device)
    model, diffusion, _ = load_ema_model(args.checkpoint, where)
    total, batches, described = image_batches(
        Path(args.images),
        flag="--images",
        split=args.split,
        batch_size=args.batch_size,
        limit=args.num,
        shape=model.config.image_shape,
    )
    if total == 0:
        raise CommandError(f"--images: {args.images} holds no images")
    calls = diffusion.num_timesteps if args.exact else mc_plan(diffusion.num_timesteps).num_calls
    # One generator consumed batch after batch: the same seed, images and batch size give the
    # same draws of t and noise for every model (common random numbers).
    generator = torch.Generator().manual_seed(args.seed)
    per_image = []
    kind = "the full bound (all T terms)" if args.exact else "Monte-Carlo estimate of the bound"
    total_calls = math.ceil(total / args.batch_size) * calls
    with tqdm(total=total_calls, desc="bits/dim", unit="call", disable=not progress()) as bar:
        counted = Counted(model, bar)
        for batch in batches:
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(where)
            if args.exact:
                values = bits_per_dim(diffusion, counted, x, generator=generator)["total"]
            else:
                values = mc_bits_per_dim(diffusion, counted, x, generator=generator)["bpd"]
            per_image.append(values.double().cpu())
    mean, stderr = mean_and_stderr(torch.cat(per_image))
    print(f"bits/dim: {mean:.4f} ± {stderr:.4f} ({kind}; {described})")
    return 0
