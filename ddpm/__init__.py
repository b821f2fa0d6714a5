"""Denoising Diffusion Probabilistic Models (Ho et al. 2020) as a pure PyTorch library.

README.md shows the library in five lines. The names in `__all__` are its public face: each
lives in the submodule that `_PUBLIC` names, and `from ddpm import X` is the same object as
`from ddpm.<module> import X`. They load on first use (PEP 562), so `import ddpm` (and
`ddpm --help`, which reads `__version__`) does not pay for importing torch.

This package never imports ray, mlflow or dvc: the orchestration lives in `pipelines/`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Submodule -> the names it contributes to `ddpm`.
_PUBLIC: dict[str, tuple[str, ...]] = {
    "ddpm.schedules": ("SCHEDULES", "make_betas"),
    "ddpm.diffusion": ("DiffusionConfig", "GaussianDiffusion"),
    "ddpm.nn": ("UNET_CONFIGS", "ModelConfig", "UNet", "UNetConfig", "build_unet"),
    "ddpm.sampling": ("SamplerConfig", "draw_images", "sample"),
    "ddpm.likelihood": ("bits_per_dim", "mc_bits_per_dim"),
    "ddpm.training": (
        "Hook",
        "TrainConfig",
        "Trainer",
        "export_ema",
        "fit",
        "load_checkpoint",
        "load_ema_model",
        "save_checkpoint",
    ),
    "ddpm.data": ("ImageFolder", "ShardDataset", "load_split", "prepare_dataset"),
    "ddpm.convert": ("export_diffusers", "import_diffusers"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["__version__", *sorted(_HOME)]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
