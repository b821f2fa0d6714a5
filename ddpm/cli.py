"""The `ddpm` command: sample, score, train, convert and compare models in one process.

    ddpm sample  --checkpoint ema.pt --num 64 --out samples/          N PNGs + grid.png (or .npz)
    ddpm bpd     --checkpoint ema.pt --images DIR                     bits/dim ± standard error
    ddpm train   --images DIR --out runs/x                            grids, checkpoints, ema.pt
    ddpm convert --to-diffusers ema.pt --out DIR | --from-diffusers DIR --out ema.pt
    ddpm fid     DIR_A DIR_B                                          FID between two image sets

A thin layer over the library: every number comes from the functions the pipeline runs
(`ddpm.training.fit`, `ddpm.sampling.draw_images`, `ddpm.likelihood`, `ddpm.metrics`), and image
folders are read by `ddpm.data.ImageFolder`, the reader `prepare_dataset` uses, so a folder is
cropped, resized and converted the same way here as in the pipeline. No Ray, MLflow or DVC.

Every failure ends the command with exit status 1 and one line on stderr, printed in one place
(`main`): the library's readers name the file, key or tensor and what is wrong with it
(`ddpm.errors.InputError`, `CheckpointError` for checkpoints whichever command reads them), and
anything else is shown as its type and message (DDPM_TRACEBACK=1 prints the traceback as well).
`main` returns the status instead of raising, so tests call `main([...])` in-process. Progress
bars are drawn only when stderr is a terminal. Heavy imports (torch, the library) happen inside
the commands, so `ddpm --help` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Manifest file of a prepared split (ddpm.data.shards.MANIFEST), repeated here so that parsing
# the command line needs no library import.
_MANIFEST = "manifest.json"
# The picture `ddpm sample` writes beside the samples. Commands that read a folder of images
# leave a top-level file of this name out, so that a sample folder can be scored as it is.
SAMPLE_GRID = "grid.png"
# Images written into grid.png at most (the first ones): a picture, not an archive.
_GRID_MAX = 64
# Images and DDIM steps of the sample grids written during training.
_TRAIN_GRID = 16
_TRAIN_GRID_STEPS = 50
# PIL modes that hold one channel: an image folder of these trains a grey model by default.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class CommandError(Exception):
    """A mistake in the command's input, reported as one line without a traceback."""


# Set to print the traceback of a failure after its one-line message.
TRACEBACK_ENV = "DDPM_TRACEBACK"


def _progress() -> bool:
    """Whether to draw progress bars: only on a terminal, so that a log or a captured stderr
    holds messages, not bars."""
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def _load_model(path: str, device):
    """(EMA network, diffusion, meta) of an EMA export or a full checkpoint; whatever is wrong
    with the file (missing, not a torch file, a config out of bounds, weights of another shape
    or not finite) is a CheckpointError naming it, as `ddpm convert` reports it."""
    from ddpm.errors import reading_checkpoint
    from ddpm.training import load_ema_model

    with reading_checkpoint(path):
        return load_ema_model(path, device)


def _split_dir(path: Path, split: str) -> Path | None:
    """The prepared split folder `path` names (itself, or its `split` sub-folder); None when it
    is a folder of image files instead."""
    if (path / _MANIFEST).is_file():
        return path
    if (path / split / _MANIFEST).is_file():
        return path / split
    return None


def _check_folder(path: Path, flag: str) -> None:
    if not path.exists():
        raise CommandError(f"{flag}: folder not found: {path}")
    if not path.is_dir():
        raise CommandError(f"{flag}: {path} is a file; expected a folder of images or shards")


def _first_image(folder: Path) -> Path | None:
    from ddpm.data.readers import IMAGE_EXTENSIONS

    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p != folder / SAMPLE_GRID
    )
    return files[0] if files else None


def _image_batches(
    path: Path,
    *,
    flag: str,
    split: str,
    batch_size: int,
    limit: int | None,
    shape: tuple[int, int, int] | None,
    image_size: int | None = None,
) -> tuple[int, Iterator[Any], str]:
    """(image count, iterator of uint8 NHWC batches, description) of a folder of image files or
    of a prepared split. `shape` (C, H, W): what the images must be; image files are
    center-cropped and resized to it by `ImageFolder`, shards must already have it. Without
    `shape`, files are read at `image_size` (default: the shorter side of the first file)."""
    import numpy as np

    from ddpm.data import ImageFolder, load_manifest, read_shard
    from ddpm.data.readers import open_image
    from ddpm.errors import reading

    _check_folder(path, flag)
    split_dir = _split_dir(path, split)
    if split_dir is not None:
        with reading(split_dir, "prepared split"):
            manifest = load_manifest(split_dir)
        h, w, c = manifest["shape"]
        if shape is not None and (c, h, w) != tuple(shape):
            raise CommandError(
                f"{flag}: {split_dir} holds {h}x{w} images with {c} channel(s); the model takes "
                f"{shape[1]}x{shape[2]} with {shape[0]}: pass a folder of image files (they are "
                "resized on reading) or prepare the data at that size"
            )
        total = manifest["count"] if limit is None else min(limit, manifest["count"])

        def shard_batches() -> Iterator[np.ndarray]:
            left = total
            for index in range(len(manifest["shards"])):
                if left <= 0:
                    return
                with reading(split_dir, "prepared split"):
                    images, _, _ = read_shard(split_dir, manifest, index)
                images = images[:left]
                left -= len(images)
                for start in range(0, len(images), batch_size):
                    yield images[start : start + batch_size]

        return total, shard_batches(), f"{total} images of the prepared split {split_dir}"

    if shape is not None:
        channels, size = shape[0], shape[1]
    else:
        first = _first_image(path)
        if first is None:
            raise CommandError(f"{flag}: {path} holds no .png/.jpg/.jpeg/.webp files")
        channels = 3  # the Inception network reads RGB (grey is repeated to three channels)
        if image_size is None:
            try:
                with open_image(first) as image:
                    image_size = min(image.size)
            except (OSError, ValueError) as err:
                raise CommandError(f"{flag}: {first} is not a readable image ({err})") from None
        size = image_size
    # Every file must decode: a scoring command should not quietly skip data. The limit is
    # applied here rather than by max_images, so that the skipped grid does not count.
    with reading(path, "image folder"):
        reader = ImageFolder(
            path,
            image_size=size,
            mode="L" if channels == 1 else "RGB",
            test_fraction=0.0,
            max_corrupt_fraction=0.0,
        )
    grid = (path / SAMPLE_GRID) in reader.files
    available = len(reader.files) - grid
    total = available if limit is None else min(limit, available)

    def file_batches() -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        taken = 0
        with reading(path, "image folder"):
            for image, _, source in reader.iter_split("train"):
                if taken == total:
                    break
                if source == SAMPLE_GRID:
                    continue
                batch.append(image)
                taken += 1
                if len(batch) == batch_size:
                    yield np.stack(batch)
                    batch = []
        if batch:
            yield np.stack(batch)

    skipped = f" (not its {SAMPLE_GRID})" if grid else ""
    return total, file_batches(), f"{total} image files in {path}{skipped} at {size}x{size}"


class _Counted:
    """The network, advancing a progress bar on every call: samplers and bounds call it once a
    step, so one bar shows the whole command's progress across batches."""

    def __init__(self, model, bar) -> None:
        self.model, self.bar = model, bar

    def __call__(self, x, t):
        out = self.model(x, t)
        self.bar.update(1)
        return out


def _write_png(path: Path, image) -> None:
    from ddpm.images import png_bytes
    from ddpm.io_utils import atomic_write

    with atomic_write(path, "wb") as handle:
        handle.write(png_bytes(image))


def _grid(images):
    from ddpm.images import image_grid

    shown = images[:_GRID_MAX]
    return image_grid(shown, ncol=math.ceil(math.sqrt(len(shown))))


# ---------------------------------------------------------------------------------------------
# ddpm sample


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ddpm.sampling import SamplerConfig, draw_images
    from ddpm.validation import ConfigError

    device = _device(args.device)
    out = Path(args.out)
    model, diffusion, meta = _load_model(args.checkpoint, device)
    try:
        config = SamplerConfig(args.sampler, args.steps, args.eta, not args.no_clip)
    except ConfigError as err:
        flags = {"method": "--sampler", "num_steps": "--steps", "eta": "--eta"}
        raise CommandError(
            "; ".join(f"{flags.get(name, name)}: {message}" for name, message in err.problems)
        ) from None
    if args.steps is not None and args.steps > diffusion.num_timesteps:
        raise CommandError(
            f"--steps {args.steps}: the model's chain has only {diffusion.num_timesteps} steps"
        )
    steps = args.steps or diffusion.num_timesteps
    shape = model.config.image_shape
    batches = math.ceil(args.num / args.batch_size)
    # The noise comes from one CPU generator, so a seed gives the same images on any device.
    generator = torch.Generator().manual_seed(args.seed)
    with tqdm(
        total=batches * steps,
        desc=f"sampling ({args.sampler})",
        unit="step",
        disable=not _progress(),
    ) as bar:
        images = draw_images(
            diffusion,
            _Counted(model, bar),
            args.num,
            shape,
            config,
            batch_size=args.batch_size,
            generator=generator,
            device=device,
        )
    if out.suffix == ".npz":
        from ddpm.io_utils import atomic_write

        with atomic_write(out, "wb") as handle:
            np.savez(handle, images=images)
        print(f"wrote {len(images)} images {tuple(images.shape[1:])} (uint8 NHWC) to {out}")
        return 0
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder, or a path ending in .npz")
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        range(len(images)), desc="writing PNGs", unit="img", leave=False, disable=not _progress()
    )
    for index in bar:
        _write_png(out / f"{index:06d}.png", images[index])
    _write_png(out / SAMPLE_GRID, _grid(images))
    print(
        f"wrote {len(images)} PNGs and grid.png to {out} (model step {meta['step']}, "
        f"{args.sampler}, {steps} steps, seed {args.seed})"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# ddpm bpd


def cmd_bpd(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ddpm.evaluation import mean_and_stderr
    from ddpm.likelihood import bits_per_dim, mc_bits_per_dim, mc_plan

    device = _device(args.device)
    model, diffusion, _ = _load_model(args.checkpoint, device)
    shape = model.config.image_shape
    total, batches, described = _image_batches(
        Path(args.images),
        flag="--images",
        split=args.split,
        batch_size=args.batch_size,
        limit=args.num,
        shape=shape,
    )
    if total == 0:
        raise CommandError(f"--images: {args.images} holds no images")
    calls = diffusion.num_timesteps if args.exact else mc_plan(diffusion.num_timesteps).num_calls
    # One generator consumed batch after batch: the same seed, images and batch size give the
    # same draws of t and noise for every model (common random numbers).
    generator = torch.Generator().manual_seed(args.seed)
    per_image = []
    kind = "the full bound (all T terms)" if args.exact else "Monte-Carlo estimate of the bound"
    total_calls = math.ceil(total / args.batch_size) * calls
    with tqdm(total=total_calls, desc="bits/dim", unit="call", disable=not _progress()) as bar:
        counted = _Counted(model, bar)
        for batch in batches:
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
            if args.exact:
                values = bits_per_dim(diffusion, counted, x, generator=generator)["total"]
            else:
                values = mc_bits_per_dim(diffusion, counted, x, generator=generator)["bpd"]
            per_image.append(values.double().cpu())
    mean, stderr = mean_and_stderr(torch.cat(per_image))
    print(f"bits/dim: {mean:.4f} ± {stderr:.4f} ({kind}; {described})")
    return 0


# ---------------------------------------------------------------------------------------------
# ddpm train

# Flags whose value is fixed by the checkpoint when resuming -> (config section, field).
_RUN_FLAGS = {
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


def _grey(folder: Path) -> bool:
    from ddpm.data.readers import open_image

    first = _first_image(folder)
    if first is None:
        return False
    try:
        with open_image(first) as image:
            return image.mode in _GREY_MODES
    except (OSError, ValueError):
        return False  # prepare_dataset reports the file


def _training_data(args: argparse.Namespace, out: Path, seed: int) -> Path:
    """The train split to read: a given prepared folder, or OUT/data prepared from the images."""
    from ddpm.data import prepare_dataset

    images = Path(args.images)
    _check_folder(images, "--images")
    given = _split_dir(images, "train")
    if given is not None:
        return given
    data = out / "data"
    if not (data / "train" / _MANIFEST).is_file():
        print(f"preparing {images} -> {data} ({args.image_size}px, {args.channels} channel(s))")
        prepare_dataset(
            "image_folder",
            images,
            data,
            image_size=args.image_size,
            channels=args.channels,
            seed=seed,
            progress=_progress(),
        )
    return data / "train"


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ddpm.data import ShardDataset, load_manifest
    from ddpm.diffusion import DiffusionConfig
    from ddpm.errors import reading_checkpoint
    from ddpm.nn import ModelConfig
    from ddpm.training import (
        Hook,
        TrainConfig,
        Trainer,
        configs_of,
        export_ema,
        fit,
        load_checkpoint,
        save_checkpoint,
    )

    device = _device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; expected a folder for the run")
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not args.resume:
        raise CommandError(
            f"{checkpoint} exists: pass --resume to continue that run, or choose another --out"
        )
    for flag in ("steps", "sample_every", "checkpoint_every", "stop_after"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")

    state = None
    if args.resume and checkpoint.exists():
        with reading_checkpoint(checkpoint):
            state = load_checkpoint(checkpoint)
            saved = state["config"]
            kept = {
                flag: saved[field] if section is None else saved[section][field]
                for flag, (section, field) in _RUN_FLAGS.items()
            }
            model_config, diffusion_config = configs_of(saved)
            train_config = TrainConfig(**{**saved["train"], **_given(args, steps="steps")})
            seed = int(saved["seed"])
            data = Path(state.get("meta", {}).get("data", out / "data" / "train"))
        for flag in _RUN_FLAGS:
            given = getattr(args, flag)
            if given is not None and given != kept[flag]:
                raise CommandError(
                    f"--{flag.replace('_', '-')} {given} differs from the run in {checkpoint} "
                    f"({kept[flag]}); resuming keeps the run's settings (only --steps may change)"
                )
        if not (data / _MANIFEST).is_file():  # e.g. a relative path from another folder
            args.image_size, args.channels = model_config.image_size, model_config.in_channels
            data = _training_data(args, out, seed)
    else:
        seed = 0 if args.seed is None else args.seed
        size_given, channels_given = args.image_size, args.channels
        if args.channels is None and _split_dir(Path(args.images), "train") is None:
            _check_folder(Path(args.images), "--images")
            args.channels = 1 if _grey(Path(args.images)) else 3
        if args.image_size is None:
            args.image_size = 32
        data = _training_data(args, out, seed)
        h, _, c = load_manifest(data)["shape"]
        checks = (("--image-size", size_given, h), ("--channels", channels_given, c))
        for flag, given, found in checks:
            if given is not None and given != found:
                raise CommandError(
                    f"{flag} {given}: the prepared images in {data} have {found}; prepare them "
                    "again, or pass a folder of image files"
                )

        def chosen(value, default):
            return default if value is None else value

        steps = chosen(args.steps, 10_000)
        model_config = ModelConfig(chosen(args.config, "small"), h, c)
        diffusion_config = DiffusionConfig(num_timesteps=chosen(args.timesteps, 1000))
        train_config = TrainConfig(
            steps=steps,
            batch_size=chosen(args.batch_size, 64),
            lr=chosen(args.lr, 2e-4),
            warmup_steps=chosen(args.warmup_steps, min(5000, steps // 10)),
            ema_decay=chosen(args.ema_decay, 0.9999),
            # A short run's EMA would still be mostly the initialisation without the ramp.
            ema_warmup=True,
            flip=bool(args.flip),
        )

    trainer = Trainer.from_config(
        model_config, diffusion_config, train_config, seed=seed, device=device
    )
    if state is not None:
        trainer.load_state_dict(state)
    dataset = ShardDataset(data, seed=seed, flip=train_config.flip)
    if tuple(dataset.shape) != (
        model_config.image_size,
        model_config.image_size,
        model_config.in_channels,
    ):
        raise CommandError(
            f"{data} holds images of shape {list(dataset.shape)} (HWC); the run's model takes "
            f"{model_config.image_size}px with {model_config.in_channels} channel(s)"
        )
    batches = dataset.step_batches(train_config.batch_size, start_step=trainer.step)
    image_shape = trainer.model.config.image_shape
    samples_dir = out / "samples"
    meta = {"data": str(data)}

    def draw_grid(tr: Trainer, window) -> None:
        import torch

        from ddpm.sampling import SamplerConfig, draw_images

        steps = min(_TRAIN_GRID_STEPS, tr.diffusion.num_timesteps)
        images = draw_images(
            tr.diffusion,
            tr.ema.model,
            _TRAIN_GRID,
            image_shape,
            SamplerConfig("ddim", num_steps=steps),
            batch_size=_TRAIN_GRID,
            # The same starting noise at every step, so the grids show the model changing.
            generator=torch.Generator().manual_seed(seed),
            device=tr.device,
        )
        samples_dir.mkdir(parents=True, exist_ok=True)
        _write_png(samples_dir / f"step-{window.step:07d}.png", _grid(images))

    sample_every = args.sample_every or 1000
    checkpoint_every = args.checkpoint_every or 1000
    with tqdm(
        total=train_config.steps,
        initial=trainer.step,
        desc="training",
        unit="step",
        disable=not _progress(),
    ) as bar:

        def advance(tr: Trainer, window) -> None:
            bar.update(window.step - bar.n)
            bar.set_postfix(loss=f"{sum(window.losses) / len(window.losses):.4f}")

        hooks = [
            Hook(advance),
            Hook(draw_grid, every=sample_every),
            Hook(lambda tr, w: save_checkpoint(checkpoint, tr, meta), every=checkpoint_every),
        ]
        fit(trainer, batches, log_every=1, hooks=hooks, stop_after=args.stop_after)
    ema = export_ema(out / "ema.pt", trainer, meta={**meta, "config_name": model_config.name})
    done = "finished" if trainer.step >= train_config.steps else "stopped"
    print(
        f"{done} at step {trainer.step} of {train_config.steps}: {checkpoint}, {ema}, "
        f"grids in {samples_dir} ({model_config.name} U-Net, "
        f"{trainer.model.num_parameters():,} parameters)"
    )
    return 0


def _given(args: argparse.Namespace, **fields: str) -> dict[str, Any]:
    """{config field: value} of the flags the user actually passed."""
    return {
        field: getattr(args, flag)
        for field, flag in fields.items()
        if getattr(args, flag) is not None
    }


# ---------------------------------------------------------------------------------------------
# ddpm convert


def cmd_convert(args: argparse.Namespace) -> int:
    from ddpm.convert import (
        SCHEDULER_CONFIG,
        UNET_CONFIG,
        UNET_WEIGHTS,
        export_diffusers,
        import_diffusers,
    )

    if args.to_diffusers:
        if not Path(args.to_diffusers).is_file():
            raise CommandError(f"--to-diffusers: checkpoint not found: {args.to_diffusers}")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out} is a file; the diffusers format is a folder")
        export_diffusers(args.to_diffusers, out, progress=_progress())
        print(f"wrote {out}: {UNET_CONFIG}, {UNET_WEIGHTS}, {SCHEDULER_CONFIG}")
        return 0
    src = Path(args.from_diffusers)
    if not src.is_dir():
        raise CommandError(f"--from-diffusers: folder not found: {src}")
    path = import_diffusers(src, args.out, progress=_progress())
    print(f"wrote {path} (EMA export; ddpm sample --checkpoint {path} ...)")
    return 0


# ---------------------------------------------------------------------------------------------
# ddpm fid


def cmd_fid(args: argparse.Namespace) -> int:
    from ddpm.errors import reading
    from ddpm.metrics import accumulate_features, frechet_distance, resolve_fid_weights

    device = _device(args.device)
    # Find the weights before reading any image: a missing file is the likely mistake here.
    try:
        weights = resolve_fid_weights(args.weights)
    except FileNotFoundError as err:
        raise CommandError(f"{err} Here: --weights FILE.") from None
    with reading(weights, "FID Inception weights file"):
        network = load_fid_inception(weights, device=device)
    stats = []
    for flag, folder in (("DIR_A", args.dir_a), ("DIR_B", args.dir_b)):
        total, batches, described = _image_batches(
            Path(folder),
            flag=flag,
            split=args.split,
            batch_size=args.batch_size,
            limit=args.num,
            shape=None,
            image_size=args.image_size,
        )
        if total < 2:
            raise CommandError(f"{flag}: {folder} holds {total} image(s); FID needs at least 2")
        print(f"{flag}: {described}", file=sys.stderr)
        features, _ = accumulate_features(
            network,
            batches,
            device=device,
            progress=_progress(),
            desc=f"Inception features {flag}",
        )
        stats.append(features)
    a, b = stats
    fid = frechet_distance(a.mean, a.cov, b.mean, b.cov)
    print(f"FID: {fid:.4f} ({a.count} vs {b.count} images; {network.extractor_id})")
    return 0


def load_fid_inception(weights, device):
    """The FID network (a seam: tests put a random-weight network here)."""
    from ddpm.metrics import load_fid_inception as load

    return load(weights, device=device)


# ---------------------------------------------------------------------------------------------
# The parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs (auto: cuda when available, else cpu)",
    )


def build_parser() -> argparse.ArgumentParser:
    from ddpm import __version__

    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="Denoising Diffusion Probabilistic Models (Ho et al. 2020): sample, score, "
        "train, convert and compare models from the shell.",
    )
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "sample",
        help="draw images from a checkpoint",
        description="Draw images from a checkpoint (EMA export or full checkpoint). Image shape, "
        "channels and schedule come from the checkpoint; the same seed and batch size give the "
        "same images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="ema.pt or checkpoint.pt")
    p.add_argument("--num", type=_positive_int, required=True, metavar="N", help="images to draw")
    p.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral")
    p.add_argument(
        "--steps",
        type=_positive_int,
        metavar="K",
        help="evenly spaced steps of the chain (default: all T)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR|FILE.npz",
        help="a folder for N PNGs + grid.png, or a .npz file for one uint8 NHWC array 'images'",
    )
    _add_device(p)
    p.set_defaults(run=cmd_sample)

    p = commands.add_parser(
        "bpd",
        help="negative log-likelihood bound in bits/dim",
        description="The variational bound (Eq. 5) in bits/dim on a set of images: a Monte-Carlo "
        "estimate by default, all T terms with --exact. Prints mean ± standard error over images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="a folder of image files (center-cropped and resized to the model's size and "
        "channels), or a prepared split folder (a dataset root: its --split)",
    )
    p.add_argument("--exact", action="store_true", help="all T terms (T network calls a batch)")
    p.add_argument("--num", type=_positive_int, metavar="N", help="score only N images")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B")
    p.add_argument("--seed", type=int, default=0, help="seed of the t and noise draws")
    p.add_argument("--split", default="test", help="split of a prepared dataset root")
    _add_device(p)
    p.set_defaults(run=cmd_bpd)

    p = commands.add_parser(
        "train",
        help="train a model on a folder of images",
        description="Train with the library's loop (ddpm.training.fit) in this process: "
        "progress bar, a sample grid and a checkpoint every N steps, OUT/ema.pt at the end. The "
        "images are prepared into shards in OUT/data once. --resume continues a run exactly "
        "(the same weights as an uninterrupted run).",
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="a folder of image files (class sub-folders allowed) or a prepared dataset",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    p.add_argument("--config", help="U-Net config: tiny, small (default), cifar10, celebahq256")
    p.add_argument("--image-size", type=_positive_int, metavar="PX", help="square side (32)")
    p.add_argument(
        "--channels", type=int, choices=(1, 3), help="default: 1 if the first image is grey"
    )
    p.add_argument("--timesteps", type=_positive_int, metavar="T", help="linear schedule (1000)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps in all (10000)")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="(64)")
    p.add_argument("--lr", type=float, metavar="LR", help="Adam learning rate (2e-4)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="lr warm-up (min(5000, N/10))")
    p.add_argument("--ema-decay", type=float, metavar="D", help="(0.9999, ramped up from 0.1)")
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--seed", type=int, metavar="S", help="(0)")
    p.add_argument("--sample-every", type=int, metavar="N", help="grid every N steps (1000)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="every N steps (1000)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt if present")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="stop after this step (checkpointed), as an interruption would; resume later",
    )
    _add_device(p)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser(
        "convert",
        help="to or from diffusers' UNet2DModel",
        description="Convert between this project's checkpoints and a diffusers folder "
        "(UNet2DModel + DDPMScheduler, the layout of google/ddpm-cifar10-32).",
    )
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--to-diffusers", metavar="FILE", help="ema.pt or checkpoint.pt to export")
    side.add_argument("--from-diffusers", metavar="DIR", help="diffusers folder to import")
    p.add_argument("--out", required=True, help="DIR for --to-diffusers, FILE for --from-diffusers")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser(
        "fid",
        help="FID between two image sets",
        description="Fréchet Inception Distance between two folders of images or prepared "
        "splits, with pytorch-fid's Inception weights (never downloaded: the torch hub cache, "
        "or --weights).",
    )
    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    p.add_argument("--weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=_positive_int, default=50, metavar="B")
    p.add_argument("--num", type=_positive_int, metavar="N", help="use the first N of each set")
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help="side image files are cropped/resized to (default: the first file's shorter side)",
    )
    p.add_argument("--split", default="train", help="split of a prepared dataset root")
    _add_device(p)
    p.set_defaults(run=cmd_fid)
    return parser


def error_line(err: BaseException) -> str:
    """The one line a failure is reported as: the message of an error about the input (which
    names the file, key or tensor), else the error's type and message."""
    from ddpm.errors import describe, one_line

    if isinstance(err, (CommandError, ValueError, OSError)):
        return one_line(str(err)) or describe(err)
    return describe(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 an error reported on stderr as one
    line, 130 interrupted). The only place the command prints an error."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"ddpm {args.command}: error: {error_line(err)}", file=sys.stderr, flush=True)
        if os.environ.get(TRACEBACK_ENV):
            import traceback

            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
