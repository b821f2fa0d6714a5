"""`ddpm convert`: to or from a diffusers folder (UNet2DModel + DDPMScheduler)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.cli.common import CommandError, progress


def add_parser(commands) -> None:
    p = commands.add_parser(
        "convert",
        help="to or from diffusers' UNet2DModel",
        description="Convert between this project's checkpoints and a diffusers folder "
        "(UNet2DModel + DDPMScheduler, the layout of google/ddpm-cifar10-32).",
    )
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--to-diffusers", metavar="FILE", help="ema.pt or checkpoint.pt to export")
    side.add_argument("--from-diffusers", metavar="DIR", help="diffusers folder to import")
    p.add_argument("--out", required=True, help="DIR for --to-diffusers, FILE for --from-diffusers")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ddpm.convert import (
        SCHEDULER_CONFIG,
        UNET_CONFIG,
        UNET_WEIGHTS,
        export_diffusers,
        import_diffusers,
    )

    if args.to_diffusers:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out} is a file; the diffusers format is a folder")
        export_diffusers(args.to_diffusers, out, progress=progress())
        print(f"wrote {out}: {UNET_CONFIG}, {UNET_WEIGHTS}, {SCHEDULER_CONFIG}")
        return 0
    src = Path(args.from_diffusers)
    if not src.is_dir():
        raise CommandError(f"--from-diffusers: folder not found: {src}")
    path = import_diffusers(src, args.out, progress=progress())
    print(f"wrote {path} (EMA export; ddpm sample --checkpoint {path} ...)")
    return 0
