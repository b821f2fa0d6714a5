"""PNG pictures the stages write beside their CSV numbers: DVC declares them as plots, so
`dvc plots show` renders them offline (its CSV plots load Vega from a CDN), and the stages log
them to MLflow."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ddpm.io_utils import atomic_write


def figure(width: float = 7.0, height: float = 4.5, ncols: int = 1) -> tuple[Any, Any]:
    """A new matplotlib figure and its axes (a tuple of `ncols` when ncols > 1), off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=100)


def save(fig: Any, path: Path) -> Path:
    """Write `fig` as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return path


def csv_line_plot(
    csv_path: Path,
    png_path: Path,
    x: str,
    y: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    log_y: bool = False,
) -> Path:
    """One line, y against x, from the columns of a CSV the stage wrote."""
    with Path(csv_path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    fig, axes = figure()
    axes.plot([float(r[x]) for r in rows], [float(r[y]) for r in rows], linewidth=1.2)
    if log_x:
        axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3, which="both")
    return save(fig, png_path)
