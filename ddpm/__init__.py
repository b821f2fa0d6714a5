"""Denoising Diffusion Probabilistic Models (Ho et al. 2020) as a pure PyTorch library.

This package never imports ray, mlflow or dvc: the orchestration lives in `pipelines/`.
"""

__version__ = "0.1.0"
