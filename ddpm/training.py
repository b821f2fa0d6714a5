"""The training core: one step of Algorithm 1, Adam with warm-up, clipping, EMA and checkpoints.

Pure PyTorch (no Ray, no MLflow): `pipelines/train.py` and `pipelines/tune.py` drive it under Ray,
and a notebook can drive it directly.

Reproducibility design
----------------------
All randomness of optimizer step `s` on DDP rank `r` is a pure function of `(seed, r, s)`:

* which images form the batch: for in-memory data `batch_indices` (an epoch-wise permutation
  seeded per epoch, the global batch cut into contiguous per-rank slices); the train stage
  streams Parquet shards with `ddpm.data.ShardDataset`, whose order is likewise a pure function
  of (seed, epoch) and skips to the resumed step's batch,
* the horizontal flips, the timesteps t and the noise eps (a fresh `torch.Generator` per step,
  seeded by `step_seed`),
* dropout inside the network (the global torch RNG is reseeded per step, because `nn.Dropout`
  cannot take a generator).

Nothing random is carried from one step to the next, so a run resumed from a checkpoint at step N
performs exactly the updates that an uninterrupted run with the same number of workers performs
(with another number it is a valid continuation, just not the same one). The checkpoint still
records the process RNG states (torch, CUDA, numpy, python) and `resume(..., restore_rng=True)`
restores them, so code a caller runs around the loop with those RNGs also continues where it
stopped.

The learning rate is a pure function of the step too (`lr_at`), so there is no scheduler state.

Checkpoint format (`save_checkpoint`, one `torch.save` file, written atomically)::

    {"format": "ddpm-checkpoint", "version": 1, "step": int,
     "model": state_dict, "ema": state_dict, "optimizer": state_dict,
     "config": {"model": {...}, "diffusion": {...}, "train": {...}},
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None, "numpy": {...}, "python": [...]},
     "meta": {...}}

EMA export (`export_ema`, what DVC tracks as `models/ema.pt`): the same without "model",
"optimizer" and "rng", and with "format": "ddpm-ema". `load_ema_model` reads either kind.

`config["model"]` holds the keyword arguments of `ddpm.nn.build_unet` (`name`, `image_size`,
`in_channels`, `overrides`); `config["diffusion"]` those of `GaussianDiffusion.from_config`. Both
are plain data so a checkpoint rebuilds its network without the params file that made it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddpm.io_utils import atomic_write

CHECKPOINT_FORMAT = "ddpm-checkpoint"
EMA_FORMAT = "ddpm-ema"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the paper's / official code's CIFAR-10 values."""

    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    flip: bool = False
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(
                f"train.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}"
            )
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0
        ):
            raise ValueError(
                f"train.grad_clip must be > 0 or null (no clipping), got {self.grad_clip!r}"
            )
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of the update that follows `step` completed updates (0-based).

    Linear warm-up as in the official code, shifted by one so that the very first update already
    moves the weights (the official `lr * min(step / warmup, 1)` spends update 0 at lr = 0):
    update s uses `base_lr * min(1, (s + 1) / warmup_steps)`.
    """
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay for the update that follows `step` completed updates.

    With `warmup` the decay ramps as (1 + step) / (10 + step) (the tensorflow/improved-diffusion
    "num_updates" form) so a short run's EMA is not dominated by the random initialisation.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Exponential moving average of a model's parameters; buffers are copied verbatim.

    `self.model` is a frozen deep copy in eval mode: it is the network sampling uses.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """ema <- d * ema + (1 - d) * param for every parameter; returns the decay d used."""
        d = ema_decay_at(step, self.decay, self.warmup)
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        return d


# Domain tags keep the seed streams of different purposes apart for equal (seed, ...) words.
_STEP_STREAM, _EPOCH_STREAM = 0, 1


def _derive_seeds(*words: int, count: int) -> list[int]:
    state = np.random.SeedSequence(list(words)).generate_state(count, dtype=np.uint64)
    return [int(w >> np.uint64(1)) for w in state]  # 63 bits: torch seeds are signed 64-bit


def step_seed(seed: int, rank: int, step: int) -> tuple[int, int]:
    """Two independent seeds (flip/t/noise generator, global RNG for dropout) for one step."""
    first, second = _derive_seeds(_STEP_STREAM, seed, rank, step, count=2)
    return first, second


_EPOCH_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_permutation(seed: int, epoch: int, num_items: int) -> torch.Tensor:
    key = (seed, epoch, num_items)
    perm = _EPOCH_PERM_CACHE.get(key)
    if perm is None:
        gen = torch.Generator().manual_seed(_derive_seeds(_EPOCH_STREAM, seed, epoch, count=1)[0])
        perm = torch.randperm(num_items, generator=gen)
        # Two epochs are live at an epoch boundary; older ones are never needed again.
        if len(_EPOCH_PERM_CACHE) >= 4:
            _EPOCH_PERM_CACHE.clear()
        _EPOCH_PERM_CACHE[key] = perm
    return perm


def batch_indices(
    step: int,
    *,
    num_items: int,
    global_batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Dataset indices of rank `rank`'s share of the global batch of step `step`.

    The data stream is the concatenation of per-epoch permutations of `range(num_items)`; step s
    takes stream positions [s*B, (s+1)*B) and rank r the r-th contiguous slice of B / world_size.
    A pure function of its arguments: resuming at any step reproduces the batches exactly, and
    the ranks of one step never share an image (while B <= num_items).
    """
    if num_items < 1:
        raise ValueError(f"the training set is empty (num_items={num_items})")
    if global_batch < 1 or world_size < 1 or global_batch % world_size:
        raise ValueError(
            f"train.batch_size (global) must be a positive multiple of the number of workers: "
            f"got batch_size={global_batch}, num_workers={world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    local = global_batch // world_size
    start = step * global_batch + rank * local
    positions = torch.arange(start, start + local)
    epochs = positions // num_items
    out = torch.empty(local, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        mask = epochs == epoch
        out[mask] = _epoch_permutation(seed, epoch, num_items)[positions[mask] % num_items]
    return out


def autocast_enabled(precision: str, device: torch.device) -> bool:
    """Whether bf16 autocast runs: only when asked for, and on CUDA only where bf16 exists."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.precision 'bf16' asked for, but CUDA device {device} has no bf16 support; "
            "use 'fp32'"
        )
    return True


def build_model(
    model_config: Mapping[str, Any], learn_sigma: bool = False, seed: int | None = None
) -> nn.Module:
    """`ddpm.nn.build_unet` from a checkpoint's plain-data model config (`seed`: the init)."""
    from ddpm.nn import build_unet

    missing = {"name", "image_size", "in_channels"} - set(model_config)
    if missing:
        raise ValueError(f"model config lacks keys {sorted(missing)}: got {dict(model_config)}")
    return build_unet(
        model_config["name"],
        image_size=int(model_config["image_size"]),
        in_channels=int(model_config["in_channels"]),
        learn_sigma=learn_sigma,
        seed=seed,
        **dict(model_config.get("overrides") or {}),
    )


def build_diffusion(diffusion_config: Mapping[str, Any]):
    """`GaussianDiffusion.from_config` from a checkpoint's plain-data diffusion config."""
    from ddpm.diffusion import GaussianDiffusion

    return GaussianDiffusion.from_config(**dict(diffusion_config))


class Trainer:
    """Model + EMA + Adam, advanced one Algorithm-1 step at a time.

    `wrap` turns the network into the module the forward/backward goes through (e.g. Ray's
    `prepare_model`, which wraps it in DistributedDataParallel); the EMA and the checkpoint always
    see the unwrapped network. The model must already be on `device` when `wrap` moves nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: nn.Module,
        config: TrainConfig,
        *,
        model_config: Mapping[str, Any],
        diffusion_config: Mapping[str, Any],
        device: torch.device | str = "cpu",
        rank: int = 0,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        self.rank = rank
        self.model_config = dict(model_config)
        self.diffusion_config = dict(diffusion_config)
        self.model = model.to(self.device)
        self.diffusion = diffusion.to(self.device)
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        self.forward_model = wrap(self.model) if wrap is not None else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.use_autocast = autocast_enabled(config.precision, self.device)
        self.step = 0

    @classmethod
    def from_config(
        cls,
        model_config: Mapping[str, Any],
        diffusion_config: Mapping[str, Any],
        config: TrainConfig,
        **kwargs: Any,
    ) -> Trainer:
        """Build the network (seeded by `config.seed`) and the diffusion, then the trainer."""
        diffusion = build_diffusion(diffusion_config)
        learn_sigma = diffusion.output_channels_multiplier == 2
        model = build_model(model_config, learn_sigma=learn_sigma, seed=config.seed)
        return cls(
            model,
            diffusion,
            config,
            model_config=model_config,
            diffusion_config=diffusion_config,
            **kwargs,
        )

    def train_step(self, x0: torch.Tensor) -> dict[str, float]:
        """One update of Algorithm 1 on this rank's batch `x0` (float in [-1, 1], NCHW).

        Returns the batch's mean L_simple (or the configured loss), the global gradient norm
        before clipping, the lr and the EMA decay used.
        """
        cfg = self.config
        gen_seed, global_seed = step_seed(cfg.seed, self.rank, self.step)
        gen = torch.Generator().manual_seed(gen_seed)
        torch.manual_seed(global_seed)  # dropout draws from the global RNG

        n = x0.shape[0]
        if cfg.flip:
            flip = torch.rand(n, generator=gen) < 0.5
            x0 = torch.where(flip.view(n, 1, 1, 1).to(x0.device), x0.flip(3), x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        x0 = x0.to(self.device, torch.float32)
        t, noise = t.to(self.device), noise.to(self.device)

        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.forward_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
            losses = self.diffusion.training_losses(self.forward_model, x0, t=t, noise=noise)
        loss = losses["loss"].float().mean()
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # Gradients are all-reduced before this point, so every rank sees the same norm and
        # raises together instead of leaving the others waiting in the next all-reduce.
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite gradient norm {grad_norm} at step {self.step} "
                f"(loss {loss.item()}); lower train.lr or use train.precision fp32"
            )
        self.optimizer.step()
        decay = self.ema.update(self.model, self.step)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm, "lr": lr, "ema_decay": decay}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self._config_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
        """Continue from a checkpoint dict; its configs must match this trainer's."""
        _check_format(state, CHECKPOINT_FORMAT, "<checkpoint>")
        mine = self._config_dict()
        for key in ("model", "diffusion"):
            if dict(state["config"][key]) != mine[key]:
                raise ValueError(
                    f"checkpoint {key} config {state['config'][key]} differs from this run's "
                    f"{mine[key]}; start a fresh run instead of resuming"
                )
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if restore_rng:
            _set_rng_state(state["rng"])

    def _config_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_config,
            "diffusion": self.diffusion_config,
            "train": dataclasses.asdict(self.config),
        }


def _rng_state() -> dict[str, Any]:
    # The legacy global numpy RNG is the state to save: it is what third-party code draws from.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        # numpy's state as tensors and scalars so the file loads with weights_only=True
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (restoring the legacy global state on purpose)
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _check_format(state: Any, expected: str, path: str | Path) -> None:
    if not isinstance(state, Mapping) or "format" not in state:
        raise ValueError(f"{path} is not a ddpm checkpoint (no 'format' key)")
    if state["format"] != expected:
        raise ValueError(f"{path} has format {state['format']!r}; expected {expected!r}")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has version {state.get('version')!r}; this code reads {FORMAT_VERSION}"
        )


def _save(path: str | Path, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        torch.save(dict(payload), handle)
    return path


def _load(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(
    path: str | Path, trainer: Trainer, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the full training state to `path` atomically (temp file + rename)."""
    return _save(path, {**trainer.state_dict(), "meta": dict(meta or {})})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a full checkpoint written by `save_checkpoint`."""
    state = _load(path, map_location)
    _check_format(state, CHECKPOINT_FORMAT, path)
    return state


def resume(trainer: Trainer, path: str | Path, *, restore_rng: bool = True) -> dict[str, Any]:
    """Load `path` into `trainer` (which then continues exactly); returns the checkpoint's meta."""
    state = load_checkpoint(path, map_location=trainer.device)
    try:
        trainer.load_state_dict(state, restore_rng=restore_rng)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return dict(state.get("meta") or {})


def export_ema(
    path: str | Path,
    source: Trainer | Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write just the EMA weights and the configs that rebuild them (the DVC-tracked model).

    `source` is a live `Trainer` or a checkpoint dict from `load_checkpoint`.
    """
    state = source.state_dict() if isinstance(source, Trainer) else source
    return _save(
        path,
        {
            "format": EMA_FORMAT,
            "version": FORMAT_VERSION,
            "step": int(state["step"]),
            "ema": state["ema"],
            "config": state["config"],
            "meta": dict(meta or {}),
        },
    )


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict (names, dtypes, shapes and bytes, in order).

    `state_digest(model.state_dict())` of data-parallel replicas must agree bit for bit after
    every step; the digest of a saved checkpoint's "model" equals that of the live model.
    """
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_ema_model(path: str | Path, device: str | torch.device = "cpu"):
    """(ema_model in eval mode, diffusion, meta) from an EMA export or a full checkpoint.

    `meta` holds the file's own meta plus "step" and "config".
    """
    state = _load(path, "cpu")
    if not isinstance(state, Mapping) or state.get("format") not in (EMA_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(
            f"{path} is neither an EMA export ({EMA_FORMAT!r}) nor a checkpoint "
            f"({CHECKPOINT_FORMAT!r})"
        )
    _check_format(state, state["format"], path)
    config = state["config"]
    diffusion = build_diffusion(config["diffusion"])
    model = build_model(config["model"], learn_sigma=diffusion.output_channels_multiplier == 2)
    model.load_state_dict(state["ema"])
    model.requires_grad_(False)
    device = torch.device(device)
    meta = {**dict(state.get("meta") or {}), "step": int(state["step"]), "config": config}
    return model.to(device).eval(), diffusion.to(device), meta
