"""PNG pictures the stages write beside their CSV numbers: DVC declares them as plots, so
`dvc plots show` renders them offline (its CSV plots load Vega from a CDN), and the stages log
them to MLflow."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.io_utils import atomic_write


def figure(
    width: float = 7.0, height: float = 4.5, ncols: int = 1, nrows: int = 1, squeeze: bool = True
) -> tuple[Any, Any]:
    """A new matplotlib figure and its axes, off-screen: one Axes, or an array of them (always
    rows x columns when squeeze is false)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), dpi=100, squeeze=squeeze)


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


def _show(axes: Any, image: np.ndarray) -> None:
    """One uint8 HWC picture in `axes`, pixels as they are (grey for one channel), no frame."""
    if image.shape[2] == 1:
        axes.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axes.imshow(image, interpolation="nearest")
    axes.set_axis_off()


def timestep_strip(
    timesteps: list[int], columns: list[np.ndarray], png_path: Path, *, title: str
) -> Path:
    """Images through the diffusion as a table: a row per image, a column per timestep
    (uint8 NHWC arrays, one per column), each column headed with its paper t."""
    if len(timesteps) != len(columns):
        raise ValueError(f"{len(timesteps)} timesteps for {len(columns)} columns")
    rows = len(columns[0])
    fig, axes = figure(
        width=0.85 * len(columns) + 0.4,
        height=0.85 * rows + 0.7,
        ncols=len(columns),
        nrows=rows,
        squeeze=False,
    )
    for col, (t, images) in enumerate(zip(timesteps, columns, strict=True)):
        axes[0, col].set_title(f"t={t}", fontsize=8)
        for row in range(rows):
            _show(axes[row, col], images[row])
    fig.suptitle(title, fontsize=9)
    return save(fig, png_path)


def image_grid_png(grid: np.ndarray, png_path: Path, *, title: str) -> Path:
    """A uint8 HWC grid of samples, enlarged with a title, for the README and `dvc plots`."""
    height, width = grid.shape[:2]
    fig, axes = figure(width=5.0 * width / max(height, width) + 0.2, height=5.0 + 0.5)
    _show(axes, grid)
    axes.set_title(title, fontsize=9)
    return save(fig, png_path)
