"""A schedule-independent score of a model on held-out images, for model selection.

L_simple is not comparable across β schedules (each weights the timesteps differently), so a search
over schedules ranks models by one of `SCORES`:

* "mc_bpd": the Monte-Carlo estimate of the variational bound (Eq. 5) in bits/dim on the images,
  with x̂_0 clipped to [-1, 1] as the reference codes report it (`ddpm.likelihood.mc_bits_per_dim`);
* "classifier_fd": the Fréchet distance between an offline classifier's features of DDIM samples
  and of the images.

Both draw from a fixed seed on every call, so every model (and every evaluation of one model) is
scored on the same images with the same t, noise and starting points, whatever the model: common
random numbers. The difference between two models' per-image bounds then carries no noise from
the draws that both share, and `paired_difference` gives its standard error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion import GaussianDiffusion
from ddpm.images import to_nhwc
from ddpm.likelihood import MC_NUM_T as MC_NUM_T  # defined beside the estimator; re-exported
from ddpm.likelihood import mc_bits_per_dim
from ddpm.validation import check_choice, raise_problems

SCORES = ("mc_bpd", "classifier_fd")
# DDIM steps of the samples for classifier_fd.
FD_SAMPLE_STEPS = 50
# mc_bpd scores the images in batches of this many, a constant so that the draws (one generator
# consumed batch after batch) never depend on anything but the seed and the images.
MC_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Score:
    """A held-out score: its ``value``, the ``stderr`` of that value over the images (for
    classifier_fd, a statistic of the whole set, its bootstrap standard error over the samples),
    and the ``per_image`` values it averages (mc_bpd only)."""

    value: float
    stderr: float
    per_image: Tensor | None = None


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """The mean of per-image values and its standard error (sample std / √N; NaN for N < 2)."""
    values = values.double().flatten()
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), stderr


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean and standard error of a - b over images scored with the same draws.

    Pairing removes what the two estimates share (the image, its x_t draws), so the error of the
    difference can be far smaller than either score's own error.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired_difference needs two per-image vectors of one length; got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    return mean_and_stderr(a.double().cpu() - b.double().cpu())


class HeldOutScore:
    """`score(diffusion, model) -> float` (lower is better) on fixed uint8 NCHW `images`.

    `evaluate` returns the value with its standard error (`Score`); `per_image` the mc_bpd values
    that it averages, for `paired_difference` between two models.
    """

    def __init__(
        self,
        metric: str,
        images: Tensor,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        classifier: nn.Module | None = None,
    ) -> None:
        raise_problems("HeldOutScore", check_choice("metric", metric, SCORES))
        if metric == "classifier_fd" and classifier is None:
            raise ValueError("metric 'classifier_fd' needs the offline classifier")
        self.metric, self.images, self.seed = metric, images, seed
        self.device = torch.device(device)
        if classifier is not None and metric == "classifier_fd":
            from ddpm.metrics import accumulate_features

            self.classifier = classifier.to(self.device)
            self.reference, _ = accumulate_features(self.classifier, [to_nhwc(images)])

    def __call__(self, diffusion: GaussianDiffusion, model: nn.Module) -> float:
        return self.evaluate(diffusion, model).value

    def per_image(self, diffusion: GaussianDiffusion, model: nn.Module) -> Tensor:
        """mc_bpd only: each image's Monte-Carlo bound [N] (float64, CPU), from the seed's draws."""
        if self.metric != "mc_bpd":
            raise ValueError(
                f"per-image values exist for metric 'mc_bpd' only, not {self.metric!r}"
            )
        # A fresh generator per call: every model, and every call, sees the same (t, ε).
        generator = torch.Generator().manual_seed(self.seed)
        values = [
            mc_bits_per_dim(diffusion, model, batch.to(self.device), generator=generator)["bpd"]
            for batch in self.images.split(MC_BATCH)
        ]
        return torch.cat(values).double().cpu()

    def evaluate(self, diffusion: GaussianDiffusion, model: nn.Module) -> Score:
        if self.metric == "mc_bpd":
            values = self.per_image(diffusion, model)
            return Score(*mean_and_stderr(values), per_image=values)
        from ddpm.metrics import accumulate_features, frechet_distance, frechet_distance_stderr
        from ddpm.sampling import sample

        x = sample(
            diffusion,
            model,
            tuple(self.images.shape),
            method="ddim",
            num_steps=FD_SAMPLE_STEPS,
            generator=torch.Generator().manual_seed(self.seed),
            device=self.device,
        )
        features: list[np.ndarray] = []
        stats, _ = accumulate_features(self.classifier, [to_nhwc(x)], collect=features)
        ref = self.reference
        fd = float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov))
        return Score(fd, frechet_distance_stderr(np.concatenate(features), ref.mean, ref.cov))
