"""A small CNN domain classifier for offline sample-quality metrics on labelled data.

Where the FID Inception weights are unavailable (no internet), a classifier trained on the
prepared training split stands in: its penultimate features give a Fréchet distance
("classifier_fd", never to be confused with FID), its softmax an Inception-style score
("classifier_score", between 1 and num_classes) and its predictions a class histogram (mode
coverage). Numbers are comparable only between runs that use the same classifier checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.io_utils import atomic_write
from ddpm.metrics.features import file_sha256, iterate_batches, prepare_images

__all__ = [
    "SmallClassifier",
    "evaluate_accuracy",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

_CHECKPOINT_FORMAT = "ddpm-small-classifier-v1"


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallClassifier(nn.Module):
    """Three conv stages (width, 2·width, 4·width channels; two 2× poolings) → 4×4 pooled grid →
    `feature_dim` penultimate features → class logits. Input: float NCHW in [-1, 1]."""

    name = "small-classifier"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or image_size < 4 or width < 1 or feature_dim < 1:
            raise ValueError(
                "SmallClassifier needs in_channels >= 1, num_classes >= 2, image_size >= 4, "
                f"width >= 1, feature_dim >= 1; got {in_channels}, {num_classes}, {image_size}, "
                f"{width}, {feature_dim}"
            )
        self.config = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "width": int(width),
            "feature_dim": int(feature_dim),
            "dropout": float(dropout),
        }
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.body = nn.Sequential(
            _conv_block(in_channels, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            # A fixed 4x4 grid keeps coarse layout (digits need it) while making the head's size
            # independent of the image size.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * width * 16, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.checkpoint_sha256: str | None = None

    @property
    def extractor_id(self) -> str:
        if self.checkpoint_sha256 is None:
            raise ValueError("classifier has no saved checkpoint; save and load it to identify it")
        return f"{self.name}:{self.checkpoint_sha256}"

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"classifier expects images [N, {c}, {s}, {s}], got {tuple(x.shape)}")

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        features = self.embed(self.body(x))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def _random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (edge pixels repeated): cheap augmentation
    that buys a few points of test accuracy when the training set has only thousands of images."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate_accuracy(
    model: SmallClassifier, images, labels, *, batch_size: int = 256, device=None
) -> float:
    """Top-1 accuracy on images (uint8 NHWC or float NCHW in [-1, 1]) and integer labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"need as many labels as images (> 0): {len(labels)} vs {len(images)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start, batch in zip(
        range(0, len(labels), batch_size), iterate_batches(images, batch_size), strict=True
    ):
        logits = model(prepare_images(batch).to(device))
        truth = labels[start : start + batch_size].to(device)
        correct += int((logits.argmax(1) == truth).sum())
    model.train(was_training)
    return correct / len(labels)


def train_classifier(
    images,
    labels,
    *,
    num_classes: int | None = None,
    test_images=None,
    test_labels=None,
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    **model_kwargs,
) -> tuple[SmallClassifier, dict]:
    """Train a SmallClassifier (Adam, cosine-decayed learning rate, random shifts).

    images: uint8 [N, H, W(, C)] or float NCHW in [-1, 1]; labels: ints in [0, num_classes).
    Deterministic for a given seed on a given machine; the global torch RNG is restored after.
    Returns (model in eval mode, report) where report holds "train_loss" (mean over the last
    epoch), "epochs", "num_train" and, when a test set is given, "test_accuracy", its standard
    error "test_accuracy_stderr" and "num_test".
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels_t) != len(images) or len(labels_t) < 2:
        raise ValueError(f"need as many labels as images (>= 2): {len(labels_t)} vs {len(images)}")
    num_classes = int(labels_t.max()) + 1 if num_classes is None else int(num_classes)
    if int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels_t.min())}, "
            f"{int(labels_t.max())}]"
        )
    if epochs < 1 or batch_size < 1 or max_shift < 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, max_shift >= 0: {epochs}, "
            f"{batch_size}, {max_shift}"
        )
    probe = prepare_images(images[:1])
    device = torch.device(device) if device is not None else torch.device("cpu")
    steps_per_epoch = math.ceil(len(labels_t) / batch_size)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        model = SmallClassifier(probe.shape[1], num_classes, probe.shape[-1], **model_kwargs).to(
            device
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
        order = torch.Generator().manual_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step")
        model.train()
        for _ in range(epochs):
            permutation = torch.randperm(len(labels_t), generator=order)
            epoch_loss = 0.0
            for start in range(0, len(labels_t), batch_size):
                index = permutation[start : start + batch_size]
                x = prepare_images(images[index.numpy()]).to(device)
                if max_shift:
                    x = _random_shift(x, max_shift)
                loss = F.cross_entropy(model(x), labels_t[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                epoch_loss += loss.item() * len(index)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
    model.eval()
    report = {
        "train_loss": epoch_loss / len(labels_t),
        "epochs": epochs,
        "num_train": len(labels_t),
    }
    if test_images is not None:
        accuracy = evaluate_accuracy(model, test_images, test_labels)
        report["test_accuracy"] = accuracy
        # Binomial: each test image is a right-or-wrong draw at the classifier's true accuracy.
        report["test_accuracy_stderr"] = math.sqrt(accuracy * (1 - accuracy) / len(test_images))
        report["num_test"] = len(test_images)
    return model, report


def save_classifier(model: SmallClassifier, path: str | os.PathLike, metadata=None) -> str:
    """Write weights, config and JSON-like metadata atomically; returns the file's sha256."""
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    model.checkpoint_sha256 = file_sha256(path)
    return model.checkpoint_sha256


def load_classifier(path: str | os.PathLike, map_location="cpu") -> SmallClassifier:
    """Rebuild a SmallClassifier from `save_classifier`'s file, in eval mode; metadata in
    `model.metadata`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable classifier checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {_CHECKPOINT_FORMAT} checkpoint")
    missing = [k for k in ("config", "state_dict", "metadata") if k not in payload]
    if missing:
        raise ValueError(
            f"{path}: classifier checkpoint is missing {missing}; save_classifier writes "
            "'config', 'state_dict' and 'metadata'"
        )
    config = payload["config"]
    try:
        model = SmallClassifier(**config)
    except TypeError as err:  # unknown or missing constructor arguments
        raise ValueError(f"{path}: bad classifier 'config' {config!r} ({err})") from err
    model.load_state_dict(payload["state_dict"])
    model.metadata = payload["metadata"]
    model.checkpoint_sha256 = file_sha256(path)
    return model.eval()
