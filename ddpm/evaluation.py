"""A schedule-independent score of a model on held-out images, for model selection.

L_simple is not comparable across β schedules (each weights the timesteps differently), so a search
over schedules ranks models by one of `SCORES`:

* "mc_bpd": the Monte-Carlo estimate of the variational bound (Eq. 5) in bits/dim on the images;
* "classifier_fd": the Fréchet distance between an offline classifier's features of DDIM samples
  and of the images.

Both draw from a fixed seed on every call, so every model (and every evaluation of one model) is
scored with the same t, noise and starting points: common random numbers make differences between
models less noisy than the scores themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm.diffusion import GaussianDiffusion
from ddpm.images import to_nhwc
from ddpm.validation import check_choice, raise_problems

SCORES = ("mc_bpd", "classifier_fd")
# Monte-Carlo draws of t per image for mc_bpd; DDIM steps of the samples for classifier_fd.
MC_NUM_T = 4
FD_SAMPLE_STEPS = 50


class HeldOutScore:
    """`score(diffusion, model) -> float` (lower is better) on fixed uint8 NCHW `images`."""

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
        generator = torch.Generator().manual_seed(self.seed)
        if self.metric == "mc_bpd":
            from ddpm.likelihood import mc_bits_per_dim

            out = mc_bits_per_dim(
                diffusion, model, self.images.to(self.device), num_t=MC_NUM_T, generator=generator
            )
            return float(out["mean"])
        from ddpm.metrics import accumulate_features, frechet_distance
        from ddpm.sampling import sample

        x = sample(
            diffusion,
            model,
            tuple(self.images.shape),
            method="ddim",
            num_steps=FD_SAMPLE_STEPS,
            generator=generator,
            device=self.device,
        )
        stats, _ = accumulate_features(self.classifier, [to_nhwc(x)])
        ref = self.reference
        return float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov))
