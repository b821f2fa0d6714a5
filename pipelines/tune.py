"""tune stage: Ray Tune over the β schedule and the learning rate, ASHA, trials as Ray Train runs.

    python -m pipelines.tune    # writes tune.out (tune/best.yaml), <evaluate.out_dir>/tune.json

Search space (params.tune): `diffusion.schedule` over tune.schedules (a grid: every schedule is
tried) x `train.lr` log-uniform in [tune.lr_min, tune.lr_max] (Tune's sampler, seeded by `seed`).
tune.num_samples is the total number of trials, rounded up to a multiple of the number of
schedules so each schedule gets the same number of lr draws.

Ranking: L_simple is NOT comparable across β schedules (each weights the timesteps differently
and its value depends on where ᾱ_t puts the noise), so trials are ranked by a
schedule-independent score of the EMA model on the held-out test split
(`ddpm.evaluation.HeldOutScore`): the Monte-Carlo bits/dim of the variational bound (tune.metric
"mc_bpd", default) or the offline classifier's Fréchet distance of a few DDIM samples
("classifier_fd"). Every trial is scored on the same images with the same seed. The best trial
is the lowest last-reported score among the trials that ASHA let run to the end.

Early stopping: ASHA with time_attr "training_iteration"; a trial reports once every
tune.eval_every steps, so grace_period (in steps) becomes ceil(grace_period / eval_every)
iterations and max_t ceil(steps_per_trial / eval_every).

Why each trial is a Ray Train `TorchTrainer` inside a Tune function trainable: Ray 2.60 runs
Train V2 by default, where a `TorchTrainer` is no longer itself a Tune trainable
(`Tuner(trainer)` is gone); the supported pattern is a function trainable that builds and fits
a `TorchTrainer` and forwards the workers' reports to Tune with
`ray.tune.integration.ray_train.TuneReportCallback` (installed source:
ray/tune/integration/ray_train.py; `ray.train.report` raises inside a bare Tune function). A
trial is thus the same DDP training loop as the train stage (`pipelines.worker.train_worker`),
with tune.workers_per_trial workers. The trial function itself only waits on its Train
controller, so it asks Tune for no CPU; tune.max_concurrent bounds how many trials hold Train
workers at once (2 on a 2-core machine, one 1-CPU worker each). A plain function trainable
would start faster, but it would tune a different code path than the one the train stage runs.

MLflow: the stage run is the parent; each trial opens its own run with the parent's id
(`mlflow.parentRunId`), its resolved params (the trial's schedule and lr) and, from rank 0,
loss per step and the score per report.

Reads only the train keys dvc.yaml lists for this stage (batch_size, warmup_steps, grad_clip,
ema_decay, ema_warmup, flip, precision): train.lr and train.steps never rerun tune.

Where trials run: anywhere in the cluster. The driver publishes the prepared data and the
classifier to the shared store (storage.root, pipelines/store.py); Tune's and every trial's Ray
Train results go to `<storage.root>/ray/tune/`; a trial gets the driver's MLflow URI and
provenance tags, so nothing of the driver's machine is read on the trial's node.
`tune.enabled: false` writes the params' own schedule and lr and runs no trial.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ddpm.io_utils import write_json
from pipelines.common import (
    absolute,
    gpu_available,
    mlflow_run,
    provenance_tags,
    require_resources,
    shared_store,
    stage_main,
    tracking_uri,
    write_yaml,
)
from pipelines.params import Params
from pipelines.store import Store, publish_blob, publish_prepared
from pipelines.worker import Evaluation, MlflowTarget, WorkerConfig, train_worker

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes, Ray's logical "memory" resource
# The store folder of Tune's and the trials' Ray results.
TUNE_DIR = "ray/tune"


def best_overlay(schedule: str, lr: float) -> dict[str, Any]:
    """What tune/best.yaml holds: the values train/sample/evaluate lay over params."""
    return {"diffusion": {"schedule": schedule}, "train": {"lr": float(lr)}}


def trial_params(params: Params, schedule: str, lr: float) -> Params:
    return params.merged(best_overlay(schedule, lr), source="tune trial")


def base_config(params: Params, shared: Store) -> WorkerConfig:
    """The worker config shared by every trial (each trial sets its schedule and lr); publishes
    what the trials read to the store."""
    t = params.tune
    data_key = publish_prepared(shared, absolute(params.data.out_dir))
    classifier_key = None
    if t.metric == "classifier_fd":
        classifier_key = publish_blob(shared, absolute(params.classifier.out))
    return WorkerConfig(
        model=params.model_config(),
        diffusion=params.diffusion,
        train=dataclasses.replace(params.train_config(), steps=t.steps_per_trial),
        seed=params.seed,
        store=shared,
        data_key=data_key,
        threads=1,
        # One report per evaluation: every report carries the score ASHA compares.
        log_every=t.eval_every,
        evaluation=Evaluation(
            metric=t.metric,
            every=t.eval_every,
            images=t.eval_images,
            seed=params.seed,
            store=shared,
            data_key=data_key,
            classifier_key=classifier_key,
        ),
    )


def run_trial(
    config: dict[str, Any],
    *,
    params: Params,
    base: WorkerConfig,
    parent: str,
    tracking: str,
    tags: dict[str, str],
    use_gpu: bool,
) -> None:
    """Tune function trainable: one short DDP training run as a Ray Train job."""
    import mlflow
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    schedule, lr = config["schedule"], float(config["lr"])
    trial_id = tune.get_context().get_trial_id()
    resolved = trial_params(params, schedule, lr)
    with mlflow_run(
        "tune",
        resolved,
        parent_run_id=parent,
        run_name=f"trial-{schedule}-{lr:.2e}",
        uri=tracking,
        tags=tags,
    ) as run:
        mlflow.set_tags({"tune_trial_id": trial_id, "tune_metric": params.tune.metric})
        config = dataclasses.replace(
            base,
            diffusion=dataclasses.replace(base.diffusion, schedule=schedule),
            train=dataclasses.replace(base.train, lr=lr),
            mlflow=MlflowTarget(tracking, run.info.run_id),
        )
        storage_path, storage_filesystem = base.store.ray_storage(TUNE_DIR)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=params.tune.workers_per_trial,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(
                name=f"{trial_id}-train",
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()


def mark_trial_runs(parent_id: str, params: Params, trials: list[dict[str, Any]]) -> None:
    """Close each trial's MLflow run with its outcome as Tune saw it.

    Tune ends every trial by stopping its process (ASHA's early stop, and also the stop when a
    trial reaches max_t), so the trial's own run is left RUNNING or FAILED; the workers of an
    early-stopped trial may also have logged a few steps past the report ASHA judged. The tag
    `tune_outcome` (completed | stopped_early) and the status FINISHED | KILLED say which
    trials competed to the end.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_trial = {r.data.tags.get("tune_trial_id"): r.info.run_id for r in runs}
    for row in trials:
        run_id = by_trial.get(row["trial_id"])
        if run_id is None:
            continue  # the trial died before it opened its run; Tune's error says why
        client.set_tag(run_id, "tune_outcome", "completed" if row["completed"] else "stopped_early")
        client.set_tag(run_id, "tune_last_reported_step", str(row["step"]))
        client.set_terminated(run_id, "FINISHED" if row["completed"] else "KILLED")


def run(params: Params) -> dict[str, Any]:
    """The stage inside an active MLflow run; writes best.yaml and tune.json, returns the latter."""
    import mlflow

    t = params.tune
    out, metrics_path = absolute(t.out), absolute(params.evaluate.out_dir) / "tune.json"
    if not t.enabled:
        write_yaml(out, best_overlay(params.diffusion.schedule, params.train.lr))
        report = {
            "enabled": False,
            "best_schedule": params.diffusion.schedule,
            "best_lr": params.train.lr,
            "num_trials": 0,
        }
        write_json(metrics_path, report)
        print(f"[tune] disabled: {out} passes params' schedule and lr through", flush=True)
        return report

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    use_gpu = gpu_available()
    require_resources(
        "tune.workers_per_trial (1 CPU each, + 1 GPU each on a GPU cluster)",
        t.workers_per_trial,
        t.workers_per_trial if use_gpu else 0,
    )
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("pipelines.tune.run needs an active MLflow run (the trials' parent)")
    # Trial results are scratch in the store. The folder is emptied first so that no trial of an
    # earlier run can be mistaken for one of this run (Ray Train V2 resumes a run by name).
    shared = shared_store(params)
    shared.delete(TUNE_DIR)
    storage_path, storage_filesystem = shared.ray_storage(TUNE_DIR)

    per_schedule = math.ceil(t.num_samples / len(t.schedules))
    max_t = math.ceil(t.steps_per_trial / t.eval_every)
    grace = min(max_t, max(1, math.ceil(t.grace_period / t.eval_every)))
    metric = t.metric
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            params=params,
            base=base_config(params, shared),
            parent=parent.info.run_id,
            tracking=tracking_uri(params),
            tags=provenance_tags("tune"),
            use_gpu=use_gpu,
        ),
        # No CPU (the Train workers hold those), but Ray refuses an all-zero request: the
        # trial's driver asks for a little memory, which is what it really uses.
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "schedule": tune.grid_search(list(t.schedules)),
            "lr": tune.loguniform(t.lr_min, t.lr_max),
        },
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="min",
            num_samples=per_schedule,
            search_alg=BasicVariantGenerator(
                random_state=params.seed, max_concurrent=t.max_concurrent
            ),
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_t,
                grace_period=grace,
                reduction_factor=t.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem
        ),
    )
    print(
        f"[tune] {per_schedule * len(t.schedules)} trials of {t.steps_per_trial} steps over "
        f"{list(t.schedules)} x lr in [{t.lr_min:g}, {t.lr_max:g}], ranked by {metric}",
        flush=True,
    )
    grid = tuner.fit()

    trials = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"tune trial {result.path} failed: {result.error}")
        last = result.metrics or {}
        trials.append(
            {
                "trial_id": str(last.get("trial_id", "")),
                "schedule": result.config["schedule"],
                "lr": float(result.config["lr"]),
                "step": int(last.get("step", 0)),
                metric: float(last.get(metric, math.nan)),
            }
        )
    for row in trials:
        row["completed"] = row["step"] >= t.steps_per_trial and math.isfinite(row[metric])
    mark_trial_runs(parent.info.run_id, params, trials)
    finished = [r for r in trials if r["completed"]]
    if not finished:
        raise RuntimeError(f"no tune trial reached step {t.steps_per_trial}: {trials}")
    best = min(finished, key=lambda r: r[metric])
    write_yaml(out, best_overlay(best["schedule"], best["lr"]))
    report = {
        "enabled": True,
        "metric": metric,
        "best_schedule": best["schedule"],
        "best_lr": best["lr"],
        f"best_{metric}": best[metric],
        "num_trials": len(trials),
        "num_stopped_early": len(trials) - len(finished),
    }
    write_json(metrics_path, report)
    mlflow.log_metrics({f"best_{metric}": best[metric], "best_lr": best["lr"]})
    mlflow.set_tag("best_schedule", best["schedule"])
    mlflow.log_dict({"trials": trials}, "tune/trials.json")
    mlflow.log_artifact(str(out), "tune")
    for row in sorted(trials, key=lambda r: (math.isnan(r[metric]), r[metric])):
        print(
            f"[tune] {row['schedule']:>9} lr {row['lr']:.2e}: {metric} {row[metric]:.4f} "
            f"after {row['step']} steps",
            flush=True,
        )
    print(f"[tune] best: {best['schedule']} lr {best['lr']:.3g} -> {out}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("tune", run, __doc__, argv)


if __name__ == "__main__":
    main()
