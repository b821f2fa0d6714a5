"""train stage: Algorithm 1 with EMA as a Ray Train `TorchTrainer` (DDP), resumable.

    python -m pipelines.train                       # under `dvc repro`, from the repository root
    ray job submit --working-dir . \\
        --runtime-env-json '{"env_vars": {"DDPM_REPO_ROOT": "'$PWD'"}}' \\
        -- python -m pipelines.train                # the same stage as a Ray job

Where outputs go: every path comes from params and is made absolute against
`pipelines.common.repo_root()` in the driver: $DDPM_REPO_ROOT when set (a submitted job runs in a
temporary copy of the working directory, so it must be told where the repository is), otherwise
the nearest directory above the current one holding dvc.yaml / params.yaml. Workers receive only
absolute paths and the absolute MLflow tracking URI.

Outputs (declared in dvc.yaml):
    <train.out_dir>/ema.pt           EMA weights + the configs that rebuild them (export_ema)
    <evaluate.out_dir>/train.json    final loss, steps, wall time, throughput, resume point
    <evaluate.plots_dir>/loss.csv    step,loss: the global batch's mean L_simple at every step
Scratch state (not a DVC output, so DVC never deletes it):
    <train.storage_path>/train-<key>/step-XXXXXXXX/checkpoint.pt   (+ replica-<rank>.sha256)

Data: each worker streams its own contiguous share of the prepared train split's Parquet shards
(`ddpm.data.ShardDataset` with rank/world_size) in batches of train.batch_size / num_workers, so
one step sees one global batch. Every random choice of step s on rank r is a pure function of
(seed, r, s) (see ddpm/training.py) and the data order of (seed, epoch), hence:

Resume: the run folder's key hashes every param that shapes the trajectory (seed, model,
diffusion, train except steps and bookkeeping keys, and the train shards' checksums), so a changed
param starts a fresh run while `train.steps` may grow to continue one. A rerun with the same key
continues from the newest checkpoint with step <= train.steps: Ray Train V2 restores its own
checkpoint record for the same storage_path/name (`ray.train.get_checkpoint()`); the driver also
scans the folder itself and hands the newest loadable checkpoint to the workers, which covers a
crash between a checkpoint's upload and Ray's record of it. Workers take whichever is newer,
skip the batches of the epoch already seen, and continue with the same updates an uninterrupted
run makes (same number of workers). `train.resume: false` deletes the run folder first.

Every checkpoint also carries one parameter digest per rank; the driver checks that all replicas
are bit-identical (DDP kept them in sync) before it exports the EMA weights.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.config import Params
from ddpm.io_utils import atomic_write, write_json
from ddpm.training import (
    TrainConfig,
    Trainer,
    build_diffusion,
    export_ema,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from pipelines.common import absolute, gpu_available, stage_main

CHECKPOINT_FILE = "checkpoint.pt"
REPLICA_FILE = "replica-{rank}.sha256"
STEP_DIR = "step-{step:08d}"
# train keys that do not change the sequence of updates, so they stay out of the run key:
# bookkeeping, placement, and `steps` (a larger value continues the same run).
_NOT_IN_RUN_KEY = (
    "steps",
    "resume",
    "log_every",
    "checkpoint_every",
    "checkpoints_to_keep",
    "use_gpu",
    "cpus_per_worker",
    "storage_path",
    "out_dir",
)


# ---------------------------------------------------------------------------------------------
# What the driver hands the workers


def model_config(params: Params) -> dict[str, Any]:
    return {
        "name": params.model.config,
        "image_size": params.image_size,
        "in_channels": params.channels,
        "overrides": dict(params.model.overrides),
    }


def diffusion_config(params: Params) -> dict[str, Any]:
    return dataclasses.asdict(params.diffusion)


def train_config(params: Params, lr: float | None = None) -> TrainConfig:
    t = params.train
    # Flips are drawn by the dataset (per row, from the seed and epoch), not by the trainer.
    return TrainConfig(
        lr=t.lr if lr is None else lr,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip,
        ema_decay=t.ema_decay,
        ema_warmup=t.ema_warmup,
        flip=False,
        precision=t.precision,
        seed=params.seed,
    )


def data_digest(data_dir: Path) -> str:
    """The prepared train split's identity: its shape and the sha256 of every shard."""
    manifest_path = data_dir / "train" / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: run the prepare stage first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    ident = {"shape": manifest["shape"], "shards": [s["sha256"] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def run_name(params: Params, data_dir: Path) -> str:
    """`train-<key>`: equal for exactly the params whose checkpoints may be resumed."""
    tree = params.to_dict()
    payload = {
        "seed": tree["seed"],
        "model": model_config(params),
        "diffusion": tree["diffusion"],
        "train": {k: v for k, v in tree["train"].items() if k not in _NOT_IN_RUN_KEY},
        "data": data_digest(data_dir),
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"train-{key[:12]}"


def _step_of(checkpoint: Path) -> int:
    """The step in a checkpoint's folder name (STEP_DIR); ValueError for other names."""
    return int(checkpoint.parent.name.removeprefix("step-"))


def find_resume_checkpoint(run_dir: Path, max_step: int) -> Path | None:
    """The newest loadable checkpoint in `run_dir` whose step is <= max_step, if any."""
    candidates = []
    for path in run_dir.glob("step-*/" + CHECKPOINT_FILE):
        try:
            candidates.append((_step_of(path), path))
        except ValueError:
            continue
    for step, path in sorted(candidates, reverse=True):
        if step > max_step:
            continue
        try:
            load_checkpoint(path)
        except Exception as err:  # a half-uploaded or corrupt file: fall back to an older one
            print(f"[train] skipping unreadable checkpoint {path}: {err}", flush=True)
            continue
        return path
    return None


# ---------------------------------------------------------------------------------------------
# The worker loop (also used by the tune stage's trials)


def epoch_batches(dataset, local_batch: int, start_step: int) -> Iterator[torch.Tensor]:
    """Batches of this rank's share, endlessly, starting at global step `start_step`.

    An epoch is len(dataset) // local_batch steps on every rank (the dataset gives each rank the
    same number of rows), so step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.
    """
    from torch.utils.data import DataLoader

    steps_per_epoch = len(dataset) // local_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"each worker gets {len(dataset)} training images per epoch, fewer than its batch of "
            f"{local_batch} (train.batch_size / workers): lower train.batch_size or use more data"
        )
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=local_batch, drop_last=True)
        for index, (images, _labels) in enumerate(loader):
            if index >= skip:
                yield images
        skip = 0
        epoch += 1


class _MlflowLogger:
    """Rank 0's per-step metrics, sent to an MLflow run that the driver opened."""

    def __init__(self, spec: dict[str, str] | None) -> None:
        self.client = None
        if spec:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec["tracking_uri"])
            self.run_id = spec["run_id"]

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self.client is None or not rows:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, step)
            for step, values in rows
            for key, value in values.items()
            if math.isfinite(value)
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])


def _mean_over_ranks(values: list[float]) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
        tensor = tensor.cpu() / dist.get_world_size()
    return tensor.tolist()


class _Evaluator:
    """Rank 0's schedule-independent score of the EMA model on held-out test images.

    "mc_bpd": the Monte-Carlo estimate of the bound (Eq. 5) in bits/dim; "classifier_fd": the
    Fréchet distance between the offline classifier's features of DDIM samples and of the test
    images. Both draw from a fixed seed, so every trial is scored on the same t, noise and
    starting points (common random numbers make the comparison less noisy).
    """

    def __init__(self, spec: dict[str, Any], device: torch.device) -> None:
        from ddpm.data import load_split

        self.spec, self.device = spec, device
        self.images, _ = load_split(spec["data_dir"], "test", max_rows=spec["images"])
        if spec["metric"] == "classifier_fd":
            from ddpm.metrics import accumulate_features, load_classifier

            self.classifier = load_classifier(spec["classifier"]).to(device)
            self.reference, _ = accumulate_features(self.classifier, [self._nhwc(self.images)])

    @staticmethod
    def _nhwc(images_uint8: torch.Tensor) -> np.ndarray:
        return images_uint8.permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, trainer: Trainer) -> float:
        generator = torch.Generator().manual_seed(self.spec["seed"])
        if self.spec["metric"] == "mc_bpd":
            from ddpm.likelihood import mc_bits_per_dim

            out = mc_bits_per_dim(
                trainer.diffusion,
                trainer.ema.model,
                self.images.to(self.device),
                num_t=self.spec["num_t"],
                generator=generator,
            )
            return float(out["mean"])
        from ddpm.metrics import accumulate_features, frechet_distance
        from ddpm.sampling import sample

        x = sample(
            trainer.diffusion,
            trainer.ema.model,
            tuple(self.images.shape),
            method="ddim",
            num_steps=self.spec["sample_steps"],
            generator=generator,
            device=self.device,
        )
        samples = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        stats, _ = accumulate_features(self.classifier, [self._nhwc(samples)])
        ref = self.reference
        return float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov))


def train_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, then Algorithm 1 until cfg["steps"].

    cfg keys: model, diffusion, train (TrainConfig fields), steps, batch_size (global),
    data_dir, data_seed, flip, threads, log_every, checkpoint_every (0: only at the end),
    stop_after (None or a step after whose checkpoint to return), resume_from (path or None),
    mlflow ({tracking_uri, run_id} or None), eval (None, or {metric, every, images, num_t,
    sample_steps, seed, data_dir, classifier}: rank 0 adds the `_Evaluator` score of the EMA
    model to its reports under the metric's name).
    """
    import ray.train
    import ray.train.torch

    from ddpm.data import ShardDataset

    torch.set_num_threads(max(1, int(cfg["threads"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    trainer = Trainer.from_config(
        cfg["model"],
        cfg["diffusion"],
        TrainConfig(**cfg["train"]),
        device=device,
        rank=rank,
        wrap=ray.train.torch.prepare_model,
    )

    # Resume from whichever is newer: Ray's own record or the driver's scan of the run folder.
    candidates = []
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            path = Path(folder) / CHECKPOINT_FILE
            state = load_checkpoint(path, map_location="cpu")
            if state["step"] <= cfg["steps"]:
                candidates.append((state["step"], path, state))
    if cfg.get("resume_from"):
        state = load_checkpoint(cfg["resume_from"], map_location="cpu")
        candidates.append((state["step"], cfg["resume_from"], state))
    history: list[float] = []
    resumed_from = 0
    if candidates:
        resumed_from, path, state = max(candidates, key=lambda c: c[0])
        trainer.load_state_dict(state)
        history = [float(v) for v in state["meta"].get("loss_history", torch.zeros(0)).tolist()]
        if len(history) != resumed_from:
            raise ValueError(
                f"{path}: loss history has {len(history)} entries, step {resumed_from}"
            )
        if rank == 0:
            print(f"[train] resumed from {path} at step {resumed_from}", flush=True)

    dataset = ShardDataset(
        cfg["data_dir"],
        "train",
        flip=cfg["flip"],
        seed=cfg["data_seed"],
        rank=rank,
        world_size=world,
    )
    local_batch = cfg["batch_size"] // world
    batches = epoch_batches(dataset, local_batch, trainer.step)
    eval_spec = cfg.get("eval")
    evaluator = _Evaluator(eval_spec, device) if eval_spec and rank == 0 else None
    logger = _MlflowLogger(cfg.get("mlflow") if rank == 0 else None)

    steps, log_every = cfg["steps"], max(1, int(cfg["log_every"]))
    checkpoint_every = int(cfg.get("checkpoint_every") or 0)
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    while trainer.step < steps:
        out = trainer.train_step(next(batches).to(device))
        window.append(out)
        step = trainer.step
        is_checkpoint = step == steps or (checkpoint_every and step % checkpoint_every == 0)
        is_checkpoint = is_checkpoint or step == cfg.get("stop_after")
        is_eval = bool(eval_spec) and (step % eval_spec["every"] == 0 or step == steps)
        if not (step % log_every == 0 or is_checkpoint or is_eval):
            continue

        # All ranks reach this point at the same steps: the collectives and reports line up.
        losses = _mean_over_ranks([w["loss"] for w in window])
        history.extend(losses)
        elapsed = time.perf_counter() - window_start
        first = step - len(window) + 1
        # Per step: the global batch's loss, and the lr, gradient norm and EMA decay, which
        # every rank shares (the norm is taken after DDP's all-reduce, before clipping).
        rows = [
            (first + i, {"loss": loss, **{k: w[k] for k in ("lr", "grad_norm", "ema_decay")}})
            for i, (loss, w) in enumerate(zip(losses, window, strict=True))
        ]
        summary = {"images_per_second": cfg["batch_size"] * len(window) / max(elapsed, 1e-9)}
        metrics = {
            **rows[-1][1],
            "step": step,
            "resumed_from": resumed_from,
            "loss": float(np.mean(losses)),  # over the window, for Ray's progress table
            **summary,
        }
        if is_eval and evaluator is not None:
            metrics[eval_spec["metric"]] = summary[eval_spec["metric"]] = evaluator(trainer)
        rows[-1][1].update(summary)
        logger.log(rows)
        window = []

        if is_checkpoint:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    meta = {"loss_history": torch.tensor(history, dtype=torch.float64)}
                    save_checkpoint(Path(folder) / CHECKPOINT_FILE, trainer, meta=meta)
                digest = state_digest(trainer.model.state_dict())
                (Path(folder) / REPLICA_FILE.format(rank=rank)).write_text(digest + "\n")
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(folder),
                    checkpoint_dir_name=STEP_DIR.format(step=step),
                )
        else:
            ray.train.report(metrics)
        if step == cfg.get("stop_after"):
            break
        window_start = time.perf_counter()
    if trainer.step == resumed_from:
        # Nothing left to do (Ray restored a finished run): one report keeps the ranks in step
        # and tells the driver where the run stood.
        ray.train.report({"step": trainer.step, "resumed_from": resumed_from})
    if rank == 0:
        print(f"[train] worker loop ends at step {trainer.step} (from {resumed_from})", flush=True)


# ---------------------------------------------------------------------------------------------
# The driver


def forward_noising_strip(params: Params, data_dir: Path, columns: int = 8) -> np.ndarray:
    """uint8 HWC picture of q(x_t | x_0) (Eq. 4): rows are images, columns t from 1 to T."""
    from ddpm.data import load_split
    from ddpm.data.dataset import to_model_range

    images, _ = load_split(data_dir, "train", max_rows=4)
    x0 = to_model_range(images)
    diffusion = build_diffusion(diffusion_config(params))
    ts = np.linspace(0, diffusion.num_timesteps - 1, columns).round().astype(np.int64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(params.seed))
    n, c, h, w = x0.shape
    pad = 2
    canvas = np.full((n * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for j, t in enumerate(ts):
        x_t = diffusion.q_sample(x0, torch.full((n,), int(t)), noise).clamp(-1, 1)
        tiles = ((x_t + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = tiles[i]
    return canvas if c == 3 else canvas[..., 0]


def write_loss_csv(path: Path, history: list[float]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows([step + 1, f"{loss:.6g}"] for step, loss in enumerate(history))
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def check_replicas(folder: Path, state: dict[str, Any]) -> int:
    """All ranks' parameter digests equal each other and the saved model; returns the count."""
    digests = {p.name: p.read_text().strip() for p in folder.glob("replica-*.sha256")}
    if not digests:
        raise ValueError(f"{folder}: no replica-*.sha256 files; not a train-stage checkpoint")
    saved = state_digest(state["model"])
    if set(digests.values()) != {saved}:
        raise RuntimeError(
            f"data-parallel replicas diverged in {folder}: {digests} (saved model {saved})"
        )
    return len(digests)


def run(params: Params, *, stop_after: int | None = None) -> dict[str, Any]:
    """The stage inside an active MLflow run; returns the train.json summary.

    `stop_after` ends the run after the checkpoint at that step, as an interruption would (the
    outputs are not written; a later call resumes).
    """
    import mlflow
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.common import tracking_uri, tuned_params

    params = tuned_params(params)
    t = params.train
    if t.use_gpu and not gpu_available():
        raise ValueError("train.use_gpu is true but the Ray cluster has no GPU; set it to false")
    data_dir = absolute(params.data.out_dir)
    name = run_name(params, data_dir)
    storage = t.storage_path if "://" in t.storage_path else str(absolute(t.storage_path))
    run_dir = None if "://" in storage else Path(storage) / name
    if run_dir is not None and not t.resume and run_dir.exists():
        print(f"[train] train.resume is false: deleting {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    resume_from = find_resume_checkpoint(run_dir, t.steps) if run_dir else None
    print(
        f"[train] run {name} in {storage}: {t.steps} steps, global batch {t.batch_size} on "
        f"{t.num_workers} worker(s); "
        + (f"resume candidate {resume_from}" if resume_from else "no checkpoint to resume"),
        flush=True,
    )

    active = mlflow.active_run()
    if resume_from is not None and _step_of(resume_from) == t.steps:
        # Already complete (e.g. the outputs were deleted): export without starting workers.
        print(f"[train] {resume_from} is already at step {t.steps}: exporting it", flush=True)
        folder, seconds, reported = resume_from.parent, 0.0, {"resumed_from": t.steps}
        state = load_checkpoint(resume_from)
        replicas = check_replicas(folder, state)
        checkpoint_path = str(folder)
    else:
        cfg = {
            "model": model_config(params),
            "diffusion": diffusion_config(params),
            "train": dataclasses.asdict(train_config(params)),
            "steps": t.steps,
            "batch_size": t.batch_size,
            "data_dir": str(data_dir),
            "data_seed": params.seed,
            "flip": t.flip,
            "threads": t.cpus_per_worker,
            "log_every": t.log_every,
            "checkpoint_every": t.checkpoint_every,
            "stop_after": stop_after,
            "resume_from": str(resume_from) if resume_from else None,
            "mlflow": (
                {"tracking_uri": tracking_uri(params), "run_id": active.info.run_id}
                if active
                else None
            ),
            "eval": None,
        }
        resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            ),
        )
        started = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - started
        if result.checkpoint is None:
            raise RuntimeError(f"run {name} reported no checkpoint; see the Ray logs above")
        with result.checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
            replicas = check_replicas(Path(folder), state)
        reported, checkpoint_path = result.metrics or {}, result.checkpoint.path

    final_step = int(state["step"])
    history = state["meta"]["loss_history"].tolist()
    summary: dict[str, Any] = {
        "run_name": name,
        "steps": final_step,
        "target_steps": t.steps,
        "final_loss": float(np.mean(history[-min(len(history), t.log_every) :])),
        "first_loss": float(np.mean(history[: min(len(history), 10)])),
        "resumed_from_step": int(reported.get("resumed_from", 0)),
        "wall_seconds": seconds,
        # null when no step ran in this call (JSON has no NaN)
        "images_per_second": reported.get("images_per_second"),
        "num_workers": t.num_workers,
        "replicas_identical": replicas,
        "checkpoint": checkpoint_path,
    }
    if final_step < t.steps:
        print(f"[train] stopped at step {final_step} of {t.steps}; rerun to resume", flush=True)
        return summary

    ema_path = absolute(t.out_dir) / "ema.pt"
    export_ema(ema_path, state, meta={"run_name": name, "tuned": params.tune.enabled})
    write_loss_csv(absolute(params.evaluate.plots_dir) / "loss.csv", history)
    write_json(absolute(params.evaluate.out_dir) / "train.json", summary)
    if active:
        mlflow.log_metrics({"final_loss": summary["final_loss"], "wall_seconds": seconds})
        mlflow.set_tag("ray_run_name", name)
        mlflow.log_image(forward_noising_strip(params, data_dir), "train/forward_noising.png")
        mlflow.log_artifact(str(ema_path), artifact_path="model")
        mlflow.log_artifact(str(absolute(params.evaluate.plots_dir) / "loss.csv"), "train")
    print(f"[train] step {final_step}: EMA weights in {ema_path}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--stop-after",
            type=int,
            default=None,
            help="end after the checkpoint at this step, as an interruption would (rerun resumes)",
        )

    stage_main("train", run, __doc__, argv, configure=options)


if __name__ == "__main__":
    main()
