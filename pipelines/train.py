"""train stage: Algorithm 1 with EMA as a Ray Train `TorchTrainer` (DDP), resumable.

    python -m pipelines.train                       # under `dvc repro`, from the repository root
    ray job submit --working-dir . \\
        --runtime-env-json '{"env_vars": {"DDPM_REPO_ROOT": "'$PWD'"}}' \\
        -- python -m pipelines.train                # the same stage as a Ray job

Where outputs go: every output path comes from params and is made absolute against
`pipelines.project.repo_root()` in the driver: $DDPM_REPO_ROOT when set (a submitted job runs in a
temporary copy of the working directory, so it must be told where the repository is), otherwise
the nearest directory above the current one holding dvc.yaml / params.yaml. Workers, which may
run on other machines, get no path of the driver's: the driver publishes the prepared data to the
shared store (storage.root, pipelines/store.py) under its digest, Ray Train keeps its
checkpoints there, and the driver writes the outputs from the final checkpoint.

Outputs (declared in dvc.yaml):
    <train.out_dir>/ema.pt           EMA weights + the configs that rebuild them (export_ema)
    <evaluate.out_dir>/train.json    the final loss (pipelines/stage_metrics.py)
    <evaluate.out_dir>/details/train.json  final and first loss, steps
    <evaluate.plots_dir>/loss.csv    step,loss: the global batch's mean L_simple at every step
MLflow (the stage's run): per-step loss, final_loss (a KEY_METRICS name), the loss curve, the
forward-noising picture, ema.pt as a plain artifact, and the EMA U-Net as an MLflow pyfunc model
(safetensors + JSON, no pickle) registered as `ddpm-<mlflow.experiment>` (a version per run whose
weights differ from the newest version's; see log_ema_model).
Scratch state (in the store, not a DVC output, so DVC never deletes it):
    <storage.root>/ray/train-<key>/step-XXXXXXXX/checkpoint.pt   (+ replica-<rank>.sha256)

Data: each worker copies the published dataset to its node once and streams its own contiguous
share of the train split's Parquet shards (`ddpm.data.ShardDataset` with rank/world_size) in
batches of train.batch_size / num_workers, so one step sees one global batch. Every random choice
of step s on rank r is a pure function of (seed, r, s) (see ddpm/training.py) and the data order
of (seed, epoch), hence:

Resume: the run folder's key hashes the run's `Recipe`, what the workers train with (seed,
model, diffusion, the library's TrainConfig but steps, num_workers, and the dataset's digest),
so a changed recipe starts a fresh run while `train.steps` may grow to continue one, and keys
that only watch, keep or place the run stay out of it by construction. A rerun with the same key
continues from the newest checkpoint with step <= train.steps: Ray Train V2 restores its own
checkpoint record for the same storage path and name (`ray.train.get_checkpoint()`); the workers
also scan the folder themselves for the newest loadable checkpoint, which covers a crash between a
checkpoint's upload and Ray's record of it. Workers take whichever is newer, skip the batches of
the epoch already seen, and continue with the same updates an uninterrupted run makes (same
number of workers). `train.resume: false` deletes the run folder first.

Faults: a dead worker or node restarts the worker group from the latest checkpoint within the
same stage run (`train.max_failures` times); a group that cannot be placed fails after a bounded
wait; a Ray checkpoint record naming a missing or truncated checkpoint is set aside with a
warning and the previous readable checkpoint is used.

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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.images import noising_frames
from ddpm.io_utils import atomic_write
from ddpm.nn import ModelConfig
from ddpm.training import TrainConfig, export_ema, load_checkpoint, state_digest
from pipelines.cluster import TRAIN_START_TIMEOUT_ENV, gpu_available, require_resources
from pipelines.params import Params, TrainParams
from pipelines.plots import csv_line_plot, timestep_strip
from pipelines.project import absolute, repo_root, shared_store, tuned_params
from pipelines.run_info import phase, write_run_info
from pipelines.stage_cli import stage_main
from pipelines.stage_metrics import headline, write_stage_metrics
from pipelines.store import Store, prepared_digest, publish_prepared
from pipelines.tracking import log_key_metrics, tolerate_mlflow_outage
from pipelines.worker import (
    CHECKPOINT_FILE,
    MlflowTarget,
    WorkerConfig,
    find_resume_checkpoint,
    load_stored_checkpoint,
    step_of,
    torch_config,
    train_logging,
    train_worker,
)

# What metrics/details/train.json holds of the stage's summary: results, not how the run went
# (metrics/train.json: the final loss and its standard error).
TRAIN_METRICS = ("steps", "final_loss", "final_loss_stderr", "first_loss")
# The store folder that holds Ray Train's run folders.
RAY_DIR = "ray"
# Ray Train's record of a run's reported checkpoints, in the run folder.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Tries to place a worker group that does not fit before the stage fails (see fit_on_ray()).
START_RETRIES = 2


def preflight(params: Params) -> None:
    """What can fail without Ray: the prepared data (checked against its manifests)."""
    prepared_digest(absolute(params.data.out_dir))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What decides every update of a run, hence its weights at each step; the workers train
    with exactly these values, and runs with equal recipes continue one another's checkpoints.

    Not in it, so not in the run key: how the run is watched, kept and placed (train's keys
    beyond the library's TrainConfig but num_workers, and the reproducibility section). The
    device, the thread count and the kernels do change the rounding (a few CPU steps with 1 and
    with 2 threads end in other bits; precision auto means bf16 on CUDA), so a run resumed on
    other hardware continues the same recipe without being bit-identical to one that never
    stopped; keeping them out lets a run move to other hardware and keeps the default run's key.
    """

    seed: int
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    # Each rank draws its own noise and reads its own share of the data: the layout is part of
    # the trajectory.
    num_workers: int
    data_key: str

    @classmethod
    def of(cls, params: Params, data_key: str) -> Recipe:
        return cls(
            seed=params.seed,
            model=params.model_config(),
            diffusion=params.diffusion,
            train=params.train_config(),
            num_workers=params.train.num_workers,
            data_key=data_key,
        )

    def run_name(self) -> str:
        """`train-<key>`: equal for exactly the recipes whose checkpoints may be resumed.

        `train.steps` says where a run ends, not how it goes (the lr and EMA decay of a step
        depend on the step alone), so a larger value continues the same run.
        """
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "steps"}
        payload = {
            "seed": self.seed,
            "model": dataclasses.asdict(self.model),
            "diffusion": dataclasses.asdict(self.diffusion),
            "train": {**train, "num_workers": self.num_workers},
            "data": self.data_key,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        return f"train-{key.hexdigest()[:12]}"


def set_aside_bad_record(store: Store, run_key: str) -> None:
    """Ray Train's own record of the run's checkpoints (RAY_SNAPSHOT) is loaded before any of our
    code runs; a checkpoint it names that is missing makes Ray refuse to start, and a truncated one
    crashes every restored worker. When the record names such a file, it is renamed aside with a
    warning, so Ray starts a fresh record and the workers resume from the newest readable
    checkpoint that `find_resume_checkpoint` picks (the record only lists these folders)."""
    key = f"{run_key}/{RAY_SNAPSHOT}"
    if not store.exists(key):
        return
    try:
        record = json.loads(store.read_bytes(key))
        names = [
            r["checkpoint_dir_name"].rstrip("/").split("/")[-1]
            for r in record["checkpoint_results"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        problems = [f"{store.uri(key)} is unreadable ({err})"]
    else:
        problems = []
        for name in names:
            checkpoint = f"{run_key}/{name}/{CHECKPOINT_FILE}"
            try:
                load_stored_checkpoint(store, checkpoint)
            except Exception as err:
                problems.append(f"{store.uri(checkpoint)}: {err}")
    if not problems:
        return
    aside = f"{key}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
    store.move(key, aside)
    print(
        "[train] WARNING: Ray's checkpoint record names unusable checkpoints: "
        + "; ".join(problems)
        + f". Record moved to {store.uri(aside)}; resuming from the newest readable checkpoint "
        "instead.",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# The driver


def write_forward_noising_png(params: Params, data_dir: Path, plots_dir: Path) -> Path:
    """plots/forward_noising.png: q(x_t | x_0) on a few training images under this run's
    schedule, columns headed with t."""
    from ddpm.data import load_split

    x0, _ = load_split(data_dir, "train", max_rows=4)
    generator = torch.Generator().manual_seed(params.seed)
    timesteps, columns = noising_frames(params.diffusion.build(), x0, 8, generator)
    d = params.diffusion
    return timestep_strip(
        timesteps,
        columns,
        plots_dir / "forward_noising.png",
        title=f"Forward process q(x_t | x_0), {d.schedule} schedule, T={d.num_timesteps}",
    )


def log_missing_losses(run_id: str, history: list[float]) -> int:
    """Send the per-step losses that the run lacks (the workers could not reach MLflow, or an
    earlier interrupted call ran them); returns how many were sent."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    stamp = int(time.time() * 1000)
    missing = [
        Metric("loss", float(loss), stamp, step)
        for step, loss in enumerate(history, start=1)
        if step not in logged
    ]
    for start in range(0, len(missing), 1000):
        client.log_batch(run_id, metrics=missing[start : start + 1000])
    return len(missing)


def registered_model_name(params: Params) -> str:
    """The Model Registry entry that every train run of this MLflow experiment adds a version to."""
    return f"ddpm-{params.mlflow.experiment}"


# The logged model's files (pyfunc `data/ema/`): the EMA weights and the JSON that rebuilds them.
MODEL_WEIGHTS = "weights.safetensors"
MODEL_CONFIG = "config.json"
MODEL_FORMAT = "ddpm-ema-safetensors"
MODEL_FORMAT_VERSION = 1
# The largest config.json read back: a few KB in practice.
MODEL_CONFIG_MAX_BYTES = 1 << 20
# Tag on the logged model and its registered version: sha256 of the weights and config.json.
MODEL_DIGEST_TAG = "ddpm.model_sha256"


def write_logged_model(ema_path: Path, folder: Path) -> str:
    """The EMA export as MLflow logs it: `folder`/MODEL_WEIGHTS (safetensors, the EMA state
    dict) and `folder`/MODEL_CONFIG (JSON: step, the model and diffusion configs, meta); returns
    their digest (MODEL_DIGEST_TAG), equal for equal weights and configs."""
    import safetensors.torch

    from ddpm.training import load_ema_model

    model, _, meta = load_ema_model(ema_path)
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "step": meta["step"],
        "config": meta["config"],
        "meta": {k: v for k, v in meta.items() if k not in ("step", "config")},
    }
    text = json.dumps(payload, indent=2, sort_keys=True, default=list) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CONFIG).write_text(text)
    # safetensors refuses tensors that share storage: every one gets its own contiguous copy.
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, str(folder / MODEL_WEIGHTS), metadata={"format": "pt"})
    digest = hashlib.sha256()
    digest.update(state_digest(weights).encode())
    digest.update(text.encode())
    return digest.hexdigest()


def load_logged_model(folder: str | Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(U-Net in eval mode, diffusion, meta) from a logged model's MODEL_CONFIG and MODEL_WEIGHTS
    in `folder` (the pyfunc's `data/ema/`); nothing else there is read, and nothing is
    unpickled: the JSON is checked by the model and diffusion configs (limits included), the
    safetensors must hold exactly the network's tensors with its dtypes, all finite; else
    ValueError naming the file and key or tensor."""
    import safetensors.torch

    from ddpm.training import _check_weights, configs_of

    folder = Path(folder)
    config_path, weights_path = folder / MODEL_CONFIG, folder / MODEL_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"logged model file not found: {path}")
    if config_path.stat().st_size > MODEL_CONFIG_MAX_BYTES:
        raise ValueError(f"{config_path}: larger than {MODEL_CONFIG_MAX_BYTES} bytes")
    try:
        payload = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{config_path}: not JSON ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_path}: 'format' is not {MODEL_FORMAT!r}")
    if payload.get("version") != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: version {payload.get('version')!r}; this code reads "
            f"{MODEL_FORMAT_VERSION}"
        )
    config = payload.get("config")
    try:
        model_config, diffusion_config = configs_of(config)
        diffusion = diffusion_config.build()
        model = model_config.build(learn_sigma=diffusion.output_channels_multiplier == 2)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{config_path}: 'config' does not build the network: {err}") from None
    try:
        weights = safetensors.torch.load_file(str(weights_path), device="cpu")
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from None
    expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    missing, unknown = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{weights_path}: does not fit the network of {config_path} (missing {missing[:5]}, "
            f"unexpected {unknown[:5]})"
        )
    _check_weights(weights, "ema", weights_path, expected)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ValueError(f"{weights_path}: does not fit the network: {err}") from None
    model.requires_grad_(False)
    meta = {**dict(payload.get("meta") or {}), "step": payload.get("step"), "config": config}
    return model.eval(), diffusion, meta


class LoggedUNet:
    """What `mlflow.pyfunc.load_model` returns the logged model as (its `_model_impl`).

    predict(x, params={"t": t}): eps_theta(x_t, t) for a float32 batch N x C x H x W and one
    0-based timestep t for the whole batch (default T - 1); `get_raw_model()` is the U-Net
    itself, whose forward(x, t) also takes one timestep per image."""

    def __init__(self, model: torch.nn.Module, diffusion: Any, meta: dict[str, Any]):
        self.model, self.diffusion, self.meta = model, diffusion, meta

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        t = int((params or {}).get("t", self.diffusion.num_timesteps - 1))
        with torch.no_grad():
            return self.model(x, torch.tensor(t)).numpy()

    def get_raw_model(self) -> torch.nn.Module:
        return self.model


def _load_pyfunc(data_path: str) -> LoggedUNet:
    """MLflow's pyfunc loader (`loader_module: pipelines.train` in the model's MLmodel)."""
    return LoggedUNet(*load_logged_model(data_path))


def log_ema_model(ema_path: Path, params: Params) -> str:
    """Log the exported EMA U-Net as an MLflow pyfunc model and register it as a new version of
    `registered_model_name(params)` unless the newest version already holds the same weights and
    config (its MODEL_DIGEST_TAG); returns the logged model's id.

    No pickle: the model's data is `data/ema/` with MODEL_WEIGHTS (safetensors) and MODEL_CONFIG
    (JSON), and its MLmodel names this module as the pyfunc loader, so loading imports the
    `pipelines` and `ddpm` packages installed where it loads (none is stored with the model) and
    runs `load_logged_model`, which rebuilds the U-Net from the JSON and reads the tensors.
    `mlflow.pyfunc.load_model(uri)` serves it (x: float32 N x C x H x W from images scaled to
    [-1, 1], the int param t: the 0-based timestep; the output is the predicted noise, 2C
    channels with learned variances) and `.get_raw_model()` is the nn.Module. The sampler is not
    part of it (ddpm.sampling with the diffusion of the config is). `mlflow.pyfunc.load_model`
    obeys whatever MLmodel the server holds; from a server you do not trust, download `data/ema/`
    and call `load_logged_model` on it (docs/SECURITY.md).
    """
    import mlflow
    import safetensors

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "ema"
        digest = write_logged_model(ema_path, folder)
        signature, example = model_signature(*load_logged_model(folder)[:2])
        info = mlflow.pyfunc.log_model(
            name="ema_model",
            loader_module=__name__,
            data_path=str(folder),
            signature=signature,
            input_example=example,
            # Given rather than inferred (inference loads the model in a subprocess: slow).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={np.__version__}",
                f"safetensors=={safetensors.__version__}",
            ],
            tags={MODEL_DIGEST_TAG: digest},
        )
    register_unless_same(info, registered_model_name(params), digest)
    return info.model_id


def model_signature(model: torch.nn.Module, diffusion: Any) -> tuple[Any, tuple]:
    """The pyfunc's signature (images in, predicted noise out, the int param t) and an input
    example: x_T ~ N(0, I) at the last step, where Algorithm 2 starts."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    channels, height, width = model.config.image_shape
    last_t = diffusion.num_timesteps - 1
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, height, width))]),
        outputs=Schema(
            [TensorSpec(np.dtype(np.float32), (-1, model.config.out_channels, height, width))]
        ),
        params=ParamSchema([ParamSpec("t", "long", last_t)]),
    )
    noise = torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(0))
    return signature, (noise.numpy(), {"t": last_t})


def register_unless_same(info: Any, name: str, digest: str) -> None:
    """Register the logged model `info` as a new version of `name` unless the newest version
    holds the same weights and config (its MODEL_DIGEST_TAG equals `digest`)."""
    import mlflow

    newest = mlflow.MlflowClient().search_model_versions(
        f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
    )
    if newest and newest[0].tags.get(MODEL_DIGEST_TAG) == digest:
        print(
            f"[train] MLflow model {info.model_uri}: same weights as {name} version "
            f"{newest[0].version}, no new version registered",
            flush=True,
        )
        return
    version = mlflow.register_model(info.model_uri, name, tags={MODEL_DIGEST_TAG: digest})
    print(
        f"[train] MLflow model {info.model_uri} registered as {name} version {version.version}",
        flush=True,
    )


def write_loss_csv(path: Path, history: list[float]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows([step + 1, f"{loss:.6g}"] for step, loss in enumerate(history))
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def write_loss_png(plots_dir: Path) -> Path:
    """plots/loss.png from plots/loss.csv: what `dvc plots show` draws offline."""
    return csv_line_plot(
        plots_dir / "loss.csv",
        plots_dir / "loss.png",
        "step",
        "loss",
        title="Training loss (L_simple), mean over the workers' batches, per step",
        xlabel="step",
        ylabel="L_simple",
        log_y=True,
    )


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


def _free_resources() -> str:
    import ray

    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s)"


@dataclasses.dataclass(frozen=True)
class Gathered:
    """The run's newest checkpoint as the driver reads it back, and how this call got there."""

    state: dict[str, Any]  # `ddpm.training.load_checkpoint` of the checkpoint
    replicas: int  # ranks whose parameter digests matched the saved model
    checkpoint: str  # the checkpoint folder's URI in the store
    seconds: float  # wall time of the Ray Train run (0 when none ran)
    reported: dict[str, Any]  # the workers' last report


def check_cluster(t: TrainParams) -> None:
    """The cluster holds the GPU and the CPUs that train's params ask for."""
    if t.use_gpu and not gpu_available():
        raise ValueError("train.use_gpu is true but the Ray cluster has no GPU; set it to false")
    require_resources(
        "train.num_workers x train.cpus_per_worker (x 1 GPU with train.use_gpu)",
        t.num_workers * t.cpus_per_worker,
        t.num_workers if t.use_gpu else 0,
    )


def resume_candidate(shared: Store, run_key: str, t: TrainParams) -> tuple[str, dict] | None:
    """Clear the run folder (train.resume false) or its unusable Ray record, then find the
    newest readable checkpoint to continue from: its key and state."""
    if not t.resume and shared.exists(run_key):
        print(f"[train] train.resume is false: deleting {shared.uri(run_key)}", flush=True)
        shared.delete(run_key)
    set_aside_bad_record(shared, run_key)
    found = find_resume_checkpoint(shared, run_key, t.steps)
    name = run_key.rsplit("/", 1)[-1]
    print(
        f"[train] run {name} in {shared.uri(RAY_DIR)}: {t.steps} steps, global batch "
        f"{t.batch_size} on {t.num_workers} worker(s); "
        + (f"resume candidate {shared.uri(found[0])}" if found else "no checkpoint to resume"),
        flush=True,
    )
    return found


def gather_finished(shared: Store, found: tuple[str, dict], steps: int) -> Gathered:
    """A run already at train.steps (e.g. the outputs were deleted): no workers start."""
    key, state = found
    print(f"[train] {shared.uri(key)} is already at step {steps}: exporting it")
    folder_key = key.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        replicas = check_replicas(shared.download_dir(folder_key, folder), state)
    return Gathered(state, replicas, shared.uri(folder_key), 0.0, {"resumed_from": steps})


def worker_config(
    recipe: Recipe,
    t: TrainParams,
    shared: Store,
    run_key: str,
    mlflow_target: MlflowTarget | None,
    stop_after: int | None,
) -> WorkerConfig:
    """What every worker of the run gets: the recipe, and how to report and checkpoint it."""
    return WorkerConfig(
        model=recipe.model,
        diffusion=recipe.diffusion,
        train=recipe.train,
        seed=recipe.seed,
        store=shared,
        data_key=recipe.data_key,
        threads=t.cpus_per_worker,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        stop_after=stop_after,
        run_key=run_key,
        mlflow=mlflow_target,
        progress_bar=sys.stdout.isatty(),
    )


def trainer_for(config: WorkerConfig, t: TrainParams, name: str):
    """Ray Train's TorchTrainer for the run folder `name` under the store's RAY_DIR."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    storage_path, storage_filesystem = config.store.ray_storage(RAY_DIR)
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=torch_config(),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            # A dead worker or node: restart the group from the latest checkpoint, up to
            # max_failures times. Workers that cannot be placed (too few CPUs after a node is
            # lost) time out after train.placement_timeout_s and are retried START_RETRIES
            # times, so the wait has a bound instead of retrying forever.
            failure_config=FailureConfig(
                max_failures=t.max_failures, controller_failure_limit=START_RETRIES
            ),
            logging_config=train_logging(),
        ),
    )


def placement_failure(t: TrainParams, run_uri: str) -> RuntimeError:
    """The error of a worker group that could not be placed in any of its tries."""
    waited = (START_RETRIES + 1) * t.placement_timeout_s
    return RuntimeError(
        f"[train] gave up after {START_RETRIES + 1} tries of train.placement_timeout_s = "
        f"{t.placement_timeout_s} s ({waited} s) to place train.num_workers = "
        f"{t.num_workers} workers of train.cpus_per_worker = {t.cpus_per_worker} CPU(s)"
        + (" and 1 GPU" if t.use_gpu else "")
        + f"; the cluster has {_free_resources()} free now (a node lost?). Add nodes or lower "
        f"train.num_workers; rerunning resumes from the last checkpoint in {run_uri}"
    )


def fit_on_ray(config: WorkerConfig, t: TrainParams, name: str) -> Gathered:
    """Train to train.steps (or config.stop_after) on Ray Train and read the last checkpoint."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    trainer = trainer_for(config, t, name)
    started = time.perf_counter()
    os.environ[TRAIN_START_TIMEOUT_ENV] = str(t.placement_timeout_s)
    try:
        result = trainer.fit()
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        raise placement_failure(t, config.store.uri(config.run_key)) from err
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} reported no checkpoint; see the Ray logs above")
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        replicas = check_replicas(Path(folder), state)
    folder_key = f"{config.run_key}/{result.checkpoint.path.rstrip('/').split('/')[-1]}"
    return Gathered(state, replicas, config.store.uri(folder_key), seconds, result.metrics or {})


def train_summary(name: str, t: TrainParams, gathered: Gathered) -> dict[str, Any]:
    """The stage's summary of a run: train.json takes TRAIN_METRICS, the run info the rest."""
    history = gathered.state["loss_history"].tolist()
    last = history[-min(len(history), t.log_every) :]
    reported = gathered.reported
    return {
        "run_name": name,
        "steps": int(gathered.state["step"]),
        "target_steps": t.steps,
        "final_loss": float(np.mean(last)),
        # Each step's loss is of a fresh batch and fresh noise: the window's mean has the
        # standard error of independent draws (None for a window of one step).
        "final_loss_stderr": float(np.std(last, ddof=1) / np.sqrt(len(last)))
        if len(last) > 1
        else None,
        "first_loss": float(np.mean(history[: min(len(history), 10)])),
        "resumed_from_step": int(reported.get("resumed_from", 0)),
        "wall_seconds": gathered.seconds,
        # null when no step ran in this call (JSON has no NaN)
        "images_per_second": reported.get("images_per_second"),
        "num_workers": t.num_workers,
        "replicas_identical": gathered.replicas,
        "checkpoint": gathered.checkpoint,
    }


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files the stage wrote that MLflow gets too."""

    ema: Path
    loss_csv: Path
    loss_png: Path
    noising_png: Path


def write_outputs(
    params: Params, state: dict[str, Any], summary: dict[str, Any], data_dir: Path
) -> Outputs:
    """ema.pt, the loss curve and the forward-noising picture, train.json and the run info."""
    ema_path = absolute(params.train.out_dir) / "ema.pt"
    export_ema(
        ema_path, state, meta={"run_name": summary["run_name"], "tuned": params.tune.enabled}
    )
    plots_dir = absolute(params.evaluate.plots_dir)
    write_loss_csv(plots_dir / "loss.csv", state["loss_history"].tolist())
    loss_png = write_loss_png(plots_dir)
    noising_png = write_forward_noising_png(params, data_dir, plots_dir)
    # train.json holds what compares across runs; timings, the resume point and paths change
    # from one run to the next with the same result, so they go to the run info.
    results = {k: v for k, v in summary.items() if k in TRAIN_METRICS}
    write_stage_metrics(
        absolute(params.evaluate.out_dir), "train", headline(summary, ["final_loss"]), results
    )
    write_run_info(
        repo_root(), "train", {k: v for k, v in summary.items() if k not in TRAIN_METRICS}
    )
    return Outputs(ema_path, plots_dir / "loss.csv", loss_png, noising_png)


def log_outputs(
    params: Params, run_id: str, history: list[float], summary: dict[str, Any], outputs: Outputs
) -> None:
    """The stage's MLflow run: the model, the losses the workers could not send, the key
    metric, the pictures and files. An MLflow outage costs the record, not the outputs."""
    import mlflow

    model_id = None
    with tolerate_mlflow_outage("train", "logging the MLflow model"):
        model_id = log_ema_model(outputs.ema, params)
    with tolerate_mlflow_outage("train", "logging the final metrics and artifacts"):
        log_missing_losses(run_id, history)
        log_key_metrics({"final_loss": summary["final_loss"]}, model_id=model_id)
        mlflow.log_metric("wall_seconds", summary["wall_seconds"])
        mlflow.set_tag("ray_run_name", summary["run_name"])
        mlflow.log_artifact(str(outputs.noising_png), "train")
        mlflow.log_artifact(str(outputs.ema), artifact_path="model")
        mlflow.log_artifact(str(outputs.loss_csv), "train")
        mlflow.log_artifact(str(outputs.loss_png), "train")


def run(params: Params, *, stop_after: int | None = None) -> dict[str, Any]:
    """The stage inside an active MLflow run; returns the train.json summary.

    `stop_after` ends the run after the checkpoint at that step, as an interruption would (the
    outputs are not written; a later call resumes).
    """
    import mlflow

    from pipelines.tracking import tracking_uri

    t = params.train
    check_cluster(t)
    data_dir, shared = absolute(params.data.out_dir), shared_store(params)
    with phase("publish"):
        recipe = Recipe.of(params, publish_prepared(shared, data_dir))
    name = recipe.run_name()
    run_key = f"{RAY_DIR}/{name}"
    found = resume_candidate(shared, run_key, t)
    active = mlflow.active_run()
    with phase("compute"):
        if found is not None and step_of(found[0]) == t.steps:
            gathered = gather_finished(shared, found, t.steps)
        else:
            target = MlflowTarget(tracking_uri(params), active.info.run_id) if active else None
            config = worker_config(recipe, t, shared, run_key, target, stop_after)
            gathered = fit_on_ray(config, t, name)
    summary = train_summary(name, t, gathered)
    if summary["steps"] < t.steps:
        print(
            f"[train] stopped at step {summary['steps']} of {t.steps}; rerun to resume", flush=True
        )
        return summary
    with phase("outputs"):
        outputs = write_outputs(params, gathered.state, summary, data_dir)
    if active:
        with phase("mlflow_log"):
            history = gathered.state["loss_history"].tolist()
            log_outputs(params, active.info.run_id, history, summary, outputs)
    print(f"[train] step {summary['steps']}: EMA weights in {outputs.ema}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--stop-after",
            type=int,
            default=None,
            help="end after the checkpoint at this step, as an interruption would (rerun resumes)",
        )

    stage_main(
        "train",
        run,
        __doc__,
        argv,
        configure=options,
        preflight=preflight,
        overlay=tuned_params,
    )


if __name__ == "__main__":
    main()
