"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), mean and std over splits.

Per split, E_x KL(p(y|x) ‖ p̄) = E_x Σ_y p log p − Σ_y p̄ log p̄ with p̄ = E_x p(y|x), because
E_x Σ_y p log p̄ = Σ_y p̄ log p̄. So a split needs only the running sum of p (one vector) and the
running sum of Σ_y p log p (one number): the streaming accumulator keeps memory independent of the
number of samples and gives exactly the value of the all-in-memory formula.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ScoreAccumulator", "inception_score"]


def _log_probs(values: torch.Tensor | np.ndarray, from_logits: bool) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        x = values.detach().to("cpu", torch.float64)
    else:
        x = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(
            f"expected logits or probabilities [N, classes >= 2], got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("logits/probabilities contain NaN or infinity")
    if from_logits:
        return torch.log_softmax(x, dim=1).numpy()
    if (x < 0).any() or not torch.allclose(x.sum(1), torch.ones(x.shape[0], dtype=x.dtype)):
        raise ValueError("probabilities must be non-negative rows summing to 1")
    with np.errstate(divide="ignore"):
        return np.log(x.numpy())


class ScoreAccumulator:
    """Streaming Inception-style score and argmax class histogram over batches of logits.

    While streaming the total is unknown, so rows go to the `splits` splits round-robin (row i to
    split i mod splits) rather than in contiguous chunks; for exchangeable samples both partitions
    have the same distribution, and on the same rows the value equals `inception_score` applied to
    the rows regrouped by split.
    """

    def __init__(self, num_classes: int, splits: int = 10):
        if splits < 1 or num_classes < 2:
            raise ValueError(f"need splits >= 1 and num_classes >= 2, got {splits}, {num_classes}")
        self.num_classes, self.splits = num_classes, splits
        self.count = 0
        self._prob_sum = np.zeros((splits, num_classes))
        self._neg_entropy_sum = np.zeros(splits)
        self._split_count = np.zeros(splits, dtype=np.int64)
        self.histogram = np.zeros(num_classes, dtype=np.int64)

    def update(self, values: torch.Tensor | np.ndarray, from_logits: bool = True):
        """Add a batch of logits (or probabilities with from_logits=False) [N, classes]."""
        return self._add(_log_probs(values, from_logits))

    def _add(self, log_p: np.ndarray) -> ScoreAccumulator:
        if log_p.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {log_p.shape[1]}")
        p = np.exp(log_p)
        # p log p with p = 0 is 0 (log p = -inf only for given zero probabilities).
        neg_entropy = (p * np.where(p > 0, log_p, 0.0)).sum(axis=1)
        split = (self.count + np.arange(len(p))) % self.splits
        np.add.at(self._prob_sum, split, p)
        np.add.at(self._neg_entropy_sum, split, neg_entropy)
        np.add.at(self._split_count, split, 1)
        self.histogram += np.bincount(p.argmax(axis=1), minlength=self.num_classes)
        self.count += len(p)
        return self

    def split_scores(self) -> np.ndarray:
        if (self._split_count == 0).any():
            raise ValueError(f"need at least {self.splits} samples for {self.splits} splits")
        n = self._split_count.astype(np.float64)
        marginal = self._prob_sum / n[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            marginal_term = np.where(marginal > 0, marginal * np.log(marginal), 0.0).sum(axis=1)
        return np.exp(self._neg_entropy_sum / n - marginal_term)

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits; std is numpy's population std, as in the original IS code."""
        scores = self.split_scores()
        return float(scores.mean()), float(scores.std())


def inception_score(
    values: torch.Tensor | np.ndarray, splits: int = 10, from_logits: bool = True
) -> tuple[float, float]:
    """IS of all rows at once, split into `splits` contiguous chunks as in the original code."""
    log_p = _log_probs(values, from_logits)
    if len(log_p) < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, got {len(log_p)}")
    scores = []
    for chunk in np.array_split(log_p, splits):
        scores.append(ScoreAccumulator(chunk.shape[1], splits=1)._add(chunk).split_scores()[0])
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())
