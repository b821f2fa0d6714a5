"""The FID Inception-v3 network (pool3 features and 1008-way logits), built without downloading.

FID numbers are only comparable when computed with the network of the original TensorFlow FID code:
Inception-v3 from `inception-2015-12-05.tgz`, as ported to PyTorch by pytorch-fid. Its structure
differs from torchvision's Inception-v3 in the pool branch of the mixed blocks (TensorFlow's average
pool ignores padding; the last block uses max pooling) and it has 1008 output classes. We build
torchvision's skeleton with `weights=None`, swap in those blocks and load the ported checkpoint from
a local file, never from the network: pytorch-fid's own builder calls `load_state_dict_from_url`
unconditionally, which is why it is not used here.

The checkpoint holds the fc layer (2048 → 1008), so the same network gives the logits for the
Inception Score, as in the original IS code (softmax over all 1008 outputs of that graph).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from ddpm.metrics.features import file_sha256

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "default_fid_weights_path",
    "load_fid_inception",
    "resolve_fid_weights",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
# Torch hub names checkpoints `<name>-<first 8 hex digits of the file's sha256>.<ext>`.
_FID_WEIGHTS_SHA256_PREFIX = "6726825d"


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME-padded average pool divides by the number of real pixels in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDMixedA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]


class _FIDMixedC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        return [self.branch1x1(x), seven, double, self.branch_pool(_tf_avg_pool(x))]


class _FIDMixedE(InceptionE):
    def __init__(self, in_channels: int, pool):
        super().__init__(in_channels)
        self._pool = pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1),
            torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1),
            self.branch_pool(self._pool(x)),
        ]


def default_fid_weights_path() -> Path:
    """Where torch hub (and so pytorch-fid on an online machine) caches the FID checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def resolve_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint file to load: `path` if given, else the torch hub cache; never downloads."""
    candidates = [Path(path).expanduser()] if path is not None else [default_fid_weights_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"FID Inception weights {FID_WEIGHTS_FILENAME} not found (looked at: {looked}). "
        f"On a machine with internet access fetch {FID_WEIGHTS_URL} (running pytorch-fid once "
        f"also caches it) and copy it to {default_fid_weights_path()} (the torch hub checkpoints "
        f"directory; set TORCH_HOME to move it), or pass its path explicitly (FID weights path "
        f"in params)."
    )


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: images → (pool3 features [N, 2048], logits [N, 1008]).

    Input: float images NCHW in [-1, 1] (the library convention), 1 or 3 channels, any size.
    They are mapped to [0, 1] and resized exactly as pytorch-fid does (bilinear to 299×299,
    align_corners=False, then scaled to [-1, 1]); grayscale is repeated to three channels, as
    PIL's convert("RGB") does in pytorch-fid's loader. Freshly built, the weights are random
    (`weights_sha256` is None); `load_weights` installs the real ones.
    """

    feature_dim = 2048
    num_classes = 1008
    name = "pytorch-fid-inception-v3"

    def __init__(self):
        super().__init__()
        # init_weights=False skips torchvision's slow truncated-normal init: the weights are
        # either loaded next or only needed as a random network for shape tests and timing.
        net = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=self.num_classes, init_weights=False
        )
        net.Mixed_5b = _FIDMixedA(192, pool_features=32)
        net.Mixed_5c = _FIDMixedA(256, pool_features=64)
        net.Mixed_5d = _FIDMixedA(288, pool_features=64)
        net.Mixed_6b = _FIDMixedC(768, channels_7x7=128)
        net.Mixed_6c = _FIDMixedC(768, channels_7x7=160)
        net.Mixed_6d = _FIDMixedC(768, channels_7x7=160)
        net.Mixed_6e = _FIDMixedC(768, channels_7x7=192)
        net.Mixed_7b = _FIDMixedE(1280, _tf_avg_pool)
        net.Mixed_7c = _FIDMixedE(2048, _max_pool)
        # Kept as torchvision's module so the checkpoint's key names load unchanged.
        self.net = net
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    @property
    def extractor_id(self) -> str:
        """Identity of the features, for cache keys: network name and checkpoint sha256."""
        if self.weights_sha256 is None:
            raise ValueError(
                f"{self.name} has random weights; load {FID_WEIGHTS_FILENAME} before computing "
                "statistics that are cached or compared"
            )
        return f"{self.name}:{self.weights_sha256}"

    def load_weights(self, path: str | os.PathLike | None = None) -> FIDInceptionV3:
        """Load the ported TensorFlow checkpoint (see `resolve_fid_weights`); returns self."""
        path = resolve_fid_weights(path)
        sha = file_sha256(path)
        if not sha.startswith(_FID_WEIGHTS_SHA256_PREFIX):
            raise ValueError(
                f"{path}: sha256 {sha} does not start with {_FID_WEIGHTS_SHA256_PREFIX}, so it is "
                f"not (an intact copy of) {FID_WEIGHTS_FILENAME}; fetch it again from "
                f"{FID_WEIGHTS_URL}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.weights_sha256 = sha
        return self

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                "FID Inception takes images [N, 1 or 3, H, W] in [-1, 1], "
                f"got {tuple(images.shape)}"
            )
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        x = self.preprocess(images)
        for layer in (
            net.Conv2d_1a_3x3,
            net.Conv2d_2a_3x3,
            net.Conv2d_2b_3x3,
            net.maxpool1,
            net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3,
            net.maxpool2,
            net.Mixed_5b,
            net.Mixed_5c,
            net.Mixed_5d,
            net.Mixed_6a,
            net.Mixed_6b,
            net.Mixed_6c,
            net.Mixed_6d,
            net.Mixed_6e,
            net.Mixed_7a,
            net.Mixed_7b,
            net.Mixed_7c,
            net.avgpool,
        ):
            x = layer(x)
        pool3 = torch.flatten(x, 1)
        # The Inception Score of Salimans et al. (the paper's IS 9.46) takes softmax(pool3 · W),
        # without the fc layer's bias; torch-fidelity calls these "logits_unbiased".
        return pool3, pool3 @ net.fc.weight.T

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features_and_logits(images)


def load_fid_inception(
    weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> FIDInceptionV3:
    """The FID network with its real weights, in eval mode, on `device` (default CPU)."""
    net = FIDInceptionV3().load_weights(weights_path)
    return net.to(device) if device is not None else net
