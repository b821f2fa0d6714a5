"""`ddpm fid`: Fréchet Inception Distance between two folders of images or prepared splits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.cli.common import CommandError, add_device, device, positive_int, progress
from ddpm.cli.images import image_batches

# pytorch-fid's batch size.
BATCH_SIZE = 50
SPLIT = "train"


def add_parser(commands) -> None:
    p = commands.add_parser(
        "fid",
        help="FID between two image sets",
        description="Fréchet Inception Distance between two folders of images or prepared "
        "splits, with pytorch-fid's Inception weights (never downloaded: the torch hub cache, "
        "or --weights).",
    )
    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    p.add_argument("--weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, metavar="B", help="(%(default)s)"
    )
    p.add_argument("--num", type=positive_int, metavar="N", help="use the first N of each set")
    p.add_argument(
        "--image-size",
        type=positive_int,
        help="side image files are cropped/resized to (default: the first file's shorter side)",
    )
    p.add_argument("--split", default=SPLIT, help="split of a prepared dataset root (%(default)s)")
    add_device(p)
    p.set_defaults(run=run)


def load_fid_inception(weights, device):
    """The FID network (a seam: tests put a random-weight network here)."""
    from ddpm.metrics import load_fid_inception as load

    return load(weights, device=device)


def _features(args: argparse.Namespace, network, where, flag: str, folder: str):
    """The Inception feature statistics of one image set."""
    from ddpm.metrics import accumulate_features

    total, batches, described = image_batches(
        Path(folder),
        flag=flag,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.num,
        shape=None,
        image_size=args.image_size,
    )
    if total < 2:
        raise CommandError(f"{flag}: {folder} holds {total} image(s); FID needs at least 2")
    print(f"{flag}: {described}", file=sys.stderr)
    features, _ = accumulate_features(
        network, batches, device=where, progress=progress(), desc=f"Inception features {flag}"
    )
    return features


def run(args: argparse.Namespace) -> int:
    from ddpm.errors import reading
    from ddpm.metrics import frechet_distance, resolve_fid_weights

    where = device(args.device)
    # Find the weights before reading any image: a missing file is the likely mistake here.
    try:
        weights = resolve_fid_weights(args.weights)
    except FileNotFoundError as err:
        raise CommandError(f"{err} Here: --weights FILE.") from None
    with reading(weights, "FID Inception weights file"):
        network = load_fid_inception(weights, device=where)
    a = _features(args, network, where, "DIR_A", args.dir_a)
    b = _features(args, network, where, "DIR_B", args.dir_b)
    fid = frechet_distance(a.mean, a.cov, b.mean, b.cov)
    print(f"FID: {fid:.4f} ({a.count} vs {b.count} images; {network.extractor_id})")
    return 0
