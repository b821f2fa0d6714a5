"""The training process of the train stage and of every Tune trial: `ddpm.training.fit`.

One loop (`run_worker`), two places it runs (`Session`):
  * a Ray Train worker (`train_worker`): the train stage, and Tune trials with
    tune.workers_per_trial > 1; it joins the DDP group and reports metrics and checkpoints
    through `ray.train.report`;
  * a one-process Tune trial (`trial_worker`): trains in the trial's own Tune actor, reports
    through `ray.tune.report` and writes its checkpoints straight to the store. A one-worker
    Ray Train run inside a trial costs a controller, a worker group and a checkpoint upload,
    about a minute on 2 CPU cores, for a trial that trains for seconds.

What the worker adds to the library loop is only orchestration: it resumes from the newest
checkpoint (Ray's own record or its scan of the run folder), reports, and sends rank 0's per-step
metrics to the stage's MLflow run. It receives one typed `WorkerConfig` built by the driver from
params, and reads nothing of the driver's machine: the data, the classifier and the run folder
come from the shared store (pipelines/store.py), so the worker may run on any node.

Checkpoint layout under the Ray run folder `<store>/ray/<run name>/` (read back by
pipelines/train.py):

    step-XXXXXXXX/checkpoint.pt          rank 0's `ddpm.training.save_checkpoint`
    step-XXXXXXXX/replica-<rank>.sha256  each rank's parameter digest (DDP keeps them equal)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.nn import ModelConfig
from ddpm.training import (
    Hook,
    TrainConfig,
    Trainer,
    Window,
    fit,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from pipelines.store import Store, fetch_prepared

CHECKPOINT_FILE = "checkpoint.pt"
REPLICA_FILE = "replica-{rank}.sha256"
STEP_DIR = "step-{step:08d}"


@dataclasses.dataclass(frozen=True)
class MlflowTarget:
    """The MLflow run (opened by the driver) that rank 0 logs its per-step metrics to."""

    tracking_uri: str
    run_id: str


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Rank 0 scores the EMA model (`ddpm.evaluation.HeldOutScore`) every `every` steps."""

    metric: str
    every: int
    images: int
    seed: int
    store: Store
    data_key: str
    classifier_key: str | None = None
    # At the last step of the run: each of these 0-based timesteps' term of the bound, averaged
    # over the first `profile_images` held-out images (`ddpm.likelihood.bits_per_timestep`).
    profile_timesteps: tuple[int, ...] = ()
    profile_images: int = 8


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker needs; data and checkpoints are keys in `store`."""

    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    seed: int
    store: Store
    data_key: str
    threads: int
    log_every: int
    # null: checkpoint only after the last step.
    checkpoint_every: int | None = None
    # End after the checkpoint at this step, as an interruption would (tests of resuming).
    stop_after: int | None = None
    # The Ray run's folder in the store: resuming also scans it (see `_resume`).
    run_key: str | None = None
    mlflow: MlflowTarget | None = None
    evaluation: Evaluation | None = None
    # Rank 0's progress: its label, and whether it is a bar drawn by the driver (a terminal)
    # or a line per log window (a log file, CI).
    progress_label: str = "train"
    progress_bar: bool = False


def mean_over_ranks(values: list[float]) -> list[float]:
    """The element-wise mean of `values` over the DDP group (a collective: every rank calls it)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
        tensor = tensor.cpu() / dist.get_world_size()
    return tensor.tolist()


class MlflowLogger:
    """Per-step metrics sent to an MLflow run that the driver opened (no-op without a target).

    An MLflow outage never stops training: a failed send is reported once, its rows are kept and
    sent with the next window after a pause (`RETRY_SECONDS`), and each request gives up quickly
    instead of retrying for minutes. `unsent` counts what is still waiting at the end.
    """

    RETRY_SECONDS = 30.0

    def __init__(self, target: MlflowTarget | None) -> None:
        self.client = None
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.failing_since: float | None = None
        self.retry_at = 0.0
        if target is not None:
            import os

            from mlflow.tracking import MlflowClient

            # MLflow's defaults (7 retries, 120 s timeout) would stall a step for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self.client = MlflowClient(tracking_uri=target.tracking_uri)
            self.run_id = target.run_id

    @property
    def unsent(self) -> int:
        return len(self.pending)

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self.client is None:
            return
        self.pending.extend(rows)
        if not self.pending or time.monotonic() < self.retry_at:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, step)
            for step, values in self.pending
            for key, value in values.items()
            if math.isfinite(value)
        ]
        try:
            for start in range(0, len(metrics), 1000):  # MLflow's per-request limit
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        except Exception as err:  # any transport or server error: training goes on
            self.retry_at = time.monotonic() + self.RETRY_SECONDS
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                print(
                    f"[train] MLflow is unreachable ({type(err).__name__}: {err}); training "
                    f"goes on, metrics are kept and sent again every {self.RETRY_SECONDS:g} s",
                    flush=True,
                )
            return
        if self.failing_since is not None:
            print(
                f"[train] MLflow is back after {time.monotonic() - self.failing_since:.0f} s; "
                f"sent {len(self.pending)} kept metric rows",
                flush=True,
            )
            self.failing_since = None
        self.pending.clear()


def _held_out_score(spec: Evaluation, device: torch.device):
    from ddpm.data import load_split
    from ddpm.evaluation import HeldOutScore

    images, _ = load_split(fetch_prepared(spec.store, spec.data_key), "test", max_rows=spec.images)
    classifier = None
    if spec.metric == "classifier_fd":
        from ddpm.metrics import load_classifier

        classifier = load_classifier(spec.store.fetch_file(spec.classifier_key))
    return HeldOutScore(spec.metric, images, seed=spec.seed, device=device, classifier=classifier)


def step_of(key: str) -> int:
    """The step in a checkpoint key's folder name (STEP_DIR); ValueError for other names."""
    folder = key.rstrip("/").split("/")[-2 if key.endswith(CHECKPOINT_FILE) else -1]
    if not folder.startswith("step-"):
        raise ValueError(f"{key!r} is not in a step-XXXXXXXX folder")
    return int(folder.removeprefix("step-"))


def load_stored_checkpoint(store: Store, key: str) -> dict:
    """`ddpm.training.load_checkpoint` of a checkpoint in the store."""
    with tempfile.TemporaryDirectory() as folder:
        return load_checkpoint(store.download(key, Path(folder) / CHECKPOINT_FILE))


def find_resume_checkpoint(store: Store, run_key: str, max_step: int) -> tuple[str, dict] | None:
    """The newest loadable checkpoint under `run_key` whose step is <= max_step: its key and
    loaded state (loading it is the readability check, so callers need not load it again)."""
    candidates = []
    for name in store.list_dirs(run_key):
        try:
            candidates.append((step_of(name), f"{run_key}/{name}/{CHECKPOINT_FILE}"))
        except ValueError:
            continue
    for step, key in sorted(candidates, reverse=True):
        if step > max_step:
            continue
        try:
            state = load_stored_checkpoint(store, key)
        except Exception as err:  # a half-uploaded or corrupt file: fall back to an older one
            print(
                f"[train] WARNING: skipping unreadable checkpoint {store.uri(key)}: {err}",
                flush=True,
            )
            continue
        return key, state
    return None


class Session:
    """Where one training process runs and reports: its rank, device and DDP wrapper, the
    checkpoint Ray restored (if any), and how a window's metrics and checkpoint leave it."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the checkpoint Ray recorded for this run, or None."""
        return contextlib.nullcontext(None)

    def report(self, metrics: dict[str, Any], step: int, folder: Path | None = None) -> None:
        raise NotImplementedError


class RayTrainSession(Session):
    """A worker of a Ray Train run (DDP over the group)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        _quiet_report_logs()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        # Gradients live in DDP's all-reduce buckets: no copy in or out of them per step.
        self.wrap = functools.partial(
            ray.train.torch.prepare_model,
            parallel_strategy_kwargs={"gradient_as_bucket_view": True},
        )

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], step: int, folder: Path | None = None) -> None:
        import ray.train

        if folder is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=STEP_DIR.format(step=step),
            )


class TuneTrialSession(Session):
    """A one-process Tune trial: checkpoints go to `<checkpoint_key>/step-XXXXXXXX/` in the
    store, the layout of a Ray Train run folder, so the next rung resumes from them alike."""

    def __init__(self, store: Store, checkpoint_key: str) -> None:
        self.store, self.checkpoint_key = store, checkpoint_key
        # Tune gives the trial a GPU (CUDA_VISIBLE_DEVICES) only on a GPU cluster.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def report(self, metrics: dict[str, Any], step: int, folder: Path | None = None) -> None:
        import ray.tune

        if folder is not None:
            target = f"{self.checkpoint_key}/{STEP_DIR.format(step=step)}"
            # The checkpoint file last: a folder with it is complete (the resume scan also
            # skips an unreadable one).
            for path in sorted(folder.iterdir(), key=lambda p: p.name == CHECKPOINT_FILE):
                self.store.upload(path, f"{target}/{path.name}")
        ray.tune.report(metrics)


def _resume(trainer: Trainer, config: WorkerConfig, session: Session) -> int:
    """Load the newest of Ray's own checkpoint record and the run folder's newest readable
    checkpoint; returns its step.

    Both are needed: Ray records a checkpoint only when its controller next polls the workers,
    so a worker group restarted after a crash may get an older checkpoint (or none) from Ray
    while a newer complete one is on disk; and a checkpoint Ray recorded may have been cut
    short on disk since (it is then skipped with a warning).
    """
    candidates = []
    with session.restored() as folder:
        if folder is not None:
            path = folder / CHECKPOINT_FILE
            try:
                state = load_checkpoint(path, map_location="cpu")
            except Exception as err:  # cut short after Ray recorded it: the folder scan stands
                print(f"[train] WARNING: unreadable checkpoint {path} ({err})", flush=True)
            else:
                if state["step"] <= config.train.steps:
                    candidates.append((state["step"], path, state))
    stored = None
    if config.run_key:
        stored = find_resume_checkpoint(config.store, config.run_key, config.train.steps)
    if stored is not None:
        key, state = stored
        candidates.append((state["step"], config.store.uri(key), state))
    if not candidates:
        return 0
    step, path, state = max(candidates, key=lambda c: c[0])
    try:
        trainer.load_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if session.rank == 0:
        print(f"[{config.progress_label}] resumed from {path} at step {step}", flush=True)
    return step


# Collective backends pick the network interface to listen on from the host's name unless told:
# on machines whose hostname resolves to a loopback address (Debian and Ubuntu write
# `127.0.1.1 <hostname>` to /etc/hosts) each DDP worker would advertise that address to the
# others, and the first all-reduce across machines fails to connect.
SOCKET_IFNAME_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that holds `address`, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in addresses):
            return name
    return None


def use_node_interface() -> str:
    """Point Gloo and NCCL at the interface that carries this Ray node's IP, unless the user set
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME; returns the line it logged. Runs in each DDP worker
    before its process group starts."""
    import os

    import ray

    address = ray.util.get_node_ip_address()
    chosen = interface_of(address)
    settings = []
    for variable in SOCKET_IFNAME_ENVS:
        if os.environ.get(variable):
            settings.append(f"{variable}={os.environ[variable]} (set by you)")
        elif chosen is not None:
            os.environ[variable] = chosen
            settings.append(f"{variable}={chosen}")
    if chosen is None and len(settings) < len(SOCKET_IFNAME_ENVS):
        settings.append(f"no interface holds {address}: the backends choose by hostname")
    line = f"[ddp] node {address}: " + ", ".join(settings)
    print(line, flush=True)
    return line


def torch_config():
    """Ray Train's `TorchConfig` whose workers first bind their collectives to the node's
    interface (`use_node_interface`); every DDP `TorchTrainer` of the pipeline takes it."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class NodeInterfaceBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(use_node_interface)
            super().on_start(worker_group, backend_config)

    class NodeInterfaceTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return NodeInterfaceBackend

    return NodeInterfaceTorchConfig()


def train_logging():
    """Ray Train's console logging for our runs: warnings and errors only (its INFO lines repeat
    what our own lines say, once per worker)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def _quiet_report_logs() -> None:
    """Ray Train logs every report's whole metrics dict at INFO from a logger named by its file
    path (ray/train/v2/_internal/execution/context.py), which `LoggingConfig`'s filter, keyed on
    names under "ray.train", lets through."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: WorkerConfig) -> None:
    """The Ray Train worker function (the train stage; Tune trials with several workers)."""
    run_worker(config, RayTrainSession())


def trial_worker(config: WorkerConfig, checkpoint_key: str) -> None:
    """A one-process Tune trial, run in the trial's own actor."""
    run_worker(config, TuneTrialSession(config.store, checkpoint_key))


def run_worker(config: WorkerConfig, session: Session) -> None:
    """Build, maybe resume, then `fit` until config.train.steps, reporting through `session`."""
    torch.set_num_threads(max(1, config.threads))
    trainer = Trainer.from_config(
        config.model,
        config.diffusion,
        config.train,
        seed=config.seed,
        device=session.device,
        rank=session.rank,
        wrap=session.wrap,
    )
    resumed_from = _resume(trainer, config, session)
    batches = rank_batches(config, session, trainer.step, trainer.device)
    closer = WindowCloser(config, session, resumed_from)
    fit(
        trainer,
        batches,
        log_every=config.log_every,
        hooks=closer.hooks(),
        reduce_losses=mean_over_ranks,
        stop_after=config.stop_after,
    )
    closer.finish(trainer)


def rank_batches(
    config: WorkerConfig, session: Session, start_step: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """This rank's share of each step's global batch, from step `start_step` on."""
    from ddpm.data import ShardDataset

    dataset = ShardDataset(
        fetch_prepared(config.store, config.data_key),
        "train",
        flip=config.train.flip,
        seed=config.seed,
        rank=session.rank,
        world_size=session.world,
    )
    return dataset.step_batches(
        config.train.batch_size // session.world,
        start_step=start_step,
        pin_memory=device.type == "cuda",
    )


@dataclasses.dataclass(frozen=True)
class WindowScore:
    """What rank 0's held-out evaluation found at the end of a window."""

    metric: str
    score: Any  # ddpm.evaluation.Score
    # The bound's terms at Evaluation.profile_timesteps (the run's last window only).
    profile: torch.Tensor | None = None


def window_report(
    window: Window, resumed_from: int, found: WindowScore | None
) -> tuple[list[tuple[int, dict[str, float]]], dict[str, Any]]:
    """One window's (MLflow rows, Ray report): a row per step, the report of its last step.

    Per step: the global batch's loss, and the lr, gradient norm and EMA decay, which every rank
    shares (the norm is taken after DDP's all-reduce, before clipping). The last row also gets
    the window's throughput and score; lists go to Ray only (the driver pairs trials image by
    image), MLflow gets scalars.
    """
    rows = [
        (window.first_step + i, {"loss": loss, **stats})
        for i, (loss, stats) in enumerate(zip(window.losses, window.stats, strict=True))
    ]
    summary = {
        "images_per_second": window.images_per_second,
        # Time this rank's step waited for its batch: the loader stalls the device if > 0.
        "data_wait_ms_per_step": 1000 * window.data_seconds / len(window.losses),
    }
    vectors: dict[str, list[float]] = {}
    if found is not None:
        summary[found.metric] = found.score.value
        summary[f"{found.metric}_stderr"] = found.score.stderr
        if found.score.per_image is not None:
            vectors["per_image"] = found.score.per_image.tolist()
        if found.profile is not None:
            vectors["bpd_profile"] = found.profile.tolist()
    metrics = {
        **rows[-1][1],
        "step": window.step,
        "resumed_from": resumed_from,
        "loss": float(np.mean(window.losses)),  # over the window, for Ray's progress table
        **summary,
        **vectors,
    }
    rows[-1][1].update(summary)
    return rows, metrics


class Progress:
    """Rank 0's progress: a bar that the driver draws (a terminal), or a line per window (a log
    file, CI). Other ranks show nothing."""

    def __init__(self, config: WorkerConfig, rank: int, start_step: int) -> None:
        self.label, self.steps, self.rank = config.progress_label, config.train.steps, rank
        self.bar = None
        if rank == 0 and config.progress_bar:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=self.steps, desc=self.label)
            self.bar.update(start_step)

    def show(self, window: Window) -> None:
        status = f"loss {np.mean(window.losses):.4f} {window.images_per_second:.0f} img/s"
        if self.bar is not None:
            self.bar.set_description(f"{self.label} {status}")
            self.bar.update(len(window.losses))
        elif self.rank == 0:
            print(f"[{self.label}] step {window.step}/{self.steps} {status}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ends_window(trainer: Trainer, window: Window) -> None:
    """A hook that does nothing: its interval makes `fit` close a window at those steps."""


class WindowCloser:
    """What a rank does whenever `fit` closes a window, in this order: score the EMA model
    (rank 0, when an evaluation is due), show progress, then log the window's metrics and report
    them, with a checkpoint when one is due.

    Every rank declares the same window ends (`hooks`), so all close the same windows and their
    collectives and reports line up.
    """

    def __init__(self, config: WorkerConfig, session: Session, resumed_from: int) -> None:
        self.config, self.session, self.resumed_from = config, session, resumed_from
        self.logger = MlflowLogger(config.mlflow if session.rank == 0 else None)
        evaluation = config.evaluation
        self.scorer = None
        if evaluation and session.rank == 0:
            self.scorer = _held_out_score(evaluation, session.device)
        self.checkpoint_every = config.checkpoint_every or config.train.steps
        self.progress = Progress(config, session.rank, resumed_from)

    def hooks(self) -> list[Hook]:
        ends = [self.checkpoint_every]
        if self.config.evaluation:
            ends.append(self.config.evaluation.every)
        return [*(Hook(_ends_window, every=n) for n in ends), Hook(self.close)]

    def close(self, trainer: Trainer, window: Window) -> None:
        found = self.score(trainer, window)
        self.progress.show(window)
        rows, metrics = window_report(window, self.resumed_from, found)
        self.logger.log(rows)
        if window.due(self.checkpoint_every):
            self.report_checkpoint(trainer, metrics, window.step)
        else:
            self.session.report(metrics, window.step)

    def score(self, trainer: Trainer, window: Window) -> WindowScore | None:
        """Rank 0's held-out score of the EMA model when an evaluation is due, else None."""
        evaluation = self.config.evaluation
        if self.scorer is None or not window.due(evaluation.every):
            return None
        score = self.scorer.evaluate(trainer.diffusion, trainer.ema.model)
        profile = None
        if window.final and evaluation.profile_timesteps:
            from ddpm.likelihood import bits_per_timestep

            profile = bits_per_timestep(
                trainer.diffusion,
                trainer.ema.model,
                self.scorer.images[: evaluation.profile_images].to(self.session.device),
                evaluation.profile_timesteps,
                generator=torch.Generator().manual_seed(evaluation.seed),
            )
        return WindowScore(evaluation.metric, score, profile)

    def report_checkpoint(self, trainer: Trainer, metrics: dict[str, Any], step: int) -> None:
        """Report with a checkpoint: rank 0's state and every rank's parameter digest."""
        rank = self.session.rank
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(Path(folder) / CHECKPOINT_FILE, trainer)
            digest = state_digest(trainer.model.state_dict())
            (Path(folder) / REPLICA_FILE.format(rank=rank)).write_text(digest + "\n")
            self.session.report(metrics, step, Path(folder))

    def finish(self, trainer: Trainer) -> None:
        """After `fit`: close the bar, and report once if no step ran, so the ranks stay in step
        and the driver learns where the run stood (Ray restored a finished run)."""
        self.progress.close()
        if trainer.step == self.resumed_from:
            self.session.report(
                {"step": trainer.step, "resumed_from": self.resumed_from}, trainer.step
            )
        if self.logger.unsent:
            print(
                f"[train] {self.logger.unsent} steps' metrics could not reach MLflow; the stage "
                "logs the loss history from the final checkpoint instead",
                flush=True,
            )
