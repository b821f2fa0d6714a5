"""`dvc repro` of the whole DAG in a fresh git + DVC repository, with tiny params.

Stages run as DVC runs them (`python -m pipelines.<stage>` from the repository root) against one
local Ray head named by RAY_ADDRESS; train uses two Ray Train workers on CPU. Checks: every stage
ran and its outputs parse; MLflow holds a run per stage sharing one pipeline id and the git commit,
with the Tune trials nested under the tune run; a second `dvc repro` does nothing; changing one
train param reruns train, sample and evaluate only.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from test_ray_job import BIN, ray_head

from ddpm.data import load_manifest
from ddpm.metrics import load_classifier
from ddpm.training import load_ema_model
from pipelines.params import load_params_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "classifier", "tune", "train", "sample", "evaluate"]
TINY = {
    "seed": 0,
    "data": {"image_size": 16, "max_images": 256},
    "model": {"config": "tiny"},
    "diffusion": {"num_timesteps": 100},
    "classifier": {"epochs": 2, "batch_size": 64},
    "tune": {
        "enabled": True,
        "num_samples": 2,
        "schedules": ["linear", "cosine"],
        "lr_min": 1.0e-4,
        "lr_max": 1.0e-3,
        "steps_per_trial": 4,
        "grace_period": 2,
        "eval_every": 2,
        "eval_images": 16,
        "max_concurrent": 2,
        "workers_per_trial": 1,
    },
    "train": {
        "steps": 6,
        "batch_size": 8,
        "num_workers": 2,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "log_every": 1,
    },
    "sample": {
        "num_images": 16,
        "batch_size": 8,
        "shard_size": 8,
        "num_steps": 5,
        "grid_size": 4,
        "num_workers": 2,
        "trajectory_frames": 3,
    },
    "evaluate": {
        "nll_images": 4,
        "nll_batch_size": 2,
        "mc_images": 16,
        "baseline_images": 16,
        "batch_size": 64,
    },
}


def sh(root: Path, env: dict, *cmd: str, timeout: int = 600) -> str:
    done = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for name in ("ddpm", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    # dvc.yaml takes its paths from params.yaml, so the file spells out every key, as ours does.
    full = load_params_file(REPO / "params.yaml").merged(TINY).to_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    with ray_head(root.parent / "ray_start.log", num_cpus=4) as (_, env):
        env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
        env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
        env.pop("DDPM_PIPELINE_ID", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        sh(root, env, "git", "init", "-q")
        sh(root, env, str(BIN / "dvc"), "init", "-q")
        sh(root, env, "git", "add", "-A")
        sh(root, env, "git", "commit", "-q", "-m", "tiny pipeline")
        first = sh(root, env, str(BIN / "dvc"), "repro")
        yield root, env, first


def test_repro_runs_every_stage_and_outputs_parse(repo):
    root, _, first = repo
    assert ran(first) == STAGES
    for split in ("train", "test"):
        assert load_manifest(root / "data/prepared" / split)["count"] == 256
    assert load_classifier(root / "models/classifier.pt").metadata["num_train"] == 256
    best = yaml.safe_load((root / "tune/best.yaml").read_text())
    assert best["diffusion"]["schedule"] in ("linear", "cosine")
    assert 1.0e-4 <= best["train"]["lr"] <= 1.0e-3
    model, diffusion, meta = load_ema_model(root / "models/ema.pt")
    assert meta["step"] == 6 and diffusion.num_timesteps == 100
    assert meta["config"]["diffusion"]["schedule"] == best["diffusion"]["schedule"]
    with (root / "plots/loss.csv").open() as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert load_manifest(root / "samples")["count"] == 16
    assert (root / "samples/grid.png").stat().st_size > 0
    with (root / "plots/bpd_per_timestep.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 100
    for name in ("data", "classifier", "tune", "train", "evaluate"):
        json.loads((root / "metrics" / f"{name}.json").read_text())
    report = json.loads((root / "metrics/evaluate.json").read_text())
    assert report["samples"]["num_images"] == 16 and report["samples"]["test_nll_bpd"] > 0
    assert torch.isfinite(next(model.parameters())).all()


def test_mlflow_has_one_run_per_stage_sharing_the_pipeline_id(repo):
    root, env, _ = repo
    commit = sh(root, env, "git", "rev-parse", "HEAD").strip()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    first = {r.data.tags["stage"]: r for r in top if r.data.tags["stage"]}
    assert set(first) == set(STAGES)
    ids = {r.data.tags["pipeline_id"] for r in first.values()}
    assert len(ids) == 1 and ids.pop().startswith("dvc-")
    assert all(r.data.tags["git_commit"] == commit for r in first.values())
    assert all(len(r.data.tags["dvc_stage_hash"]) == 32 for r in first.values())
    tune_id = first["tune"].info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_id]
    assert len(trials) >= 2  # tune.num_samples, nested under the tune run


def test_second_repro_does_nothing_and_a_train_param_reruns_train_onwards(repo):
    root, env, _ = repo
    again = sh(root, env, str(BIN / "dvc"), "repro")
    assert ran(again) == []

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["steps"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(root, env, str(BIN / "dvc"), "status", "--json"))
    assert "train" in status and "tune" not in status and "prepare" not in status
    changed = sh(root, env, str(BIN / "dvc"), "repro")
    assert ran(changed) == ["train", "sample", "evaluate"]
    _, _, meta = load_ema_model(root / "models/ema.pt")
    assert meta["step"] == 8

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    train_runs = [r for r in runs if r.data.tags.get("stage") == "train"]
    train_runs = [r for r in train_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(train_runs) == 2
    assert len({r.data.tags["pipeline_id"] for r in train_runs}) == 2  # one id per repro
