"""The tune stage: a tiny real Ray Tune search, its trials nested in MLflow. One-worker trials
train in Tune's own actors; a trial of two workers is a DDP Ray Train run.

The session's tiny DAG (tests/tiny_dag.py) ran the search with two trials at a time; the runs
that change what tune wrote do so in a copy of its repository."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import mlflow
import pytest
import yaml
from tiny_dag import change_params

from pipelines import project, provenance, tracking
from pipelines import tune as tune_stage
from pipelines.params import TuneParams

pytestmark = pytest.mark.slow


def run_tune(root, **tune):
    """The stage's `run` inside its MLflow run, after these tune keys are written to
    params.yaml."""
    change_params(root, tune=tune)
    params = project.load_params()
    with tracking.mlflow_run("tune", params, provenance.provenance_tags("tune")) as run:
        report = tune_stage.run(params)
    return params, report, run.info.run_id


# What every stage adds to its run info (pipelines/run_info.py, pipelines/stage_cli.py).
EVERY_STAGE_RUN_INFO = ("cpu_kernels", "seconds")


def run_info(root, stage: str) -> dict:
    """What the stage's `run` wrote to run_info/<stage>.json."""
    info = json.loads((root / "run_info" / f"{stage}.json").read_text())
    return {k: v for k, v in info.items() if k not in EVERY_STAGE_RUN_INFO}


def test_disabled_tune_passes_params_through(dag_copy):
    repo = dag_copy
    _, report, _ = run_tune(repo, enabled=False)
    best = yaml.safe_load((repo / "tune/best.yaml").read_text())
    assert best == {}  # no copy of params' schedule and lr to go stale
    assert report == {"enabled": False, "num_trials": 0}
    assert project.tuned_params(project.load_params(), "test").train.lr == 5.0e-4
    # No search, no result: an empty metrics file, the stage's shape in the run info.
    assert json.loads((repo / "metrics/tune.json").read_text()) == {}
    assert json.loads((repo / "metrics/details/tune.json").read_text()) == {}
    assert run_info(repo, "tune") == report
    # Every declared output is rewritten, so none keeps an earlier search's content.
    assert (repo / "plots/tune_trials.csv").read_text().splitlines() == [
        "rung,step,trial,schedule,lr,mc_bpd,stderr,diff_to_best,diff_stderr,kept"
    ]
    assert len((repo / "plots/tune_curves.csv").read_text().splitlines()) == 1
    for name in PICTURES:
        assert read(repo, f"plots/{name}").startswith(b"\x89PNG")


def read(root, name: str) -> bytes:
    return (root / name).read_bytes()


OUTPUTS = (
    "tune/best.yaml",
    "metrics/tune.json",
    "metrics/details/tune.json",
    "plots/tune_trials.csv",
    "plots/tune_curves.csv",
)


def test_search_is_the_same_with_one_or_two_trials_at_a_time(dag, dag_copy):
    """The DAG's last search ran two trials at a time; the same search one at a time (in a copy,
    with the same params) writes the same bytes: decisions, scores and best.yaml must not depend
    on worker timing."""
    _, again, _ = run_tune(dag_copy, max_concurrent=1)
    assert again == {**dag.read_json("metrics/details/tune.json"), **run_info(dag.root, "tune")}
    for name in OUTPUTS:
        assert read(dag_copy, name) == read(dag.root, name), f"{name} differs with 1 at a time"


def test_search_halves_the_trials_and_logs_each_in_mlflow(dag):
    """Synchronous successive halving: 2 trials (2 schedules at the same lr) train 2 steps, the
    better goes on to step 4 (the ranking itself is tested without Ray below)."""
    repo = dag.root
    params = dag.params()
    report = {**dag.read_json("metrics/details/tune.json"), **run_info(repo, "tune")}
    parent_id = dag.run("tune").info.run_id
    pictures = {name: read(repo, f"plots/{name}") for name in PICTURES}
    with (repo / "plots/tune_trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rung0 = [r for r in rows if r["rung"] == "0"]
    rung1 = [r for r in rows if r["rung"] == "1"]
    assert len(rung0) == 2 and len(rung1) == 1
    assert {r["step"] for r in rung0} == {"2"} and {r["step"] for r in rung1} == {"4"}
    # Both schedules met the same learning rate.
    assert {r["schedule"] for r in rung0} == {"linear", "cosine"}
    assert len({r["lr"] for r in rung0}) == 1
    # Rows are ranked best first; the kept ones of rung 0 are exactly rung 1's trials.
    for rung in (rung0, rung1):
        scores = [float(r["mc_bpd"]) for r in rung]
        assert scores == sorted(scores)
        assert float(rung[0]["diff_to_best"]) == 0.0
        for r in rung[1:]:
            # Paired over the same images and draws: the difference matches the scores'
            # difference, with a standard error below either score's own.
            assert float(r["diff_to_best"]) == pytest.approx(
                float(r["mc_bpd"]) - scores[0], abs=1e-5
            )
            assert 0.0 < float(r["diff_stderr"]) < float(r["stderr"])
    assert [r["kept"] for r in rung0] == ["1", "0"] and rung1[0]["trial"] == rung0[0]["trial"]
    best = yaml.safe_load((repo / "tune/best.yaml").read_text())
    assert best["diffusion"]["schedule"] == rung1[0]["schedule"]
    assert f"{best['train']['lr']:.6g}" == rung1[0]["lr"]
    assert report["best_mc_bpd"] == pytest.approx(float(rung1[0]["mc_bpd"]), abs=1e-6)
    assert report["num_trials"] == 2 and report["num_rungs"] == 2
    assert report["num_stopped_early"] == 1
    # The metrics file holds the search's result only; its shape is run info.
    # The headline: the best trial under the names the evaluate stage shares.
    assert dag.read_json("metrics/tune.json") == {
        "bpd_mc": report["best_mc_bpd"],
        "bpd_mc_stderr": report["best_mc_bpd_stderr"],
        "lr": report["best_lr"],
        "schedule": report["best_schedule"],
    }
    saved = dag.read_json("metrics/details/tune.json")
    assert set(saved) == {
        "best_schedule",
        "best_lr",
        "best_mc_bpd",
        "best_mc_bpd_stderr",
        "runner_up_gap",
        "runner_up_gap_stderr",
    }
    assert saved["best_lr"] == report["best_lr"]
    assert set(run_info(repo, "tune")) == set(tune_stage.TUNE_RUN_INFO)
    # The train stage reads best.yaml back as an overlay on params.
    tuned = dag.params("train")
    assert tuned.diffusion.schedule == best["diffusion"]["schedule"]
    assert tuned.diffusion.schedule != params.diffusion.schedule

    # Each trial's curve: a score at every eval_every steps of every rung it ran.
    with (repo / "plots/tune_curves.csv").open() as handle:
        curve_rows = list(csv.DictReader(handle))
    steps = {}
    for r in curve_rows:
        steps.setdefault(r["trial"], []).append(int(r["step"]))
    kept = {r["trial"] for r in rung1}
    assert {t: s for t, s in steps.items()} == {
        r["trial"]: ([2, 4] if r["trial"] in kept else [2]) for r in rung0
    }
    # Where the bits go: one profile per schedule, each the best trial's terms at log-spaced t.
    with (repo / "plots/tune_bpd_per_timestep.csv").open() as handle:
        profile = list(csv.DictReader(handle))
    assert {r["schedule"] for r in profile} == {"linear", "cosine"}
    timesteps = [int(r["t"]) for r in profile if r["schedule"] == "linear"]
    assert timesteps[0] == 1 and timesteps[-1] == 100 and timesteps == sorted(set(timesteps))
    assert all(float(r["bits_per_dim"]) > 0 for r in profile)
    for name, data in pictures.items():
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name

    # MLflow: one nested run per trial, all FINISHED, each with its outcome and last score.
    client = mlflow.MlflowClient(dag.tracking_uri)
    experiment = dag.experiment()
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 2
    outcomes = sorted(c.data.tags["tune_outcome"] for c in children)
    assert outcomes == ["best", "stopped_at_rung_0"]
    for child in children:
        assert child.info.status == "FINISHED"
        scores = client.get_metric_history(child.info.run_id, "mc_bpd")
        losses = client.get_metric_history(child.info.run_id, "loss")
        last_step = 4 if child.data.tags["tune_outcome"] in ("best", "completed") else 2
        assert sorted(m.step for m in scores) == list(range(2, last_step + 1, 2))
        assert max(m.step for m in losses) == last_step
        for score in scores:
            # The bound in bits/dim of 8-bit images: of the order of the 8 bits a uniform code
            # needs for a barely trained model, not L_simple's scale.
            assert 0.0 < score.value < 64.0
        assert "final_mc_bpd_stderr" in child.data.metrics
    parent = client.get_run(parent_id)
    artifacts = {a.path for a in client.list_artifacts(parent_id, "tune")}
    assert {f"tune/{name}" for name in PICTURES} <= artifacts
    assert parent.data.tags["best_schedule"] == best["diffusion"]["schedule"]


PICTURES = ("tune_search.png", "tune_bpd_per_timestep.png", "schedules.png")


def test_a_trial_of_two_workers_is_a_ddp_ray_train_run_resumed_across_rungs(dag_copy):
    """tune.workers_per_trial 2: each rung of the one trial is a Ray Train run of two DDP
    workers (both write their replica digest beside the checkpoint, and the two agree), and
    rung 1 resumes from rung 0's checkpoint in the store."""
    repo = dag_copy
    _, report, _ = run_tune(repo, schedules=["linear"], num_samples=1, workers_per_trial=2)
    specs = tune_stage.plan_trials(project.load_params().tune, 0)
    assert len(specs) == 1 and report["num_rungs"] == 2
    for rung, step in ((0, 2), (1, 4)):
        folder = repo / "store" / tune_stage.run_key(specs[0], rung) / f"step-{step:08d}"
        digests = {p.name: p.read_text() for p in folder.glob("replica-*.sha256")}
        assert sorted(digests) == ["replica-0.sha256", "replica-1.sha256"], folder
        assert len(set(digests.values())) == 1  # DDP kept the replicas equal
        assert (folder / "checkpoint.pt").is_file()
    with (repo / "plots/tune_curves.csv").open() as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle)]
    assert steps == [2, 4]  # rung 1 went on from step 2, not from scratch
    assert math.isfinite(report["best_mc_bpd"]) and 0.0 < report["best_mc_bpd"] < 64.0


def test_trials_and_rungs_are_planned_before_anything_runs():
    t = TuneParams(
        num_samples=6, schedules=["linear", "cosine", "sigmoid"], lr_min=1e-4, lr_max=1e-2
    )
    specs = tune_stage.plan_trials(t, seed=3)
    assert [s.index for s in specs] == list(range(6))
    # Each schedule meets the same lrs, one from each half of the log range.
    by_schedule = {}
    for spec in specs:
        by_schedule.setdefault(spec.schedule, []).append(spec.lr)
    assert set(by_schedule) == {"linear", "cosine", "sigmoid"}
    lrs = by_schedule["linear"]
    assert by_schedule["cosine"] == by_schedule["sigmoid"] == lrs
    assert 1e-4 <= lrs[0] < 1e-3 <= lrs[1] <= 1e-2
    assert tune_stage.plan_trials(t, seed=3) == specs
    assert tune_stage.plan_trials(t, seed=4) != specs
    # 7 samples over 3 schedules round up to 3 lrs each.
    assert len(tune_stage.plan_trials(dataclasses.replace(t, num_samples=7), seed=3)) == 9

    rungs = tune_stage.rung_steps
    assert rungs(TuneParams(grace_period=20, reduction_factor=2, steps_per_trial=40)) == [20, 40]
    assert rungs(TuneParams(grace_period=10, reduction_factor=3, steps_per_trial=100)) == [
        10,
        30,
        90,
        100,
    ]
    assert rungs(TuneParams(grace_period=50, reduction_factor=2, steps_per_trial=50)) == [50]

    steps = tune_stage.profile_timesteps(1000)
    assert steps[0] == 0 and steps[-1] == 999 and list(steps) == sorted(set(steps))
    assert len(steps) <= tune_stage.PROFILE_POINTS


def test_ranking_pairs_trials_breaks_ties_by_index_and_puts_nan_last():
    specs = [tune_stage.TrialSpec(i, "linear", 1e-3) for i in range(4)]

    def result(i: int, per_image: list[float]) -> tune_stage.RungResult:
        score = sum(per_image) / len(per_image) if per_image else math.nan
        return tune_stage.RungResult(specs[i], 2, score, 0.1, per_image or None, None, [])

    ranked = tune_stage.rank(
        [result(0, [3.0, 5.0]), result(1, []), result(2, [2.0, 4.0]), result(3, [2.0, 4.0])],
        keep=2,
    )
    assert [r.spec.index for r in ranked] == [2, 3, 0, 1]
    assert [r.kept for r in ranked] == [True, True, False, False]
    assert (ranked[1].diff, ranked[1].diff_stderr) == (0.0, 0.0)
    # Trial 0 is 1.0 worse on both images: a paired difference of exactly 1 with no spread.
    assert (ranked[2].diff, ranked[2].diff_stderr) == (1.0, 0.0)
    assert math.isnan(ranked[3].diff)
