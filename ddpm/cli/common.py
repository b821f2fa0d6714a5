"""What several `ddpm` commands share: the error type, the device flag, image and grid output.

Nothing here imports torch or the library at import time, so building the parser stays instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# The picture `ddpm sample` writes beside the samples. Commands that read a folder of images
# leave a top-level file of this name out, so that a sample folder can be scored as it is.
SAMPLE_GRID = "grid.png"
# Images written into a grid at most (the first ones): a picture, not an archive.
GRID_MAX = 64


class CommandError(Exception):
    """A mistake in the command's input, reported as one line without a traceback."""


def progress() -> bool:
    """Whether to draw progress bars: only on a terminal, so that a log or a captured stderr
    holds messages, not bars."""
    return sys.stderr.isatty()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs (auto: cuda when available, else cpu)",
    )


def device(name: str):
    """The torch device `--device` names; auto is cuda when available."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def check_folder(path: Path, flag: str) -> None:
    if not path.exists():
        raise CommandError(f"{flag}: folder not found: {path}")
    if not path.is_dir():
        raise CommandError(f"{flag}: {path} is a file; expected a folder of images or shards")


class Counted:
    """The network, advancing a progress bar on every call: samplers and bounds call it once a
    step, so one bar shows the whole command's progress across batches."""

    def __init__(self, model, bar) -> None:
        self.model, self.bar = model, bar

    def __call__(self, x, t):
        out = self.model(x, t)
        self.bar.update(1)
        return out


def write_png(path: Path, image) -> None:
    from ddpm.images import png_bytes
    from ddpm.io_utils import atomic_write

    with atomic_write(path, "wb") as handle:
        handle.write(png_bytes(image))


def grid(images):
    """The first GRID_MAX images as one square-ish picture."""
    from ddpm.images import image_grid

    shown = images[:GRID_MAX]
    return image_grid(shown, ncol=math.ceil(math.sqrt(len(shown))))
