"""The tiny DAG that the stage, MLflow and browser tests assert on (conftest.py's `dag`).

A throwaway git repository holds dvc.yaml and params.yaml (the repository's, with
tests/tiny_params.yaml laid over it), committed and tagged, so that its runs are clean. Two
experiments run in it, as `dvc exp run` would make them: the first runs all six stages at the
commit; the second sets train.warmup_steps (as `-S train.warmup_steps=0` does) and reruns the
stages that read it (tune and train, dvc.yaml says) and those after them. Each stage runs
through its own `main`, the command DVC runs (params checked, Tune's choice laid over them, one
MLflow run), in this process, on the session's one Ray cluster, with DVC_EXP_NAME and the
pipeline id set as DVC sets them for its stage commands. (In one process the ten stage runs take
a fraction of what ten stage processes, each importing torch, Ray and MLflow and joining the
cluster, would.)

Tests that change what a stage wrote run in a copy of the repository (`copy_repo`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAY = Path(__file__).with_name("tiny_params.yaml")
STAGES = ["prepare", "classifier", "tune", "train", "sample", "evaluate"]
# What `dvc status` names after a change of train.warmup_steps.
AFTER_WARMUP_CHANGE = ["tune", "train", "sample", "evaluate"]
# Experiment name -> its train.warmup_steps; the first is the committed value.
EXPERIMENTS = {"warmup-2": 2, "warmup-0": 0}
FIRST, SECOND = EXPERIMENTS
# The stages each experiment runs.
RUNS = {FIRST: STAGES, SECOND: AFTER_WARMUP_CHANGE}
GIT_TAG = "v-test"
EXPERIMENT = "ddpm"  # params' mlflow.experiment


def _deep_update(tree: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def tiny_overlay(**sections: dict[str, Any]) -> dict[str, Any]:
    """tests/tiny_params.yaml as a dict, with `sections` merged into it key by key."""
    return _deep_update(yaml.safe_load(OVERLAY.read_text(encoding="utf-8")), sections)


def tiny_params_tree() -> dict[str, Any]:
    """The repository's params.yaml with the tiny overlay laid over it, every key present."""
    from pipelines.params import load_params_file

    return load_params_file(REPO / "params.yaml").merged(tiny_overlay()).to_dict()


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def read_params(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))


def write_params(root: Path, tree: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


def change_params(root: Path, **sections: dict[str, Any]) -> None:
    """params.yaml with `sections` merged into it key by key, as a user edits it."""
    write_params(root, _deep_update(read_params(root), sections))


def make_repo(root: Path) -> Path:
    """The committed, tagged repository the DAG runs in (nothing run yet)."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    write_params(root, tiny_params_tree())
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny pipeline")
    git(root, "tag", GIT_TAG)
    return root


# mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI into os.environ, ray.init() writes
# RAY_ADDRESS, and stage code sets the DDPM_* variables for its Ray workers; child processes of a
# later test (a `ray start` head, a `dvc repro`) would inherit them and log into another test's
# store. The tracking URI's user:password moves into MLFLOW_TRACKING_USERNAME / _PASSWORD likewise.
LEAKY_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "DDPM_REPO_ROOT",
    "DDPM_PIPELINE_ID",
    "DVC_EXP_NAME",
    "RAY_ADDRESS",
)


@contextlib.contextmanager
def restored_environment() -> Iterator[None]:
    """LEAKY_VARIABLES as they were, whatever ran inside."""
    saved = {name: os.environ.get(name) for name in LEAKY_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def stage_environment(root: Path, pipeline_id: str, exp_name: str | None = None) -> Iterator[None]:
    """The variables DVC and the stages read: the repository, the pipeline id, the experiment;
    no MLflow URI of the caller's (the repository's own SQLite store is used). Restored after."""
    with restored_environment():
        os.environ["DDPM_REPO_ROOT"] = str(root)
        os.environ["DDPM_PIPELINE_ID"] = pipeline_id
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("DVC_EXP_NAME", None)
        if exp_name is not None:
            os.environ["DVC_EXP_NAME"] = exp_name
        yield


def start_ray(root: Path) -> None:
    """The session's local Ray cluster, sized by the tiny params (ray.num_cpus)."""
    from pipelines import cluster, project

    with stage_environment(root, "tests"):
        cluster.init_ray(project.load_params(), "tests")


def run_experiments(root: Path) -> None:
    """Both experiments, each stage through its `main` (the Ray cluster is up already)."""
    for exp, stages in RUNS.items():
        if read_params(root)["train"]["warmup_steps"] != EXPERIMENTS[exp]:
            change_params(root, train={"warmup_steps": EXPERIMENTS[exp]})  # what `-S` does
        with stage_environment(root, pipeline_id(exp), exp):
            for stage in stages:
                started = time.monotonic()
                importlib.import_module(f"pipelines.{stage}").main([])
                print(f"tiny DAG: {stage} · {exp} took {time.monotonic() - started:.1f} s")


def pipeline_id(exp: str) -> str:
    return f"dag-{exp}"


def run_names() -> list[str]:
    """The MLflow run name of every stage run of both experiments."""
    return [f"{stage} · {exp}" for exp, stages in RUNS.items() for stage in stages]


@dataclass(frozen=True)
class Dag:
    """The repository after both experiments: its outputs are the second experiment's (the last
    written); its MLflow store holds every stage run of both."""

    root: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def experiment(self):
        return self.client().get_experiment_by_name(EXPERIMENT)

    def stage_runs(self) -> dict[str, Any]:
        """The stages' runs (not Tune's trials) by name, `<stage> · <experiment>`."""
        found = self.client().search_runs([self.experiment().experiment_id], max_results=1000)
        return {r.info.run_name: r for r in found if "mlflow.parentRunId" not in r.data.tags}

    def run(self, stage: str, exp: str = SECOND) -> Any:
        """The stage's run in `exp`; by default the second, whose outputs the repository holds
        (prepare and classifier ran in the first only)."""
        if stage not in AFTER_WARMUP_CHANGE:
            exp = FIRST
        return self.stage_runs()[f"{stage} · {exp}"]

    def params(self, stage: str | None = None) -> Any:
        """The repository's params; with `stage`, as that stage's command runs with them (Tune's
        choice laid over them)."""
        from pipelines import project

        with stage_environment(self.root, "tests"):
            params = project.load_params()
            return project.tuned_params(params, stage) if stage else params

    def read_json(self, name: str) -> Any:
        import json

        return json.loads((self.root / name).read_text(encoding="utf-8"))


def own_ray_workers(title: str) -> list[Any]:
    """The processes of this test session's own Ray cluster (ray.init started it as a child of
    this process) that run `title`: Ray names a worker process after the task or actor it runs.
    Never another session's on the same machine."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if (proc.cmdline() or [""])[0].startswith(f"ray::{title}"):
                found.append(proc)
    return found


def copy_repo(source: Path, dest: Path) -> Path:
    """A working copy of the DAG's repository (git, params, outputs, the shared store) for a
    test that changes them. Without its MLflow store: MLflow keeps the original's artifact
    folder in the store, so runs in the copy would write there; the copy starts its own."""

    def leave_out(folder: str, names: list[str]) -> set[str]:
        return {"mlflow.db", "mlruns"} & set(names) if Path(folder) == source else set()

    shutil.copytree(source, dest, symlinks=True, ignore=leave_out)
    return dest
