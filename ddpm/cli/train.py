"""`ddpm train`: the library's loop (`ddpm.training.fit`) on a folder of images, in this process:
a progress bar, a sample grid and a checkpoint every N steps, OUT/ema.pt at the end; --resume
continues a run exactly."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

from ddpm.cli.common import (
    CommandError,
    add_device,
    check_folder,
    device,
    grid,
    positive_int,
    progress,
    write_png,
)
from ddpm.cli.images import MANIFEST, is_grey, split_dir

# What a fresh run uses for each flag not given. The U-Net, batch and step count suit a
# command-line run on one machine; lr, the warm-up cap, the EMA decay and the timesteps are the
# paper's (TrainConfig's and DiffusionConfig's defaults; tests/test_cli.py holds them equal).
# Repeated here so that parsing needs no torch import.
DEFAULTS: dict[str, Any] = {
    "config": "small",
    "image_size": 32,
    "timesteps": 1000,
    "steps": 10_000,
    "batch_size": 64,
    "lr": 2e-4,
    "warmup_steps": 5000,
    "ema_decay": 0.9999,
    "seed": 0,
    "sample_every": 1000,
    "checkpoint_every": 1000,
}
# The warm-up is at most this fraction of the run.
WARMUP_FRACTION = 10
# Images and DDIM steps of the sample grids written during training.
GRID_IMAGES = 16
GRID_STEPS = 50
# Flags whose value is fixed by the checkpoint when resuming -> (config section, field).
RUN_FLAGS = {
    "config": ("model", "name"),
    "image_size": ("model", "image_size"),
    "channels": ("model", "in_channels"),
    "timesteps": ("diffusion", "num_timesteps"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "warmup_steps": ("train", "warmup_steps"),
    "ema_decay": ("train", "ema_decay"),
    "flip": ("train", "flip"),
    "seed": (None, "seed"),
}
# Flags that must be >= 1 when given (argparse's int type lets 0 and negatives through).
_POSITIVE = ("steps", "sample_every", "checkpoint_every", "stop_after")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a model on a folder of images",
        description="Train with the library's loop (ddpm.training.fit) in this process: "
        "progress bar, a sample grid and a checkpoint every N steps, OUT/ema.pt at the end. The "
        "images are prepared into shards in OUT/data once. --resume continues a run exactly "
        "(the same weights as an uninterrupted run).",
    )
    d = DEFAULTS
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="a folder of image files (class sub-folders allowed) or a prepared dataset",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    p.add_argument(
        "--config", help=f"U-Net config: tiny, small, cifar10, celebahq256 ({d['config']})"
    )
    p.add_argument(
        "--image-size", type=positive_int, metavar="PX", help=f"square side ({d['image_size']})"
    )
    p.add_argument(
        "--channels", type=int, choices=(1, 3), help="default: 1 if the first image is grey"
    )
    p.add_argument(
        "--timesteps", type=positive_int, metavar="T", help=f"linear schedule ({d['timesteps']})"
    )
    p.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps in all ({d['steps']})")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help=f"({d['batch_size']})")
    p.add_argument("--lr", type=float, metavar="LR", help=f"Adam learning rate ({d['lr']:g})")
    p.add_argument(
        "--warmup-steps",
        type=int,
        metavar="N",
        help=f"lr warm-up (min({d['warmup_steps']}, N/{WARMUP_FRACTION}))",
    )
    p.add_argument(
        "--ema-decay", type=float, metavar="D", help=f"({d['ema_decay']}, ramped up from 0.1)"
    )
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--seed", type=int, metavar="S", help=f"({d['seed']})")
    p.add_argument(
        "--sample-every", type=int, metavar="N", help=f"grid every N steps ({d['sample_every']})"
    )
    p.add_argument(
        "--checkpoint-every", type=int, metavar="N", help=f"every N steps ({d['checkpoint_every']})"
    )
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt if present")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="stop after this step (checkpointed), as an interruption would; resume later",
    )
    add_device(p)
    p.set_defaults(run=run)


def chosen(args: argparse.Namespace, flag: str) -> Any:
    """The flag's value if given, else its default."""
    value = getattr(args, flag)
    return DEFAULTS[flag] if value is None else value


class Run(NamedTuple):
    """What a run trains: its configs, seed, train split and, when resuming, its state."""

    model: Any
    diffusion: Any
    train: Any
    seed: int
    data: Path
    state: dict[str, Any] | None = None


def _check_args(args: argparse.Namespace, out: Path, checkpoint: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; expected a folder for the run")
    if checkpoint.exists() and not args.resume:
        raise CommandError(
            f"{checkpoint} exists: pass --resume to continue that run, or choose another --out"
        )
    for flag in _POSITIVE:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")


def _training_data(args: argparse.Namespace, out: Path, seed: int) -> Path:
    """The train split to read: a given prepared folder, or OUT/data prepared from the images."""
    from ddpm.data import prepare_dataset

    images = Path(args.images)
    check_folder(images, "--images")
    given = split_dir(images, "train")
    if given is not None:
        return given
    data = out / "data"
    if not (data / "train" / MANIFEST).is_file():
        print(f"preparing {images} -> {data} ({args.image_size}px, {args.channels} channel(s))")
        prepare_dataset(
            "image_folder",
            images,
            data,
            image_size=args.image_size,
            channels=args.channels,
            seed=seed,
            progress=progress(),
        )
    return data / "train"


def _resumed_run(args: argparse.Namespace, out: Path, checkpoint: Path) -> Run:
    """The run in `checkpoint`, refusing a flag that differs from its settings."""
    from ddpm.errors import reading_checkpoint
    from ddpm.training import TrainConfig, configs_of, load_checkpoint

    state = load_checkpoint(checkpoint)
    # A checkpoint whose config lacks a section is as unusable as a damaged file.
    with reading_checkpoint(checkpoint):
        saved = state["config"]
        kept = {
            flag: saved[field] if section is None else saved[section][field]
            for flag, (section, field) in RUN_FLAGS.items()
        }
        model_config, diffusion_config = configs_of(saved)
        steps = {} if args.steps is None else {"steps": args.steps}
        train_config = TrainConfig(**{**saved["train"], **steps})
        seed = int(saved["seed"])
        data = Path(state.get("meta", {}).get("data", out / "data" / "train"))
    for flag in RUN_FLAGS:
        given = getattr(args, flag)
        if given is not None and given != kept[flag]:
            raise CommandError(
                f"--{flag.replace('_', '-')} {given} differs from the run in {checkpoint} "
                f"({kept[flag]}); resuming keeps the run's settings (only --steps may change)"
            )
    if not (data / MANIFEST).is_file():  # e.g. a relative path from another folder
        args.image_size, args.channels = model_config.image_size, model_config.in_channels
        data = _training_data(args, out, seed)
    return Run(model_config, diffusion_config, train_config, seed, data, state)


def _prepared_data(args: argparse.Namespace, out: Path, seed: int) -> tuple[Path, int, int]:
    """(train split, image side, channels) of a fresh run, preparing the images if needed."""
    from ddpm.data import load_manifest

    size_given, channels_given = args.image_size, args.channels
    if args.channels is None and split_dir(Path(args.images), "train") is None:
        check_folder(Path(args.images), "--images")
        args.channels = 1 if is_grey(Path(args.images)) else 3
    args.image_size = chosen(args, "image_size")
    data = _training_data(args, out, seed)
    h, _, c = load_manifest(data)["shape"]
    for flag, given, found in (("--image-size", size_given, h), ("--channels", channels_given, c)):
        if given is not None and given != found:
            raise CommandError(
                f"{flag} {given}: the prepared images in {data} have {found}; prepare them "
                "again, or pass a folder of image files"
            )
    return data, h, c


def _fresh_run(args: argparse.Namespace, out: Path) -> Run:
    from ddpm.diffusion import DiffusionConfig
    from ddpm.nn import ModelConfig
    from ddpm.training import TrainConfig

    seed = chosen(args, "seed")
    data, size, channels = _prepared_data(args, out, seed)
    steps = chosen(args, "steps")
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(DEFAULTS["warmup_steps"], steps // WARMUP_FRACTION)
    train_config = TrainConfig(
        steps=steps,
        batch_size=chosen(args, "batch_size"),
        lr=chosen(args, "lr"),
        warmup_steps=warmup,
        ema_decay=chosen(args, "ema_decay"),
        # A short run's EMA would still be mostly the initialisation without the ramp.
        ema_warmup=True,
        flip=bool(args.flip),
    )
    return Run(
        ModelConfig(chosen(args, "config"), size, channels),
        DiffusionConfig(num_timesteps=chosen(args, "timesteps")),
        train_config,
        seed,
        data,
    )


def _dataset(run_: Run):
    """The run's shuffled train split, refused when its images do not fit the model."""
    from ddpm.data import ShardDataset

    dataset = ShardDataset(run_.data, seed=run_.seed, flip=run_.train.flip)
    model = run_.model
    if tuple(dataset.shape) != (model.image_size, model.image_size, model.in_channels):
        raise CommandError(
            f"{run_.data} holds images of shape {list(dataset.shape)} (HWC); the run's model "
            f"takes {model.image_size}px with {model.in_channels} channel(s)"
        )
    return dataset


def _grid_hook(samples_dir: Path, seed: int):
    """A hook writing a DDIM grid of the EMA model's samples at each due step."""
    import torch

    from ddpm.sampling import SamplerConfig, draw_images

    def draw_grid(trainer, window) -> None:
        steps = min(GRID_STEPS, trainer.diffusion.num_timesteps)
        images = draw_images(
            trainer.diffusion,
            trainer.ema.model,
            GRID_IMAGES,
            trainer.model.config.image_shape,
            SamplerConfig("ddim", num_steps=steps),
            batch_size=GRID_IMAGES,
            # The same starting noise at every step, so the grids show the model changing.
            generator=torch.Generator().manual_seed(seed),
            device=trainer.device,
        )
        samples_dir.mkdir(parents=True, exist_ok=True)
        write_png(samples_dir / f"step-{window.step:07d}.png", grid(images))

    return draw_grid


def _fit(args: argparse.Namespace, trainer, batches, checkpoint: Path, meta: dict, grids) -> None:
    """The loop with its progress bar, grids and checkpoints."""
    from tqdm.auto import tqdm

    from ddpm.training import Hook, fit, save_checkpoint

    total = trainer.config.steps
    with tqdm(
        total=total, initial=trainer.step, desc="training", unit="step", disable=not progress()
    ) as bar:

        def advance(tr, window) -> None:
            bar.update(window.step - bar.n)
            bar.set_postfix(loss=f"{sum(window.losses) / len(window.losses):.4f}")

        hooks = [
            Hook(advance),
            Hook(grids, every=chosen(args, "sample_every")),
            Hook(
                lambda tr, w: save_checkpoint(checkpoint, tr, meta),
                every=chosen(args, "checkpoint_every"),
            ),
        ]
        fit(trainer, batches, log_every=1, hooks=hooks, stop_after=args.stop_after)


def run(args: argparse.Namespace) -> int:
    from ddpm.training import Trainer, export_ema

    where = device(args.device)
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    _check_args(args, out, checkpoint)
    if args.resume and checkpoint.exists():
        run_ = _resumed_run(args, out, checkpoint)
    else:
        run_ = _fresh_run(args, out)
    trainer = Trainer.from_config(
        run_.model, run_.diffusion, run_.train, seed=run_.seed, device=where
    )
    if run_.state is not None:
        trainer.load_state_dict(run_.state)
    batches = _dataset(run_).step_batches(run_.train.batch_size, start_step=trainer.step)
    samples_dir = out / "samples"
    meta = {"data": str(run_.data)}
    _fit(args, trainer, batches, checkpoint, meta, _grid_hook(samples_dir, run_.seed))
    ema = export_ema(out / "ema.pt", trainer, meta={**meta, "config_name": run_.model.name})
    done = "finished" if trainer.step >= run_.train.steps else "stopped"
    print(
        f"{done} at step {trainer.step} of {run_.train.steps}: {checkpoint}, {ema}, "
        f"grids in {samples_dir} ({run_.model.name} U-Net, "
        f"{trainer.model.num_parameters():,} parameters)"
    )
    return 0
