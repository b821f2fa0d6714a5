"""The tune stage: a tiny real Ray Tune search whose trials are Ray Train runs, nested in MLflow."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import ray
import yaml

from ddpm.data import prepare_dataset
from pipelines import common
from pipelines import tune as tune_stage
from pipelines.prepare import prepare_kwargs

pytestmark = pytest.mark.slow

TINY = {
    "seed": 0,
    "data": {"image_size": 16, "max_images": 200},
    "model": {"config": "tiny", "overrides": {}},
    "diffusion": {"num_timesteps": 100, "schedule": "quadratic"},
    "tune": {
        "enabled": True,
        "num_samples": 2,
        "schedules": ["linear", "cosine"],
        "lr_min": 1.0e-4,
        "lr_max": 3.0e-3,
        "steps_per_trial": 4,
        "eval_every": 2,
        "grace_period": 2,
        "reduction_factor": 2,
        "eval_images": 16,
        "max_concurrent": 2,
        "workers_per_trial": 1,
    },
    "train": {"batch_size": 8, "lr": 5.0e-4, "warmup_steps": 2},
    "ray": {"num_cpus": 2},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(common.REPO_ROOT_ENV, str(root))
        mp.setenv(common.PIPELINE_ID_ENV, "test-tune-stage")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        prepare_dataset(**prepare_kwargs(common.load_params()))
        yield root


def run_tune(root, **tune):
    tree = yaml.safe_load((root / "params.yaml").read_text())
    tree["tune"].update(tune)
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    params = common.load_params()
    with common.mlflow_run("tune", params) as run:
        report = tune_stage.run(params)
    return params, report, run.info.run_id


def test_disabled_tune_passes_params_through(repo):
    _, report, _ = run_tune(repo, enabled=False)
    best = yaml.safe_load((repo / "tune/best.yaml").read_text())
    assert best == {"diffusion": {"schedule": "quadratic"}, "train": {"lr": 5.0e-4}}
    assert report["num_trials"] == 0
    assert json.loads((repo / "metrics/tune.json").read_text()) == report


def test_tune_picks_the_lowest_bpd_trial_and_nests_its_runs(repo):
    params = common.load_params()
    common.init_ray(params)
    try:
        params, report, parent_id = run_tune(repo, enabled=True)
    finally:
        ray.shutdown()

    # Each trial is an MLflow run nested under the stage's run, with its own schedule and lr.
    client = mlflow.MlflowClient(common.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == report["num_trials"] == 2
    assert {c.data.params["diffusion.schedule"] for c in children} == {"linear", "cosine"}

    finished = []
    for child in children:
        lr = float(child.data.params["train.lr"])
        assert 1.0e-4 <= lr <= 3.0e-3
        scores = client.get_metric_history(child.info.run_id, "mc_bpd")
        assert scores, "every trial reports its held-out bits/dim"
        for score in scores:
            # The bound in bits/dim of 8-bit images: positive, and for a barely trained model of
            # the order of the 8 bits a uniform code needs (measured ~8-14), not L_simple's scale.
            assert 0.0 < score.value < 64.0
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert max(m.step for m in losses) == max(s.step for s in scores)
        outcome = child.data.tags["tune_outcome"]
        # A trial ASHA stopped is closed as KILLED; the others end normally.
        assert child.info.status == ("FINISHED" if outcome == "completed" else "KILLED")
        if outcome == "completed":
            last = max(scores, key=lambda m: m.step)
            assert last.step == 4
            finished.append((last.value, child.data.params["diffusion.schedule"], lr))
    assert finished and report["num_stopped_early"] == 2 - len(finished)

    # best.yaml holds the lowest-bits/dim finished trial, which tune.json repeats.
    bpd, schedule, lr = min(finished)
    best = yaml.safe_load((repo / "tune/best.yaml").read_text())
    assert best["diffusion"] == {"schedule": schedule}
    assert math.isclose(best["train"]["lr"], lr, rel_tol=1e-9)
    saved = json.loads((repo / "metrics/tune.json").read_text())
    assert saved["best_schedule"] == schedule and math.isclose(saved["best_mc_bpd"], bpd)
    # The train stage reads it back as an overlay on params.
    tuned = common.tuned_params(params)
    assert tuned.diffusion.schedule == schedule and math.isclose(tuned.train.lr, lr)
