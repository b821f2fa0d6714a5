"""Conversions between 8-bit images and the model's range, in one place.

Inside the library images are float tensors in [-1, 1] (x / 127.5 - 1, the paper's scaling);
on disk they are uint8. The likelihood of Eq. 13 is defined only on the 256-level grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
