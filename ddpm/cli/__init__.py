"""The `ddpm` command: sample, score, train, convert and compare models in one process.

    ddpm sample  --checkpoint ema.pt --num 64 --out samples/          N PNGs + grid.png (or .npz)
    ddpm bpd     --checkpoint ema.pt --images DIR                     bits/dim ± standard error
    ddpm train   --images DIR --out runs/x                            grids, checkpoints, ema.pt
    ddpm convert --to-diffusers ema.pt --out DIR | --from-diffusers DIR --out ema.pt
    ddpm fid     DIR_A DIR_B                                          FID between two image sets

A thin layer over the library, one module per command (its flags, their defaults and `run`):
every number comes from the functions the pipeline runs (`ddpm.training.fit`,
`ddpm.sampling.draw_images`, `ddpm.likelihood`, `ddpm.metrics`), and image folders are read by
`ddpm.data.ImageFolder`, the reader `prepare_dataset` uses, so a folder is cropped, resized and
converted the same way here as in the pipeline. No Ray, MLflow or DVC.

Every failure ends the command with exit status 1 and one line on stderr, printed in one place
(`main`): the library's readers name the file, key or tensor and what is wrong with it
(`ddpm.errors.InputError`, `CheckpointError` for checkpoints whichever command reads them), and
anything else is shown as its type and message (DDPM_TRACEBACK=1 prints the traceback as well).
`main` returns the status instead of raising, so tests call `main([...])` in-process. Progress
bars are drawn only when stderr is a terminal. Heavy imports (torch, the library) happen inside
the commands, so `ddpm --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ddpm.cli import bpd, convert, fid, sample, train
from ddpm.cli.common import CommandError

# In the order `ddpm --help` lists them.
COMMANDS = (sample, bpd, train, convert, fid)
# Set to print the traceback of a failure after its one-line message.
TRACEBACK_ENV = "DDPM_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    from ddpm import __version__

    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="Denoising Diffusion Probabilistic Models (Ho et al. 2020): sample, score, "
        "train, convert and compare models from the shell.",
    )
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def error_line(err: BaseException) -> str:
    """The one line a failure is reported as: the message of an error about the input (which
    names the file, key or tensor), else the error's type and message."""
    from ddpm.errors import describe, one_line

    if isinstance(err, (CommandError, ValueError, OSError)):
        return one_line(str(err)) or describe(err)
    return describe(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 an error reported on stderr as one
    line, 130 interrupted). The only place the command prints an error."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"ddpm {args.command}: error: {error_line(err)}", file=sys.stderr, flush=True)
        if os.environ.get(TRACEBACK_ENV):
            import traceback

            traceback.print_exc()
        return 1
