"""8-bit images: conversions to and from the model's range, grids, PNG files, in one place.

Inside the library images are float tensors in [-1, 1] (x / 127.5 - 1, the paper's scaling),
NCHW; on disk and in pictures they are uint8 NHWC arrays. The likelihood of Eq. 13 is defined
only on the 256-level grid.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion

# A float image counts as 8-bit data if every value is this close to one of the 256 levels.
GRID_TOLERANCE = 1e-4


def to_model_range(images: Tensor) -> Tensor:
    """uint8 {0 … 255} -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in 0 … 255; got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8, rounding to the nearest level (values outside are clipped)."""
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1]; got dtype {images.dtype}")
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def to_nhwc(images: Tensor) -> np.ndarray:
    """NCHW images -> an NHWC numpy array on the CPU (the on-disk layout); floats in [-1, 1] are
    rounded to uint8 first."""
    if images.is_floating_point():
        images = to_uint8(images.detach().float().cpu())
    return images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC picture with `ncol` columns and `pad` pixels of white space."""
    n, h, w, c = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[k]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 HWC picture (1 or 3 channels) as PNG bytes; fixed options, so equal pixels give
    equal bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
        buffer, format="PNG", compress_level=6
    )
    return buffer.getvalue()


def noising_frames(
    diffusion: GaussianDiffusion, images: Tensor, frames: int, generator: torch.Generator
) -> tuple[list[int], list[np.ndarray]]:
    """The forward process q(x_t | x_0) (Eq. 4) on a few images: the paper's t of each column
    (0 for the clean image, then `frames - 1` evenly spaced steps up to T) and the columns as
    uint8 NHWC arrays, one noise draw per image shared by all columns."""
    x0 = to_model_range(images)
    noise = torch.randn(x0.shape, generator=generator)
    indices = np.linspace(0, diffusion.num_timesteps - 1, frames).round().astype(int)[1:]
    columns = [to_nhwc(x0)]
    for i in indices:
        t = torch.full((len(x0),), int(i), dtype=torch.long)
        columns.append(to_nhwc(diffusion.q_sample(x0, t, noise).float()))
    # Index i is the paper's t = i + 1 (the library counts timesteps from 0).
    return [0, *(int(i) + 1 for i in indices)], columns


def as_discrete_data(images: Tensor) -> Tensor:
    """Images for a likelihood: uint8 data, or floats already on the 8-bit grid in [-1, 1].

    Anything else (continuous values, or floats in [0, 1] or [0, 255]) has no discrete likelihood,
    so it is rejected rather than scored with a meaningless number.
    """
    if images.dtype == torch.uint8:
        return to_model_range(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point; got dtype {images.dtype}")
    levels = (images.double() + 1.0) * 127.5
    if levels.numel() and (
        levels.min() < -GRID_TOLERANCE
        or levels.max() > 255 + GRID_TOLERANCE
        or (levels - levels.round()).abs().max() > GRID_TOLERANCE
    ):
        raise ValueError(
            "images must be 8-bit data: uint8 in 0 … 255, or floats x/127.5 - 1 on that grid in "
            f"[-1, 1]; got values in [{float(images.min()):.4g}, {float(images.max()):.4g}] "
            "that are not all on the grid"
        )
    return images
