"""The speed switches' "auto": one rule for training and sampling.

`precision` (auto | fp32 | bf16) says whether the network runs under bf16 autocast; a switch
such as channels_last or torch.compile is true, false or None (auto). Auto picks the fast
choice for the device: bf16 and the switches on a CUDA device (bf16 where the GPU has it), fp32
and none of them elsewhere, since on a CPU bf16 and channels_last run slower and compile costs
minutes per process (benchmarks/device_check.py measures each).
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def on_for_cuda(value: bool | None, device: torch.device | str) -> bool:
    """A speed switch's None (auto): on for a CUDA device, off elsewhere."""
    return torch.device(device).type == "cuda" if value is None else value


def resolve_precision(
    precision: str,
    device: torch.device | str,
    key: str = "precision",
    *,
    bf16_supported: bool | None = None,
) -> bool:
    """Whether `precision` (auto | fp32 | bf16, the setting named `key`) means bf16 autocast on
    `device`: auto is bf16 on a CUDA device that has bf16, fp32 elsewhere (a CPU has no fast
    bf16 kernels: 15x slower in benchmarks/device_check.py); bf16 on a CUDA device without it
    is a ValueError naming `key`.

    `bf16_supported` says whether the CUDA device has bf16 when this process cannot ask it (a
    driver planning work for another node's GPU passes True, and the node checks its own GPU
    by resolving the outcome, "bf16" or "fp32", again); None asks torch here.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if bf16_supported is None:
        bf16_supported = cuda and torch.cuda.is_bf16_supported()
    bf16_here = not cuda or bf16_supported
    if precision == "bf16" and not bf16_here:
        raise ValueError(
            f"{key} 'bf16' asked for, but CUDA device {device} has no bf16 support; use 'fp32' "
            "or 'auto'"
        )
    return precision == "bf16" or (precision == "auto" and cuda and bf16_here)
