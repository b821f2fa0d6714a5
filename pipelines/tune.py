"""tune stage: a deterministic successive-halving search over the β schedule and the learning
rate, on Ray Tune.

    python -m pipelines.tune    # writes tune.out (tune/best.yaml), <evaluate.out_dir>/tune.json
                                # and details/tune.json, <evaluate.plots_dir>/tune_*.{csv,png}

The trials (`plan_trials`): every schedule in tune.schedules meets the same learning rates,
ceil(tune.num_samples / len(schedules)) of them, one drawn log-uniformly from each of as many equal
slices of [tune.lr_min, tune.lr_max] by a numpy generator seeded by `seed`. A schedule thus wins on
its own merit, not on its luck with the lr; the trials are fixed before anything runs.

Ranking: L_simple is NOT comparable across β schedules (each weights the timesteps differently),
so trials are ranked by a schedule-independent score of the EMA model on the held-out test split
(`ddpm.evaluation.HeldOutScore`): the Monte-Carlo bits/dim of the clipped variational bound
(tune.metric "mc_bpd", default) or the offline classifier's Fréchet distance of a few DDIM samples
("classifier_fd"). Every trial is scored on the same images with the same (t, ε) draws (common
random numbers), so the differences between trials are paired: each rung's table gives every
trial's score ± its standard error over the images and its paired difference to the rung's best
± that difference's standard error. Ties are broken by trial index.

Successive halving, synchronous (`rung_steps`): rung 0 trains every trial for tune.grace_period
steps; each later rung trains the best 1/tune.reduction_factor of the previous rung's trials
(at least one) on to reduction_factor times as many steps, resuming each from its own checkpoint
at the end of the previous rung, until tune.steps_per_trial. A rung is one Tuner run whose trials
start together (at most tune.max_concurrent at a time) and the next rung is decided only when all
have finished, so the decisions depend on the scores alone, never on which trial finished first:
the same seed gives the same trials, scores, decisions and best.yaml with 1 or with many trials at
a time. (ASHA, used before, decided as reports arrived, and a rerun of the same commit chose a
different schedule.) Training is deterministic for a seed: a trial resumed at a rung boundary
continues exactly as if it had never stopped (`ddpm.training` draws each step's randomness from
the seed and the step alone). The best trial is the lowest score among the trials of the last rung.

Where a trial trains: the same training loop as the train stage (`pipelines.worker.run_worker`),
in one of two places. With tune.workers_per_trial 1 (the default) it runs in the Tune trial's own
actor (1 CPU, + 1 GPU on a GPU cluster), reports with `ray.tune.report` and writes its checkpoints
to the store; actors are reused across a rung's trials, so torch is imported once per actor. A
one-worker Ray Train run per trial cost about 60 s of start-up, checkpoint upload and teardown
around ~13 s of training on 2 CPU cores. With more workers, a trial is a DDP Ray Train
`TorchTrainer` inside the function trainable (Ray 2.60 runs Train V2, where a `TorchTrainer` is no
longer itself a Tune trainable; `TuneReportCallback` forwards the workers' reports to Tune), and
the function only waits on its Train controller, so it asks Tune for no CPU.

MLflow: the stage run is the parent; each trial is one nested run for all its rungs, opened by the
driver with the trial's resolved params, with loss per step and the score (± stderr) per report
from rank 0, and closed FINISHED with `tune_outcome` (best | completed | stopped_at_rung_<k>) and
its last rung's score, stderr and paired difference to the best. The stage run gets both
pictures: each trial's held-out score against step, coloured by schedule
(plots/tune_search.png), and the bits/dim of the bound per timestep of each schedule's
furthest-trained best trial (plots/tune_bpd_per_timestep.png): where each schedule spends its bits.

Reads only the train keys dvc.yaml lists for this stage (batch_size, warmup_steps, grad_clip,
ema_decay, ema_warmup, flip, precision): train.lr and train.steps never rerun tune.

Where trials run: anywhere in the cluster. The driver publishes the prepared data and the
classifier to the shared store (storage.root, pipelines/store.py); Tune's results and every
trial's checkpoints go to `<storage.root>/ray/tune/`; a trial gets the driver's MLflow run id
and URI, so nothing of the driver's machine is read on the trial's node.
`tune.enabled: false` runs no trial and writes an empty best.yaml: train then uses params' own
schedule and lr.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.io_utils import atomic_write
from pipelines.cluster import gpu_available, require_resources
from pipelines.params import Params, TuneParams
from pipelines.plots import figure as new_figure
from pipelines.plots import save
from pipelines.project import absolute, repo_root, shared_store, write_yaml
from pipelines.provenance import experiment_label, recorded_provenance
from pipelines.run_info import phase, write_run_info
from pipelines.stage_cli import stage_main
from pipelines.stage_metrics import STDERR_SUFFIX, headline, write_stage_metrics
from pipelines.store import Store, publish_blob, publish_prepared
from pipelines.tracking import mlflow_run, tracking_uri
from pipelines.worker import (
    Evaluation,
    MlflowTarget,
    WorkerConfig,
    torch_config,
    train_logging,
    train_worker,
    trial_worker,
)

# The stage's summary keys that go to run_info/tune.json, not the metrics file: the search's
# shape, which follows from params.
TUNE_RUN_INFO = ("enabled", "num_trials", "num_rungs", "num_stopped_early")
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes, Ray's logical "memory" resource
# The store folder of Tune's and the trials' Ray results.
TUNE_DIR = "ray/tune"
# The bits-per-timestep picture: this many log-spaced timesteps (one network call each) on this
# many held-out images, at the end of every rung.
PROFILE_POINTS = 40
PROFILE_IMAGES = 8
SCHEDULE_COLOURS = {
    "linear": "tab:blue",
    "cosine": "tab:orange",
    "sigmoid": "tab:green",
    "quadratic": "tab:red",
    "constant": "tab:purple",
}


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One point of the search, fixed before anything runs."""

    index: int
    schedule: str
    lr: float

    @property
    def name(self) -> str:
        return f"trial-{self.index:02d}-{self.schedule}-{self.lr:.2e}"


@dataclasses.dataclass
class RungResult:
    """What one trial reported at the end of one rung."""

    spec: TrialSpec
    step: int
    score: float
    stderr: float
    per_image: list[float] | None
    profile: list[float] | None
    curve: list[tuple[int, float]]  # (step, score) of every report in this rung
    diff: float = math.nan  # paired difference to the rung's best, and its standard error
    diff_stderr: float = math.nan
    kept: bool = False


def best_overlay(schedule: str, lr: float) -> dict[str, Any]:
    """What tune/best.yaml holds: the values train/sample/evaluate lay over params."""
    return {"diffusion": {"schedule": schedule}, "train": {"lr": float(lr)}}


def trial_params(params: Params, schedule: str, lr: float) -> Params:
    return params.merged(best_overlay(schedule, lr), source="tune trial")


def plan_trials(t: TuneParams, seed: int) -> list[TrialSpec]:
    """Every schedule x the same learning rates: one log-uniform draw in each of
    ceil(num_samples / len(schedules)) equal slices of log [lr_min, lr_max], seeded by `seed`."""
    per_schedule = math.ceil(t.num_samples / len(t.schedules))
    edges = np.linspace(math.log(t.lr_min), math.log(t.lr_max), per_schedule + 1)
    rng = np.random.default_rng(seed)
    lrs = [
        float(math.exp(rng.uniform(lo, hi))) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    specs = [(schedule, lr) for lr in lrs for schedule in t.schedules]
    return [TrialSpec(i, schedule, lr) for i, (schedule, lr) in enumerate(specs)]


def rung_steps(t: TuneParams) -> list[int]:
    """The step each rung trains to: grace_period, x reduction_factor, ..., steps_per_trial."""
    steps = [min(t.grace_period, t.steps_per_trial)]
    while steps[-1] < t.steps_per_trial:
        steps.append(min(steps[-1] * t.reduction_factor, t.steps_per_trial))
    return steps


def profile_timesteps(num_timesteps: int) -> tuple[int, ...]:
    """0-based timesteps, log-spaced from 0 to T-1: the bound's terms fall off roughly as 1/t."""
    points = np.geomspace(1, num_timesteps, min(PROFILE_POINTS, num_timesteps))
    return tuple(int(i) for i in np.unique(np.round(points).astype(np.int64) - 1))


def base_config(params: Params, shared: Store) -> WorkerConfig:
    """The worker config shared by every trial (each trial sets its schedule, lr and steps);
    publishes what the trials read to the store."""
    t = params.tune
    data_key = publish_prepared(shared, absolute(params.data.out_dir))
    classifier_key = None
    if t.metric == "classifier_fd":
        classifier_key = publish_blob(shared, absolute(params.classifier.out))
    return WorkerConfig(
        model=params.model_config(),
        diffusion=params.diffusion,
        train=params.train_config(),
        seed=params.seed,
        store=shared,
        data_key=data_key,
        threads=1,
        # One report per evaluation: every report carries the score.
        log_every=t.eval_every,
        evaluation=Evaluation(
            metric=t.metric,
            every=t.eval_every,
            images=t.eval_images,
            seed=params.seed,
            store=shared,
            data_key=data_key,
            classifier_key=classifier_key,
            profile_timesteps=profile_timesteps(params.diffusion.num_timesteps)
            if t.metric == "mc_bpd"
            else (),
            profile_images=min(PROFILE_IMAGES, t.eval_images),
        ),
    )


def run_key(spec: TrialSpec, rung: int) -> str:
    """The store folder of one trial's Ray Train run in one rung."""
    return f"{TUNE_DIR}/{spec.name}-rung-{rung}"


def run_trial(
    config: dict[str, Any],
    *,
    specs: list[TrialSpec],
    base: WorkerConfig,
    rung: int,
    steps: int,
    runs: dict[int, MlflowTarget],
    workers: int,
    use_gpu: bool,
    progress_bar: bool,
) -> None:
    """Tune function trainable: one trial's rung, resumed from the trial's checkpoint at the end
    of the previous rung. One worker trains right here, in the trial's actor; more are a DDP
    Ray Train run that this function waits on."""
    spec = specs[config["trial"]]
    worker_config = dataclasses.replace(
        base,
        diffusion=dataclasses.replace(base.diffusion, schedule=spec.schedule),
        train=dataclasses.replace(base.train, lr=spec.lr, steps=steps),
        mlflow=runs[spec.index],
        run_key=run_key(spec, rung - 1) if rung else None,
        progress_label=f"{spec.name} rung {rung}",
        progress_bar=progress_bar,
    )
    if workers == 1:
        trial_worker(worker_config, checkpoint_key=run_key(spec, rung))
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    storage_path, storage_filesystem = base.store.ray_storage(TUNE_DIR)
    TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
        torch_config=torch_config(),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_key(spec, rung).removeprefix(f"{TUNE_DIR}/"),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[TuneReportCallback()],
            logging_config=train_logging(),
        ),
    ).fit()


def trial_resources(workers: int, use_gpu: bool) -> dict[str, float]:
    """What Tune reserves for a trial's own actor."""
    if workers == 1:
        return {"cpu": 1, "gpu": 1 if use_gpu else 0}
    # No CPU (the Train workers hold those), but Ray refuses an all-zero request: the trial's
    # driver asks for a little memory, which is what it really uses.
    return {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}


def run_rung(
    rung: int,
    steps: int,
    trials: list[TrialSpec],
    *,
    specs: list[TrialSpec],
    params: Params,
    base: WorkerConfig,
    runs: dict[int, MlflowTarget],
    use_gpu: bool,
) -> list[RungResult]:
    """Train `trials` to `steps` as one Tuner run and collect their last reports, in trial order."""
    from ray import tune

    t = params.tune
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            specs=specs,
            base=base,
            rung=rung,
            steps=steps,
            runs=runs,
            workers=t.workers_per_trial,
            use_gpu=use_gpu,
            progress_bar=sys.stdout.isatty(),
        ),
        trial_resources(t.workers_per_trial, use_gpu),
    )
    tuner = rung_tuner(trainable, rung, trials, t, base.store)
    results = [rung_result(result, specs, rung, steps, t.metric) for result in tuner.fit()]
    return sorted(results, key=lambda r: r.spec.index)


def rung_tuner(trainable: Any, rung: int, trials: list[TrialSpec], t: TuneParams, store: Store):
    """The Tuner of one rung: a grid over its trials' indices, results in the store."""
    from ray import tune

    storage_path, storage_filesystem = store.ray_storage(TUNE_DIR)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([spec.index for spec in trials])},
        # A one-process trial's actor has imported torch and loaded the data: the next trial
        # of the rung starts in it.
        tune_config=tune.TuneConfig(max_concurrent_trials=t.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"rung-{rung}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            verbose=0,
        ),
    )


def rung_result(
    result: Any, specs: list[TrialSpec], rung: int, steps: int, metric: str
) -> RungResult:
    """One trial's Tune result at the end of a rung; RuntimeError if it failed or stopped short."""
    spec = specs[result.config["trial"]]
    last = result.metrics or {}
    if result.error is not None or int(last.get("step", 0)) != steps:
        raise RuntimeError(
            f"tune trial {spec.name} failed in rung {rung} (to step {steps}); its Ray run "
            f"is {result.path}: {result.error or f'last report {last}'}"
        )
    frame = result.metrics_dataframe
    curve = []
    if frame is not None and metric in frame:
        rows = frame[["step", metric]].dropna()
        curve = [(int(a), float(b)) for a, b in zip(rows["step"], rows[metric], strict=True)]
    return RungResult(
        spec=spec,
        step=steps,
        score=float(last.get(metric, math.nan)),
        stderr=float(last.get(f"{metric}_stderr", math.nan)),
        per_image=last.get("per_image"),
        profile=last.get("bpd_profile"),
        curve=curve,
    )


def rank(results: list[RungResult], keep: int) -> list[RungResult]:
    """Order by score (NaN last, ties by trial index), pair each with the best, mark the kept."""
    import torch

    from ddpm.evaluation import paired_difference

    ordered = sorted(results, key=lambda r: (math.isnan(r.score), r.score, r.spec.index))
    best = ordered[0]
    for position, result in enumerate(ordered):
        result.kept = position < keep and math.isfinite(result.score)
        if result.per_image is not None and best.per_image is not None:
            result.diff, result.diff_stderr = paired_difference(
                torch.tensor(result.per_image), torch.tensor(best.per_image)
            )
        elif math.isfinite(result.score) and math.isfinite(best.score):
            result.diff = result.score - best.score
    return ordered


def search(
    params: Params, parent_run_id: str, tags: dict[str, str]
) -> tuple[list[list[RungResult]], dict[int, MlflowTarget]]:
    """Every rung's ranked results (the first of the last rung is the best trial) and each
    trial's MLflow run, nested under `parent_run_id` with the stage's provenance `tags`."""
    t = params.tune
    specs = plan_trials(t, params.seed)
    use_gpu = gpu_available()
    shared = shared_store(params)
    # Trial results are scratch in the store. The folder is emptied first so that no trial of an
    # earlier run can be mistaken for one of this run (Ray Train V2 resumes a run by name).
    with phase("publish"):
        shared.delete(TUNE_DIR)
        base = base_config(params, shared)
    with phase("mlflow_log"):
        runs = open_trial_runs(params, specs, parent_run_id, tags)
    milestones = rung_steps(t)
    print(
        f"[tune] {len(specs)} trials ({list(t.schedules)} x {len(specs) // len(t.schedules)} lr "
        f"in [{t.lr_min:g}, {t.lr_max:g}]), successive halving at steps {milestones}, ranked by "
        f"{t.metric}",
        flush=True,
    )
    rungs: list[list[RungResult]] = []
    alive = specs
    for rung, steps in enumerate(milestones):
        last = rung == len(milestones) - 1
        keep = len(alive) if last else max(1, len(alive) // t.reduction_factor)
        with phase("compute"):
            results = run_rung(
                rung, steps, alive, specs=specs, params=params, base=base, runs=runs,
                use_gpu=use_gpu,
            )  # fmt: skip
        ranked = rank(results, keep)
        rungs.append(ranked)
        print_rung(rung, steps, ranked, t.metric)
        alive = sorted((r.spec for r in ranked if r.kept), key=lambda s: s.index)
        if not alive:
            raise RuntimeError(f"no tune trial has a finite {t.metric} after rung {rung}")
    return rungs, runs


def open_trial_runs(
    params: Params, specs: list[TrialSpec], parent_run_id: str, tags: dict[str, str]
) -> dict[int, MlflowTarget]:
    """One nested MLflow run per trial, with the trial's resolved params, for its workers to
    log to; the driver closes them with their outcome (`close_trial_runs`)."""
    tracking = tracking_uri(params)
    runs: dict[int, MlflowTarget] = {}
    for spec in specs:
        resolved = trial_params(params, spec.schedule, spec.lr)
        with mlflow_run(
            "tune",
            resolved,
            {**tags, "tune_trial": spec.name},
            nested=True,
            parent_run_id=parent_run_id,
            run_name=f"{spec.name} · {experiment_label(tags)}",
            uri=tracking,
        ) as run:
            runs[spec.index] = MlflowTarget(tracking, run.info.run_id)
    return runs


def print_rung(rung: int, steps: int, ranked: list[RungResult], metric: str) -> None:
    print(
        f"[tune] rung {rung} (step {steps}): {metric} ± se, paired difference to the best",
        flush=True,
    )
    for r in ranked:
        print(
            f"[tune]   {r.spec.name:<32} {r.score:9.4f} ± {r.stderr:.4f}   "
            f"{r.diff:+.4f} ± {r.diff_stderr:.4f}   {'kept' if r.kept else 'stopped'}",
            flush=True,
        )


def last_results(rungs: list[list[RungResult]]) -> list[tuple[int, RungResult]]:
    """Each trial's last rung and its result there, in trial order."""
    last: dict[int, tuple[int, RungResult]] = {}
    for rung, ranked in enumerate(rungs):
        for result in ranked:
            last[result.spec.index] = (rung, result)
    return [last[index] for index in sorted(last)]


def outcome(rung: int, result: RungResult, rungs: list[list[RungResult]]) -> str:
    if result is rungs[-1][0]:
        return "best"
    return "completed" if rung == len(rungs) - 1 else f"stopped_at_rung_{rung}"


def close_trial_runs(
    rungs: list[list[RungResult]], runs: dict[int, MlflowTarget], metric: str
) -> None:
    """Each trial's run gets its outcome and its last rung's score, stderr and paired difference
    to that rung's best. The runs stay FINISHED: a trial that successive halving did not continue
    ended normally, the search chose not to spend more on it."""
    from mlflow.tracking import MlflowClient

    for rung, result in last_results(rungs):
        target = runs[result.spec.index]
        client = MlflowClient(target.tracking_uri)
        client.set_tag(target.run_id, "tune_outcome", outcome(rung, result, rungs))
        client.set_tag(target.run_id, "tune_last_rung", str(rung))
        values = {
            f"final_{metric}": result.score,
            f"final_{metric}_stderr": result.stderr,
            "diff_to_best": result.diff,
            "diff_to_best_stderr": result.diff_stderr,
        }
        for key, value in values.items():
            if math.isfinite(value):
                client.log_metric(target.run_id, key, value, step=result.step)


def write_trials_csv(path: Path, rungs: list[list[RungResult]], metric: str) -> None:
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["rung", "step", "trial", "schedule", "lr", metric, "stderr", "diff_to_best",
             "diff_stderr", "kept"]
        )  # fmt: skip
        for rung, ranked in enumerate(rungs):
            for r in ranked:
                writer.writerow(
                    [rung, r.step, r.spec.index, r.spec.schedule, f"{r.spec.lr:.6g}",
                     f"{r.score:.6f}", f"{r.stderr:.6f}", f"{r.diff:.6f}",
                     f"{r.diff_stderr:.6f}", int(r.kept)]
                )  # fmt: skip


def curves(rungs: list[list[RungResult]]) -> dict[int, tuple[TrialSpec, list[tuple[int, float]]]]:
    """Each trial's held-out score against step, over all its rungs."""
    out: dict[int, tuple[TrialSpec, list[tuple[int, float]]]] = {}
    for ranked in rungs:
        for r in ranked:
            out.setdefault(r.spec.index, (r.spec, []))[1].extend(r.curve)
    return out


def schedule_profiles(rungs: list[list[RungResult]]) -> dict[str, RungResult]:
    """For each schedule, its best trial in the last rung any of its trials reached."""
    profiles: dict[str, RungResult] = {}
    for ranked in rungs:  # later rungs overwrite: they trained further
        seen: set[str] = set()
        for r in ranked:  # ranked best first
            if r.profile is not None and r.spec.schedule not in seen:
                profiles[r.spec.schedule] = r
                seen.add(r.spec.schedule)
    return profiles


def write_pictures(
    plots_dir: Path,
    rungs: list[list[RungResult]],
    metric: str,
    timesteps: tuple[int, ...],
    missing: str,
) -> list[Path]:
    """plots/tune_search.png (score against step per trial, coloured by schedule; the curves in
    tune_curves.csv) and plots/tune_bpd_per_timestep.png (each schedule's terms of the bound; the
    numbers in tune_bpd_per_timestep.csv). All four files are always written, so that none keeps
    an earlier run's content: where there is nothing to draw, the picture says why (`missing`)."""
    search = write_search_picture(plots_dir, rungs, metric, missing)
    if not rungs or metric == "mc_bpd":
        reason = missing
    else:
        reason = f"tune.metric is {metric!r}: trials computed no bound"
    return [search, write_profile_picture(plots_dir, rungs, timesteps, reason)]


def write_search_picture(
    plots_dir: Path, rungs: list[list[RungResult]], metric: str, missing: str
) -> Path:
    """plots/tune_curves.csv and plots/tune_search.png: each trial's score against step."""
    trial_curves = curves(rungs).values()
    with atomic_write(plots_dir / "tune_curves.csv", "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["trial", "schedule", "lr", "step", metric])
        for spec, curve in trial_curves:
            for step, value in curve:
                writer.writerow([spec.index, spec.schedule, f"{spec.lr:.6g}", step, f"{value:.6f}"])
    figure, axes = new_figure()
    labelled: set[str] = set()
    for spec, curve in trial_curves:
        if not curve:
            continue
        steps, values = zip(*curve, strict=True)
        label = spec.schedule if spec.schedule not in labelled else None
        labelled.add(spec.schedule)
        colour = SCHEDULE_COLOURS.get(spec.schedule)
        axes.plot(steps, values, marker="o", color=colour, label=label, alpha=0.85)
        axes.annotate(f"{spec.lr:.1e}", (steps[-1], values[-1]), fontsize=7, color=colour)
    axes.set_xlabel("training step")
    axes.set_ylabel(f"held-out {metric}" + (" (bits/dim)" if metric == "mc_bpd" else ""))
    axes.set_title("Tune: each trial's held-out score (lr at the end of each line)")
    if labelled:
        axes.legend(title="β schedule")
    else:
        axes.text(0.5, 0.5, missing, ha="center", va="center", transform=axes.transAxes)
    axes.grid(alpha=0.3)
    return save(figure, plots_dir / "tune_search.png")


def write_profile_picture(
    plots_dir: Path, rungs: list[list[RungResult]], timesteps: tuple[int, ...], missing: str
) -> Path:
    """plots/tune_bpd_per_timestep.csv and .png: the bound's terms of each schedule's best."""
    profiles = schedule_profiles(rungs)
    with atomic_write(plots_dir / "tune_bpd_per_timestep.csv", "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["schedule", "trial", "step", "t", "bits_per_dim"])
        for schedule, r in profiles.items():
            for t, value in zip(timesteps, r.profile, strict=True):
                writer.writerow([schedule, r.spec.index, r.step, t + 1, f"{value:.6g}"])
    figure, axes = new_figure()
    for schedule, r in profiles.items():
        axes.plot(
            [t + 1 for t in timesteps],  # the paper's 1-based t
            r.profile,
            marker=".",
            color=SCHEDULE_COLOURS.get(schedule),
            label=f"{schedule} (lr {r.spec.lr:.1e}, step {r.step})",
        )
    axes.set_xlabel("timestep t (L_0 at t = 1, L_{t-1} above)")
    axes.set_ylabel("bits/dim of the term")
    axes.set_title("Where the bits go: each schedule's best trial, per term of the bound")
    if profiles:
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.legend()
    else:
        axes.text(0.5, 0.5, missing, ha="center", va="center", transform=axes.transAxes)
    axes.grid(alpha=0.3, which="both")
    return save(figure, plots_dir / "tune_bpd_per_timestep.png")


def write_schedule_picture(plots_dir: Path, params: Params, schedules: list[str]) -> Path:
    """plots/schedules.png: ᾱ_t and the signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) against t for
    each schedule searched (params' own when tune is disabled): where each puts the noise."""
    from ddpm.schedules import derived_constants, make_betas

    d = params.diffusion
    fig, (left, right) = new_figure(width=10.0, height=4.0, ncols=2)
    for schedule in schedules:
        betas = make_betas(schedule, d.num_timesteps, d.beta_start, d.beta_end)
        alpha_bar = derived_constants(betas)["alphas_cumprod"]
        t = np.arange(1, d.num_timesteps + 1)
        colour = SCHEDULE_COLOURS.get(schedule)
        left.plot(t, alpha_bar, color=colour, label=schedule)
        right.plot(t, alpha_bar / (1.0 - alpha_bar), color=colour, label=schedule)
    left.set_title("ᾱ_t: the signal kept at step t")
    left.set_xlabel("timestep t")
    right.set_title("signal-to-noise ratio ᾱ_t / (1 - ᾱ_t)")
    right.set_xlabel("timestep t")
    right.set_yscale("log")
    for axes in (left, right):
        axes.grid(alpha=0.3, which="both")
        axes.legend(title="β schedule")
    return save(fig, plots_dir / "schedules.png")


def _nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run(params: Params) -> dict[str, Any]:
    """The stage inside an active MLflow run; writes best.yaml, tune.json (the search's result),
    run_info/tune.json (its shape) and the plots; returns both in one dict."""
    import mlflow

    t = params.tune
    if not t.enabled:
        return run_disabled(params)
    require_resources(
        "tune.workers_per_trial (1 CPU each, + 1 GPU each on a GPU cluster)",
        t.workers_per_trial,
        t.workers_per_trial if gpu_available() else 0,
    )
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("pipelines.tune.run needs an active MLflow run (the trials' parent)")
    rungs, runs = search(params, parent.info.run_id, recorded_provenance(parent.data.tags))
    with phase("mlflow_log"):
        close_trial_runs(rungs, runs, t.metric)
    report = tune_report(rungs, t.metric)
    with phase("outputs"):
        files = write_outputs(params, rungs, report)
    with phase("mlflow_log"):
        log_outputs(rungs[-1][0], report, files)
    best, out = rungs[-1][0], absolute(t.out)
    print(
        f"[tune] best: {best.spec.schedule} lr {best.spec.lr:.3g} ({t.metric} {best.score:.4f} "
        f"± {best.stderr:.4f}) -> {out}",
        flush=True,
    )
    return report


def run_disabled(params: Params) -> dict[str, Any]:
    """tune.enabled false: an empty best.yaml and tune.json, and pictures that say why."""
    t = params.tune
    out, plots_dir = absolute(t.out), absolute(params.evaluate.plots_dir)
    # Nothing to lay over params, and no copy of params' schedule and lr: tune does not depend
    # on them (changing train.lr must not rerun a search), so a copy would go stale the moment
    # they change.
    write_yaml(out, {})
    report = {"enabled": False, "num_trials": 0}
    write_stage_metrics(absolute(params.evaluate.out_dir), "tune", {}, {})
    write_run_info(repo_root(), "tune", report)
    write_trials_csv(plots_dir / "tune_trials.csv", [], t.metric)
    write_pictures(plots_dir, [], t.metric, (), missing="tune.enabled is false: no search ran")
    write_schedule_picture(plots_dir, params, [params.diffusion.schedule])
    print(f"[tune] disabled: train uses params' own schedule and lr ({out} is empty)", flush=True)
    return report


def tune_report(rungs: list[list[RungResult]], metric: str) -> dict[str, Any]:
    """The search's result (the best trial, the runner-up's paired gap) and its shape
    (TUNE_RUN_INFO); a statistic that does not exist, such as the standard error of the gap
    between two Fréchet distances (no per-image values to pair), is None (JSON has no NaN)."""
    best = rungs[-1][0]
    runner_up = rungs[-1][1] if len(rungs[-1]) > 1 else None
    report = {
        "enabled": True,
        "best_schedule": best.spec.schedule,
        "best_lr": best.spec.lr,
        f"best_{metric}": best.score,
        f"best_{metric}_stderr": best.stderr,
        # How far the runner-up is behind, paired over the same images and draws.
        "runner_up_gap": runner_up.diff if runner_up else None,
        "runner_up_gap_stderr": runner_up.diff_stderr if runner_up else None,
        "num_trials": len(rungs[0]),
        "num_rungs": len(rungs),
        "num_stopped_early": len(rungs[0]) - len(rungs[-1]),
    }
    return {k: None if _nan(v) else v for k, v in report.items()}


def tune_headline(report: dict[str, Any], metric: str) -> dict[str, Any]:
    """metrics/tune.json: the best trial's score ± its standard error under the name the
    evaluate stage gives the same estimate, lr and schedule; the runner-up's gap is in
    metrics/details/tune.json."""
    best = {
        metric: report[f"best_{metric}"],
        metric + STDERR_SUFFIX: report[f"best_{metric}_stderr"],
    }
    return {
        **headline(best, [metric]),
        "lr": report["best_lr"],
        "schedule": report["best_schedule"],
    }


def write_outputs(
    params: Params, rungs: list[list[RungResult]], report: dict[str, Any]
) -> list[Path]:
    """best.yaml, tune.json, run_info/tune.json, the trials' table and the pictures; returns
    the files the stage's MLflow run gets, best.yaml last."""
    t = params.tune
    plots_dir = absolute(params.evaluate.plots_dir)
    write_trials_csv(plots_dir / "tune_trials.csv", rungs, t.metric)
    pictures = write_pictures(
        plots_dir,
        rungs,
        t.metric,
        profile_timesteps(params.diffusion.num_timesteps),
        missing="no trial reported a score",
    )
    pictures.append(write_schedule_picture(plots_dir, params, list(t.schedules)))
    best = rungs[-1][0]
    write_yaml(absolute(t.out), best_overlay(best.spec.schedule, best.spec.lr))
    # The metrics files hold what the search found; how many trials and rungs it took follows
    # from params, so it goes beside.
    found = {k: v for k, v in report.items() if k not in TUNE_RUN_INFO}
    write_stage_metrics(
        absolute(params.evaluate.out_dir), "tune", tune_headline(report, t.metric), found
    )
    write_run_info(repo_root(), "tune", {k: report[k] for k in TUNE_RUN_INFO})
    return [plots_dir / "tune_trials.csv", *pictures, absolute(t.out)]


def log_outputs(best: RungResult, report: dict[str, Any], files: list[Path]) -> None:
    """The stage's MLflow run: the report's numbers, the best trial, the files."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in report.items() if _number(v)})
    mlflow.set_tag("best_schedule", best.spec.schedule)
    mlflow.set_tag("best_trial", best.spec.name)
    for path in files:
        mlflow.log_artifact(str(path), "tune")


def main(argv: list[str] | None = None) -> None:
    # Tune's newer console output prints a configuration box and result paths for every Tuner
    # run whatever `verbose` says; the classic output at verbose 0 prints nothing, and the stage
    # prints each rung's table itself. Set for the stage's own process, at its entry.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    stage_main("tune", run, __doc__, argv)


if __name__ == "__main__":
    main()
