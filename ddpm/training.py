"""The one training loop: Algorithm 1 with Adam, warm-up, clipping, EMA, hooks and exact resume.

Pure PyTorch (no Ray, no MLflow). `fit(trainer, batches, ...)` runs the steps; everything around
them (logging, checkpoints, evaluation, pictures) is a `Hook` called at chosen intervals. The
pipeline's Ray Train worker and every Tune trial call `fit`; so can a notebook or a script.

Reproducibility design
----------------------
All randomness of optimizer step `s` on DDP rank `r` is a pure function of `(seed, r, s)`:

* which images form the batch: the caller's batch iterator must start at `trainer.step`; the
  pipeline streams Parquet shards with `ddpm.data.ShardDataset` + `step_batches`, whose order
  (and horizontal flips, `TrainConfig.flip`) is a pure function of (seed, epoch) and which skips
  to the resumed step's batch,
* the timesteps t and the noise eps (a fresh `torch.Generator` per step, seeded from the
  "train.step" stream of `ddpm.seeding`),
* dropout inside the network (the global torch RNG is reseeded per step, because `nn.Dropout`
  cannot take a generator).

Nothing random is carried from one step to the next, so a run resumed from a checkpoint at step N
performs exactly the updates that an uninterrupted run with the same number of workers performs
(with another number it is a valid continuation, just not the same one). The checkpoint still
records the process RNG states (torch, CUDA, numpy, python) and `load_state_dict(...,
restore_rng=True)` restores them, so code a caller runs around the loop with those RNGs also
continues where it stopped.

The learning rate is a pure function of the step too (`lr_at`), so there is no scheduler state.

Checkpoint format (`save_checkpoint`, one `torch.save` file, written atomically)::

    {"format": "ddpm-checkpoint", "version": 2, "step": int,
     "model": state_dict, "ema": state_dict, "optimizer": state_dict,
     "loss_history": float64 tensor [step],
     "config": {"model": {...}, "diffusion": {...}, "train": {...}, "seed": int},
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None, "numpy": {...}, "python": [...]},
     "meta": {...}}

EMA export (`export_ema`, what DVC tracks as `models/ema.pt`): "step", "ema", "config" and "meta"
only, with "format": "ddpm-ema". `load_ema_model` reads either kind.

`config["model"]` is `asdict(ddpm.nn.ModelConfig)`, `config["diffusion"]`
`asdict(ddpm.diffusion.DiffusionConfig)` and `config["train"]` `asdict(TrainConfig)`: plain data,
so a checkpoint rebuilds its network without the params file that made it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.errors import reading_checkpoint
from ddpm.io_utils import atomic_write
from ddpm.nn import ModelConfig
from ddpm.precision import PRECISIONS, on_for_cuda, resolve_precision
from ddpm.seeding import derive_seeds
from ddpm.validation import Problem, check_choice, check_positive, check_range, raise_problems

CHECKPOINT_FORMAT = "ddpm-checkpoint"
EMA_FORMAT = "ddpm-ema"
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the paper's / official code's CIFAR-10 values."""

    steps: int = 800_000
    # The global batch: split evenly over the data-parallel ranks.
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000
    # Gradient-norm clipping; null/None: no clipping.
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    # Ramp the EMA decay up as (1 + s) / (10 + s), so a short run's EMA is not the initialisation.
    ema_warmup: bool = False
    # Random horizontal flips of the training images (the paper's CIFAR-10 setting; wrong for
    # digits). The data pipeline draws them (ShardDataset), independent of the number of ranks.
    flip: bool = False
    # The fast path. "auto" and None pick the fast choice for the device, by the rule sampling
    # shares (ddpm.precision): on CUDA bf16 autocast (where the GPU has bf16), channels_last,
    # torch.compile, fused Adam and TF32 matmuls for what stays fp32; elsewhere fp32 and none.
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool | None = None
    fused_adam: bool | None = None
    tf32: bool | None = None

    def __post_init__(self) -> None:
        raise_problems("TrainConfig", self.problems())

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                found.append((name, f"must be an integer >= 1, got {value!r}"))
        found += check_positive("lr", self.lr)
        if self.lr is None:
            found.append(("lr", "must be > 0, got None"))
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            found.append(("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}"))
        found += check_positive("grad_clip", self.grad_clip)
        found += check_range("ema_decay", self.ema_decay, 0.0, 1.0, closed_high=False)
        found += check_choice("precision", self.precision, PRECISIONS)
        for name in ("channels_last", "compile", "fused_adam", "tf32"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                found.append((name, f"must be true, false or null (auto), got {value!r}"))
        return found


@dataclasses.dataclass(frozen=True)
class FastPath:
    """TrainConfig's speed switches resolved for one device: what a Trainer actually does."""

    bf16: bool
    channels_last: bool
    compile: bool
    fused_adam: bool
    tf32: bool

    @classmethod
    def resolve(cls, config: TrainConfig, device: torch.device | str) -> FastPath:
        device = torch.device(device)
        cuda = device.type == "cuda"
        fused = on_for_cuda(config.fused_adam, device)
        if fused and not cuda:
            raise ValueError("train.fused_adam: true needs a CUDA device; use null (auto)")
        return cls(
            bf16=resolve_precision(config.precision, device, "train.precision"),
            channels_last=on_for_cuda(config.channels_last, device),
            compile=on_for_cuda(config.compile, device),
            fused_adam=fused,
            tf32=on_for_cuda(config.tf32, device) and cuda,
        )


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
        # One multi-tensor kernel launch for all parameters on CUDA (per-tensor on the CPU,
        # where it is the same arithmetic as lerp_ one by one).
        torch._foreach_lerp_(
            list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d
        )
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        return d


def check_finite(grad_norms: Tensor, first_step: int, losses: Tensor) -> None:
    """Raise if any of these consecutive steps (0-based, from `first_step`) had a non-finite
    gradient norm. Gradients are all-reduced before the norm, so every rank sees the same norms
    and raises at the same window instead of leaving the others waiting in an all-reduce."""
    bad = (~torch.isfinite(grad_norms)).nonzero()
    if len(bad):
        k = int(bad[0])
        raise FloatingPointError(
            f"non-finite gradient norm {float(grad_norms[k])} at step {first_step + k} "
            f"(loss {float(losses[k])}); lower train.lr or use train.precision fp32"
        )


class Trainer:
    """Model + EMA + Adam, advanced one Algorithm-1 step at a time.

    `wrap` turns the network into the module the forward/backward goes through (e.g. Ray's
    `prepare_model`, which wraps it in DistributedDataParallel); the EMA and the checkpoint always
    see the unwrapped network. The model must already be on `device` when `wrap` moves nothing.
    `loss_history` holds the mean loss over all ranks of every step so far (filled in by `fit`).
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        config: TrainConfig,
        *,
        model_config: ModelConfig,
        diffusion_config: DiffusionConfig,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        self.seed = seed
        self.rank = rank
        self.model_config = model_config
        self.diffusion_config = diffusion_config
        self.fast = FastPath.resolve(config, self.device)
        if self.device.type == "cuda":
            # Process-wide: what runs in fp32 (all of it without bf16; the loss, the optimizer
            # and what autocast leaves alone with it) uses TF32 tensor cores for its matmuls and
            # convolutions, or strict IEEE fp32 when tf32 is false (cuDNN's own default is TF32).
            precision = "tf32" if self.fast.tf32 else "ieee"
            torch.backends.cuda.matmul.fp32_precision = precision
            torch.backends.cudnn.conv.fp32_precision = precision
        memory_format = torch.channels_last if self.fast.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.diffusion = diffusion.copy_to(self.device)
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        forward = wrap(self.model) if wrap is not None else self.model
        # Compiled after DDP wraps it, so its graph breaks at the gradient buckets' all-reduces
        # (DDPOptimizer) and communication overlaps the backward pass.
        self.forward_model = torch.compile(forward) if self.fast.compile else forward
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, fused=self.fast.fused_adam or None
        )
        self.step = 0
        self.loss_history: list[float] = []

    @classmethod
    def from_config(
        cls,
        model_config: ModelConfig,
        diffusion_config: DiffusionConfig,
        config: TrainConfig,
        *,
        seed: int = 0,
        **kwargs: Any,
    ) -> Trainer:
        """Build the diffusion and the network (its initialisation seeded by `seed`)."""
        diffusion = diffusion_config.build()
        learn_sigma = diffusion.output_channels_multiplier == 2
        model = model_config.build(learn_sigma=learn_sigma, seed=seed)
        return cls(
            model,
            diffusion,
            config,
            model_config=model_config,
            diffusion_config=diffusion_config,
            seed=seed,
            **kwargs,
        )

    def train_step(self, x0: Tensor) -> dict[str, float]:
        """One update of Algorithm 1 on this rank's batch `x0` (float in [-1, 1], NCHW).

        Returns the batch's mean L_simple (or the configured loss), the global gradient norm
        before clipping, the lr and the EMA decay used. Reading them waits for the device; `fit`
        runs `update` instead and reads a window of steps at once.
        """
        step = self.step
        out = self.update(x0)
        check_finite(out["grad_norm"].reshape(1), step, out["loss"].reshape(1))
        return {**out, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"])}

    def update(self, x0: Tensor) -> dict[str, Any]:
        """`train_step` without waiting for the device: loss and grad_norm stay 0-d device
        tensors, and a non-finite gradient is found when they are read (`check_finite`)."""
        cfg = self.config
        gen_seed, global_seed = derive_seeds(self.seed, "train.step", self.rank, self.step, count=2)
        gen = torch.Generator().manual_seed(gen_seed)
        torch.manual_seed(global_seed)  # dropout draws from the global RNG

        n = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        if self.device.type == "cuda":
            # Drawn on the CPU (the same numbers on any device); from pinned memory the copies
            # queue behind the GPU's work instead of waiting for it.
            t, noise = t.pin_memory(), noise.pin_memory()
        x0 = x0.to(self.device, torch.float32, non_blocking=True)
        t = t.to(self.device, non_blocking=True)
        noise = noise.to(self.device, non_blocking=True)
        if self.fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)

        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.forward_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast.bf16):
            losses = self.diffusion.training_losses(self.forward_model, x0, t=t, noise=noise)
        loss = losses["loss"].float().mean()
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        decay = self.ema.update(self.model, self.step)
        self.step += 1
        return {
            "loss": loss.detach(),
            "grad_norm": grad_norm.detach(),
            "lr": lr,
            "ema_decay": decay,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_history": torch.tensor(self.loss_history, dtype=torch.float64),
            "config": self.config_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
        """Continue from a checkpoint dict; what shapes its updates must match this trainer's."""
        _check_format(state, CHECKPOINT_FORMAT, "<checkpoint>")
        mine = self.config_dict()
        for key in ("model", "diffusion", "seed"):
            if state["config"][key] != mine[key]:
                raise ValueError(
                    f"checkpoint {key} config {state['config'][key]} differs from this run's "
                    f"{mine[key]}; start a fresh run instead of resuming"
                )
        history = state["loss_history"]
        if len(history) != int(state["step"]):
            raise ValueError(
                f"checkpoint loss history has {len(history)} entries for step {state['step']}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.loss_history = [float(v) for v in history.tolist()]
        if restore_rng:
            _set_rng_state(state["rng"])

    def config_dict(self) -> dict[str, Any]:
        """The plain-data configs a checkpoint stores (see the module docstring)."""
        return {
            "model": dataclasses.asdict(self.model_config),
            "diffusion": dataclasses.asdict(self.diffusion_config),
            "train": dataclasses.asdict(self.config),
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class Window:
    """The steps since the previous window closed: what every hook sees.

    Windows close every `log_every` steps, at every step a hook with an interval is due, and at
    the last step of the call.
    """

    first_step: int  # 1-based number of the window's first update
    step: int  # updates completed, = trainer.step
    losses: list[float]  # mean loss over all ranks of each step of the window
    stats: list[dict[str, float]]  # each step's lr, grad_norm (before clipping), ema_decay
    seconds: float
    data_seconds: float  # of `seconds`, the time spent waiting for the next batch
    images: int  # images over all ranks
    final: bool  # the last window of this `fit` call

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def due(self, every: int | None) -> bool:
        """Whether a hook with interval `every` (None: every window) runs at this window."""
        return every is None or self.final or self.step % every == 0


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(trainer, window)` after the windows where `window.due(every)`, in the order given."""

    fn: Callable[[Trainer, Window], None]
    every: int | None = None


def fit(
    trainer: Trainer,
    batches: Iterator[Tensor],
    *,
    steps: int | None = None,
    log_every: int = 100,
    hooks: Sequence[Hook] = (),
    reduce_losses: Callable[[list[float]], list[float]] | None = None,
    stop_after: int | None = None,
) -> Trainer:
    """Train until `trainer.step` reaches `steps` (default `trainer.config.steps`).

    `batches` yields this rank's batches starting at `trainer.step` (a resumed trainer continues
    exactly when its iterator does). `reduce_losses` turns this rank's per-step losses into the
    mean over all ranks (a collective: every rank closes the same windows, so calls line up).
    `stop_after` ends the call after that step, as an interruption would; a later call resumes.
    """
    steps = trainer.config.steps if steps is None else steps
    end = steps if stop_after is None else min(steps, stop_after)
    intervals = [log_every, *(h.every for h in hooks if h.every is not None)]
    if any(not isinstance(n, int) or n < 1 for n in intervals):
        raise ValueError(f"log_every and hook intervals must be integers >= 1, got {intervals}")
    batch_size = trainer.config.batch_size
    outputs: list[dict[str, Any]] = []
    started = time.perf_counter()
    waited = 0.0
    while trainer.step < end:
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        outputs.append(trainer.update(batch))
        step = trainer.step
        if step != end and all(step % n for n in intervals):
            continue
        # The one wait for the device in a window: its losses and norms in one copy.
        first = step - len(outputs)
        read = torch.stack(
            [torch.stack([out["loss"].float(), out["grad_norm"].float()]) for out in outputs]
        ).cpu()
        check_finite(read[:, 1], first, read[:, 0])
        local = read[:, 0].tolist()
        losses = reduce_losses(local) if reduce_losses is not None else local
        trainer.loss_history.extend(losses)
        window = Window(
            first_step=first + 1,
            step=step,
            losses=losses,
            stats=[
                {"lr": out["lr"], "grad_norm": norm, "ema_decay": out["ema_decay"]}
                for out, norm in zip(outputs, read[:, 1].tolist(), strict=True)
            ],
            seconds=time.perf_counter() - started,
            data_seconds=waited,
            images=batch_size * len(outputs),
            final=step == end,
        )
        for hook in hooks:
            if window.due(hook.every):
                hook.fn(trainer, window)
        outputs = []
        started = time.perf_counter()
        waited = 0.0
    return trainer


# ---------------------------------------------------------------------------------------------
# Checkpoints


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


def _load(path: str | Path, map_location: str | torch.device) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(
    path: str | Path, trainer: Trainer, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the full training state to `path` atomically (temp file + rename)."""
    return _save(path, {**trainer.state_dict(), "meta": dict(meta or {})})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a full checkpoint written by `save_checkpoint`.

    The model and EMA weights must have the dtypes of the model the config builds and be finite,
    and the optimizer's floating-point state must be finite. Any file that is not such a
    checkpoint (missing, not a torch file, another format, bad tensors) is a `CheckpointError`
    whose one-line message names `path` (and the tensor).
    """
    with reading_checkpoint(path):
        state = _load(path, map_location)
        _check_format(state, CHECKPOINT_FORMAT, path)
        expected = _model_dtypes(state.get("config"))
        for part in ("model", "ema"):
            _check_weights(state.get(part), part, path, expected)
        _check_optimizer(state.get("optimizer"), path)
    return state


def _check_optimizer(optimizer: Any, path: str | Path) -> None:
    """Refuse, naming the slot, an optimizer state holding NaN or Inf."""
    if isinstance(optimizer, Mapping) and isinstance(optimizer.get("state"), Mapping):
        for slot, slot_state in optimizer["state"].items():
            if isinstance(slot_state, Mapping):
                for name, value in slot_state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        _check_finite(value, f"optimizer.state.{slot}.{name}", path)


def _model_dtypes(config: Any) -> dict[str, torch.dtype] | None:
    """Each state-dict entry's dtype in the model `config` builds (on the meta device, so
    nothing is allocated); None when the config does not build (its own check reports it)."""
    try:
        with torch.device("meta"):
            model = ModelConfig(**config["model"]).build()
    except (TypeError, ValueError, KeyError, RuntimeError):
        return None
    return {name: tensor.dtype for name, tensor in model.state_dict().items()}


def _check_weights(
    tensors: Any, part: str, path: str | Path, expected: Mapping[str, torch.dtype] | None
) -> None:
    """Refuse, naming the tensor, weights that are not tensors, whose dtype is not the model's
    (not floating point when the model is unknown) or that hold NaN or Inf."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{path}: {part!r} must be a state dict, got {type(tensors).__name__}")
    for name, tensor in tensors.items():
        label = f"{part}.{name}"
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: tensor {label} is a {type(tensor).__name__}, not a tensor")
        want = None if expected is None else expected.get(name)
        if want is not None and tensor.dtype != want:
            raise ValueError(
                f"{path}: tensor {label} has dtype {tensor.dtype}, the model's is {want}"
            )
        if want is None and not tensor.is_floating_point():
            raise ValueError(
                f"{path}: tensor {label} has dtype {tensor.dtype}, not a floating-point dtype"
            )
        if tensor.is_floating_point():
            _check_finite(tensor, label, path)


def _check_finite(tensor: torch.Tensor, label: str, path: str | Path) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(
            f"{path}: tensor {label} has {bad} NaN or Inf value(s) of {tensor.numel()}; the "
            "file is damaged or its training diverged"
        )


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


def load_ema_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, GaussianDiffusion, dict[str, Any]]:
    """(ema_model in eval mode, diffusion, meta) from an EMA export or a full checkpoint.

    `meta` holds the file's own meta plus "step" and "config". Any file that is not such an
    export or checkpoint, or whose weights do not fit the network its config describes, is a
    `CheckpointError` whose one-line message names `path`.
    """
    with reading_checkpoint(path):
        model, diffusion, meta = _ema_model(path)
    device = torch.device(device)
    return model.to(device).eval(), diffusion.copy_to(device), meta


def _ema_model(path: str | Path) -> tuple[nn.Module, GaussianDiffusion, dict[str, Any]]:
    state = _load(path, "cpu")
    if not isinstance(state, Mapping) or state.get("format") not in (EMA_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(
            f"{path} is neither an EMA export ({EMA_FORMAT!r}) nor a checkpoint "
            f"({CHECKPOINT_FORMAT!r})"
        )
    _check_format(state, state["format"], path)
    config = state["config"]
    model_config, diffusion_config = configs_of(config)
    diffusion = diffusion_config.build()
    model = model_config.build(learn_sigma=diffusion.output_channels_multiplier == 2)
    expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    _check_weights(state["ema"], "ema", path, expected)
    model.load_state_dict(state["ema"])
    model.requires_grad_(False)
    meta = {**dict(state.get("meta") or {}), "step": int(state["step"]), "config": config}
    return model, diffusion, meta


def configs_of(config: Mapping[str, Any]) -> tuple[ModelConfig, DiffusionConfig]:
    """The typed model and diffusion configs of a checkpoint's "config" entry."""
    return ModelConfig(**config["model"]), DiffusionConfig(**config["diffusion"])
