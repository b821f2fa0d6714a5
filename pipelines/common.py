"""What every stage shares: where the repository is, its params, MLflow runs and the Ray cluster.

Stages run as separate processes (one per DVC stage, or a `ray job submit` driver whose working
directory is a temporary copy of the repository), and their Ray workers run in yet other working
directories. So everything here resolves to absolute paths and URIs once, in the driver, and hands
them to workers explicitly or through the Ray runtime environment.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ddpm.io_utils import file_digest
from pipelines.params import Params, load_params_file, load_yaml
from pipelines.store import S3_SETTINGS_ENV, STORAGE_ENV, Store

REPO_ROOT_ENV = "DDPM_REPO_ROOT"
PIPELINE_ID_ENV = "DDPM_PIPELINE_ID"
# Set by Ray's job manager in a submitted job's driver; holds the job's runtime env as JSON.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def repo_root() -> Path:
    """The repository the stage reads from and writes to.

    $DDPM_REPO_ROOT wins (a `ray job submit` driver runs in a temporary copy of the working
    directory, so its outputs would vanish with the copy); otherwise the nearest directory at or
    above the current one that holds dvc.yaml or params.yaml (DVC runs stages from the repo root).
    """
    env = os.environ.get(REPO_ROOT_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${REPO_ROOT_ENV}={env!r} is not a directory")
        return root
    working_dir = _ray_job_runtime_env().get("working_dir")
    if working_dir:
        raise ValueError(
            f"this stage runs as a Ray job with working_dir {working_dir!r}, a temporary copy that "
            f"is deleted afterwards; set {REPO_ROOT_ENV} to the repository's absolute path, e.g. "
            f'--runtime-env-json \'{{"env_vars": {{"{REPO_ROOT_ENV}": "/path/to/repo"}}}}\''
        )
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / "params.yaml").is_file():
            return candidate
    return here


def absolute(path: str | os.PathLike) -> Path:
    """`path` resolved against the repository root (unchanged when already absolute)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Validated params; by default the repository's params.yaml."""
    return load_params_file(absolute(path) if path is not None else repo_root() / "params.yaml")


def tuned_params(params: Params) -> Params:
    """`params` with the tune stage's best configuration (tune.out) laid over it, when enabled.

    With tune.enabled false the tune stage passes params through unchanged, so there is nothing
    to overlay.
    """
    if not params.tune.enabled:
        return params
    best = absolute(params.tune.out)
    if not best.is_file():
        raise FileNotFoundError(f"{best} is missing: run the tune stage first (dvc repro tune)")
    overlay = load_yaml(best, "tune's best configuration") or {}
    return params.merged(overlay, source=str(best))


def tracking_uri(params: Params) -> str:
    """Absolute MLflow tracking URI: params, else $MLFLOW_TRACKING_URI, else the repo's SQLite file.

    Relative SQLite or file paths are resolved against the repository root, because Ray workers
    run in other working directories and would otherwise write to a different store.
    """
    uri = (
        params.mlflow.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            return f"sqlite:///{absolute(path)}"
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:") :].removeprefix("//")
        return absolute(path).as_uri()
    if "://" not in uri:
        return str(absolute(uri))
    return credentials_to_environment(uri)


def credentials_to_environment(uri: str) -> str:
    """`uri` without its `user:password@`, which moves to MLFLOW_TRACKING_USERNAME / _PASSWORD
    in this process's environment (unless those are set already).

    The bare URI is what travels to Ray workers (the runtime environment and task arguments are
    visible in Ray's dashboard); the credentials reach a local cluster's workers through the
    environment they inherit, and every node of a remote cluster brings its own, as for S3.
    """
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if has_password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport))


# user:password@ (or a lone user or token) in a URI: what a message or log must never show.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")


def redact_uri(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with the credentials of every URI hidden:
    `https://alice:S3CRET@host` -> `https://alice:***@host`; a user part without a password may be
    a token, so it becomes `***`."""

    def hide(match: re.Match) -> str:
        user, sep, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if sep else f"{match['scheme']}***@"

    return _USERINFO.sub(hide, str(text))


def shared_store(params: Params) -> Store:
    """The shared store: storage.root, else $DDPM_STORAGE, else <repo>/store; a relative folder
    is taken against the repository root."""
    root = params.storage.root or os.environ.get(STORAGE_ENV) or "store"
    if root.startswith("file://"):
        root = root[len("file://") :]
    return Store(root if "://" in root else str(absolute(root)))


# ---------------------------------------------------------------------------------------------
# Provenance: git, DVC stage hash, pipeline id


def git_info(root: Path | None = None) -> dict[str, str]:
    """Commit, exact tag (if HEAD has one) and whether the worktree differs from HEAD.

    `git_dirty` leaves out the paths dvc.yaml declares as outputs: DVC deletes a stage's
    git-tracked outputs (metrics/*.json) before running it, so they always differ mid-repro, and
    a run made at a clean tag would otherwise claim uncommitted changes.
    """
    root = root or repo_root()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    info: dict[str, str] = {}
    commit = (git("rev-parse", "HEAD") or "").strip()
    if commit:
        info["git_commit"] = commit
        # MLflow's UI shows this standard tag in the run table.
        info["mlflow.source.git.commit"] = commit
        tag = (git("describe", "--tags", "--exact-match", "HEAD") or "").strip()
        if tag:
            info["git_tag"] = tag
        status = git("status", "--porcelain=v1", "-z", "--untracked-files=no")
        # git reports paths from the top of the worktree; dvc.yaml's are relative to `root`.
        prefix = (git("rev-parse", "--show-prefix") or "").strip()
        if status is not None:
            outputs = [prefix + out for out in dvc_outputs(root)]
            changed = [p for p in _porcelain_paths(status) if not _under_any(p, outputs)]
            info["git_dirty"] = "true" if changed else "false"
    return info


def _porcelain_paths(status: str) -> list[str]:
    """Every path named by `git status --porcelain=v1 -z`: "XY path", and for a rename or copy
    the source path as the next NUL-separated field."""
    fields = status.split("\0")
    paths: list[str] = []
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if "R" in entry[:2] or "C" in entry[:2]:
            paths.append(fields[i])
            i += 1
    return paths


def _under_any(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _md5_path(path: Path) -> str | None:
    if path.is_file():
        return file_digest(path, "md5")
    if path.is_dir():
        listing = [
            [str(p.relative_to(path)), file_digest(p, "md5")]
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"
    return None


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _dvc_stages(root: Path) -> tuple[Mapping[str, Any], Callable[[Any], str]]:
    """dvc.yaml's stages, and a function that resolves its `${key}` templates from params.yaml
    as DVC does (dvc.yaml takes its paths from params: `${train.out_dir}`)."""
    stages = (_read_yaml(root / "dvc.yaml") or {}).get("stages") or {}
    defaults = _read_yaml(root / "params.yaml")

    def interpolate(text: Any) -> str:
        return re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(_lookup(defaults, m[1])), str(text))

    return stages, interpolate


def dvc_outputs(root: Path | None = None, stage: str | None = None) -> list[str]:
    """Every path (relative to the repository root) that a dvc.yaml stage (`stage`, else any)
    declares as one of its outs, metrics or plots."""
    stages, interpolate = _dvc_stages(root or repo_root())
    paths = []
    for name, spec in stages.items():
        if not isinstance(spec, Mapping) or stage not in (None, name):
            continue
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind) or []:
                # An entry is a path, or {path: {cache: false, ...}}.
                for path in entry if isinstance(entry, Mapping) else [entry]:
                    paths.append(posixpath.normpath(interpolate(path)))
    return paths


@cache
def dvc_stage_hash(stage: str) -> str | None:
    """md5 of what DVC keys the stage on: its command, each dependency's content, its params.

    Computed from dvc.yaml in the stage's own process rather than read from dvc.lock, which DVC
    writes only after the stage succeeds. Files hash as DVC 3 hashes them (md5 of the bytes);
    folders as the md5 of their sorted (relative path, md5) listing. Two runs with the same value
    had identical code, data and params. None when dvc.yaml has no such stage.
    """
    root = repo_root()
    stages, interpolate = _dvc_stages(root)
    spec = stages.get(stage)
    if not isinstance(spec, Mapping):
        return None
    deps = {interpolate(d): _md5_path(root / interpolate(d)) for d in spec.get("deps", [])}
    params_files: dict[str, list[str]] = {}
    for entry in spec.get("params", []):
        if isinstance(entry, Mapping):
            for file, keys in entry.items():
                params_files.setdefault(str(file), []).extend(keys or [])
        else:
            params_files.setdefault("params.yaml", []).append(str(entry))
    values: dict[str, Any] = {}
    for file, keys in params_files.items():
        tree = _read_yaml(root / file)
        if not keys:  # a whole file listed without keys: every value counts
            values[file] = tree
        for key in keys:
            values[f"{file}:{key}"] = _lookup(tree, key)
    payload = {"cmd": interpolate(spec.get("cmd")), "deps": deps, "params": values}
    return hashlib.md5(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _process_chain() -> Iterator[tuple[int, list[str], float]]:
    """(pid, argv, start time) of this process's ancestors, nearest first."""
    import psutil  # ships with ray and mlflow

    for proc in psutil.Process().parents():
        try:
            yield proc.pid, proc.cmdline(), proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@cache
def pipeline_id() -> str:
    """One id shared by every stage of one `dvc repro` / `dvc exp run`.

    $DDPM_PIPELINE_ID wins (set it to group stages that are started by hand or as Ray jobs).
    Otherwise each stage, a separate child process of DVC, finds the `dvc` process above it and
    hashes (host, pid, start time): the same for all stages of one invocation, different for the
    next one, and needing no shared file (a file written by the first stage would go stale
    whenever the first stages are skipped as up to date). Without a DVC ancestor the id is a
    fresh random one. It is exported so that local Ray workers inherit it.
    """
    env = os.environ.get(PIPELINE_ID_ENV)
    if env:
        return env
    ident = None
    for pid, argv, started in _process_chain():
        words = [Path(a).name for a in argv[:3]]
        if "dvc" in words or any(a.endswith("/dvc") for a in argv[:2]):
            seed = f"{socket.gethostname()}:{pid}:{started:.3f}"
            ident = "dvc-" + hashlib.sha256(seed.encode()).hexdigest()[:12]
            break
    ident = ident or "run-" + uuid.uuid4().hex[:12]
    os.environ[PIPELINE_ID_ENV] = ident
    return ident


# ---------------------------------------------------------------------------------------------
# MLflow


# The experiment's kind, as MLflow 3 records it: "custom_model_development" is model training,
# whose UI page is the runs table (MLflow 3.0 to 3.x UIs open an experiment on its kind's page;
# without the tag they guess in the browser). The 3.17 UI instead takes the kind from its
# "GenAI / Model training" switch, GenAI unless the link says otherwise, so the stages also print
# a link to the runs table with `?workflowType=machine_learning` (runs_table_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# DVC hands `dvc exp run`'s experiment name to every stage command in this variable.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
# The numbers that say how good a run is, under one name in every run that has them (train's
# run, Tune's trials, evaluate's run), so one MLflow chart compares them across experiments.
KEY_METRICS = {
    "final_loss": "L_simple, mean of the last train.log_every steps",
    "test_bpd": "test NLL in bits/dim: the bound of Eq. 5 over all T terms (evaluate stage)",
    "classifier_fd": "Fréchet distance of the samples to the train split, classifier features",
}


def log_key_metrics(values: Mapping[str, float | None], model_id: str | None = None) -> None:
    """Log KEY_METRICS (a None value is left out); with `model_id` they are also the metrics of
    that logged model, which the Model Registry shows beside its versions."""
    import mlflow

    unknown = set(values) - set(KEY_METRICS)
    if unknown:
        raise ValueError(f"not key metrics: {sorted(unknown)}; known: {sorted(KEY_METRICS)}")
    chosen = {k: float(v) for k, v in values.items() if v is not None}
    mlflow.log_metrics(chosen, model_id=model_id)


def _set_experiment(name: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A SQLite store's artifacts would go to ./mlruns of whatever directory the stage runs
        # in (a Ray job's temporary copy, deleted afterwards): keep them beside the repository.
        local = mlflow.get_tracking_uri().startswith("sqlite:")
        location = (repo_root() / "mlruns").as_uri() if local else None
        try:
            client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            pass  # Two processes (e.g. parallel Tune trials) raced to create it; the loser uses it.
    elif EXPERIMENT_KIND_TAG not in experiment.tags:
        # Made before this tag was set (or by hand); a kind someone chose in the UI is kept.
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)


def runs_table_url(tracking: str, experiment_id: str) -> str | None:
    """The MLflow UI's runs table of an experiment, when the tracking URI is a server."""
    if not tracking.startswith(("http://", "https://")):
        return None
    return (
        f"{tracking.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )


# One request, answered at once by a server that is up; a server that is down is left to the
# stage's own MLflow calls (and their messages).
CREDENTIALS_TIMEOUT_S = 10


def check_mlflow_credentials(uri: str) -> None:
    """Before any work: an http(s) tracking server with authentication on (MLflow's basic-auth
    app) accepts this process's credentials. One request (search one experiment) with the
    credentials MLflow itself would send ($MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD,
    a token, or user:password in the URI); a 401 or 403 raises one line naming where they come
    from, never the password. A server that does not answer is not judged here."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "POST",
            json={"max_results": 1},
            max_retries=0,
            backoff_factor=0,
            timeout=CREDENTIALS_TIMEOUT_S,
            raise_on_status=False,
        )
    except Exception:
        return
    if response.status_code not in (401, 403):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if bool(user) != bool(password):
        given = (
            f"needs both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; "
            f"{'MLFLOW_TRACKING_PASSWORD' if user else 'MLFLOW_TRACKING_USERNAME'} is not set"
        )
    elif user:
        given = "refused the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        given = "refused the token in MLFLOW_TRACKING_TOKEN"
    elif urllib.parse.urlsplit(uri).password is not None:
        given = "refused the user:password in the tracking URI"
    else:
        given = (
            "needs credentials and got none: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    raise ValueError(f"MLflow server {redact_uri(uri)} {given} ({response.status_code})")


def experiment_label(tags: Mapping[str, str]) -> str:
    """What a run's name calls the experiment it belongs to, from its provenance tags: DVC's
    experiment name under `dvc exp run`, else HEAD's tag, else HEAD's short commit, else
    "workspace" (no git)."""
    return (
        tags.get("dvc_exp_name")
        or tags.get("git_tag")
        or tags.get("git_commit", "")[:8]
        or "workspace"
    )


def provenance_tags(stage: str) -> dict[str, str]:
    """What produced a run: stage, pipeline_id, dvc_exp_name (under `dvc exp run`), git_commit
    (+ git_tag, git_dirty) and dvc_stage_hash. Computed in the driver, which has the repository;
    a Tune trial on another node receives them."""
    tags = {"stage": stage, "pipeline_id": pipeline_id(), **git_info()}
    exp_name = os.environ.get(DVC_EXP_NAME_ENV)
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    stage_hash = dvc_stage_hash(stage)
    if stage_hash:
        tags["dvc_stage_hash"] = stage_hash
    return tags


@contextlib.contextmanager
def mlflow_run(
    stage: str,
    params: Params,
    *,
    nested: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    uri: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage (or a Tune trial) with params and provenance tags logged.

    The run is named `<stage> · <experiment>` (`experiment_label`) unless `run_name` is given.
    `parent_run_id` nests a run started in another process (a Ray worker) under the stage's run;
    such a process passes the driver's tracking `uri` and `provenance_tags`, because it cannot
    read the repository.
    """
    import mlflow

    uri = uri or tracking_uri(params)
    if redact_uri(uri) != uri:
        # MLflow prints its own "View run at <uri>..." links when a run ends, password and all;
        # the stage prints them itself, without it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    _set_experiment(params.mlflow.experiment)
    host = socket.gethostname()
    close_stale_runs(params.mlflow.experiment, stage, host)
    tags = {**(tags or provenance_tags(stage)), "host": host, "pid": str(os.getpid())}
    run = mlflow.start_run(
        run_name=run_name or f"{stage} · {experiment_label(tags)}",
        nested=nested,
        parent_run_id=parent_run_id,
        tags=tags,
    )
    status = "FINISHED"
    try:
        # A URI's credentials (mlflow.tracking_uri: https://user:password@host) stay out of the run.
        items = [(k, redact_uri(v) if isinstance(v, str) else v) for k, v in params.flat().items()]
        for start in range(0, len(items), 100):  # MLflow's per-request limit
            mlflow.log_params(dict(items[start : start + 100]))
        if parent_run_id is None:  # a Tune trial's run is listed under its stage's
            print(f"[{stage}] MLflow run {run.info.run_id} in {redact_uri(uri)}", flush=True)
        url = runs_table_url(uri, run.info.experiment_id)
        if url and not nested:
            print(f"[{stage}] runs table: {redact_uri(url)}", flush=True)
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        # An MLflow outage at the very end must not fail a stage whose outputs are written.
        with tolerate_mlflow_outage(stage, f"closing run {run.info.run_id} as {status}"):
            mlflow.end_run(status)


@contextlib.contextmanager
def tolerate_mlflow_outage(stage: str, what: str) -> Iterator[None]:
    """Run MLflow calls that must not fail the stage; an error is reported once, clearly."""
    try:
        yield
    except Exception as err:
        print(
            f"[{stage}] MLflow unreachable while {what} ({type(err).__name__}: "
            f"{redact_uri(str(err))}); the stage's outputs are written, the run may lack these "
            "records",
            flush=True,
        )


def close_stale_runs(experiment_name: str, stage: str, host: str) -> None:
    """Mark KILLED the RUNNING runs of `stage` started on this host by a process that is gone
    (a stage killed with SIGKILL never closes its run)."""
    import mlflow
    import psutil

    experiment = mlflow.get_experiment_by_name(experiment_name)
    client = mlflow.MlflowClient()
    stale = client.search_runs(
        [experiment.experiment_id],
        f"attributes.status = 'RUNNING' and tags.stage = '{stage}' and tags.host = '{host}'",
    )
    for old in stale:
        pid = old.data.tags.get("pid", "")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_terminated(old.info.run_id, "KILLED")
            print(f"[{stage}] MLflow run {old.info.run_id} of dead process {pid}: KILLED")


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_job_runtime_env() -> dict[str, Any]:
    raw = os.environ.get(_RAY_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


# How long Ray Train lets a worker group wait for its resources and start (Ray's default, 60 s,
# is shorter than a fresh worker takes to import torch on a busy CPU box). Set from
# train.placement_timeout_s; Ray Train hands the driver's value on to its controller.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def worker_env(params: Params) -> dict[str, str]:
    """Environment for Ray workers: the MLflow store, the run id, the S3 endpoint and region.

    Workers get no path of the driver's machine: what they read comes through the store.
    Credentials are not forwarded (the runtime environment is visible in Ray's dashboard):
    every node brings its own, as S3 clients expect.
    """
    return {
        PIPELINE_ID_ENV: pipeline_id(),
        "MLFLOW_TRACKING_URI": tracking_uri(params),
        TRAIN_START_TIMEOUT_ENV: str(params.train.placement_timeout_s),
        # Ray Train's print patch sends a worker's print() to its logger and, since Ray has
        # already wrapped the worker's stdout, to stdout as well: every line came out twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **{name: os.environ[name] for name in S3_SETTINGS_ENV if os.environ.get(name)},
    }


def init_ray(params: Params) -> None:
    """Connect to $RAY_ADDRESS or params.ray.address, else start a local cluster on this machine.

    Workers get the repository root, the absolute tracking URI and the pipeline id through the
    runtime environment. Inside a submitted job the job's own env_vars take precedence (Ray
    refuses to merge two values for one variable), so only the missing ones are added.
    """
    import ray

    if ray.is_initialized():
        return
    job_runtime_env = _ray_job_runtime_env()
    job_env = job_runtime_env.get("env_vars") or {}
    env_vars = {k: v for k, v in worker_env(params).items() if k not in job_env}
    runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars else {}
    address = os.environ.get("RAY_ADDRESS") or params.ray.address
    if address:
        if "py_modules" not in job_runtime_env:
            # Workers on other machines run this driver's code, not whatever version their image
            # holds: the packages travel with the job (Ray caches them by content).
            runtime_env["py_modules"] = [package_dir("ddpm"), package_dir("pipelines")]
            runtime_env["excludes"] = ["__pycache__"]
        print(f"[ray] connecting to {redact_uri(address)}", flush=True)
        ray.init(
            address=address,
            runtime_env=runtime_env or None,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    else:
        num_cpus = params.ray.num_cpus or os.cpu_count() or 1
        # Ray Train's placement-group cleaner (an actor) asks the state API, i.e. the dashboard,
        # whether its controller still lives, and finds the cluster through address "auto",
        # which fails when another Ray instance runs on the same machine. Without it, the
        # worker groups of finished Tune trials keep their CPUs and later trials wait forever.
        # So the local head runs its dashboard (on 127.0.0.1) and gets a GCS port chosen here,
        # and workers get RAY_ADDRESS pointing at it.
        gcs_port, dashboard_port = _free_ports(2)
        env_vars = {
            **env_vars,
            "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
            # This cluster is this one machine: no node of it is drained while others go on,
            # so Ray Train's preemption watcher (an actor per run, whose start logs a core
            # worker error line) has nothing to watch. Clusters a stage connects to keep it.
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        }
        print(f"[ray] starting a local cluster with {num_cpus} CPUs", flush=True)
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by Ray when it starts a head
        # Ray warns at every local start that it turned token auth on by default; this cluster
        # lives for one stage on 127.0.0.1, and the warning was most of each stage's output.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=params.ray.num_gpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                runtime_env={"env_vars": env_vars},
                log_to_driver=True,
                # The line above says what starts; Ray's INFO lines repeat it with a dashboard
                # URL nobody opens, and Tune's note each experiment state it writes.
                logging_level=logging.WARNING,
            )
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def package_dir(name: str) -> str:
    import importlib

    return str(Path(importlib.import_module(name).__file__).parent)


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def gpu_available() -> bool:
    """Whether the connected Ray cluster has at least one GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def require_resources(what: str, cpus: float, gpus: float = 0) -> None:
    """Fail before any work when the connected cluster can never hold `what` (which names the
    params keys that asked), instead of letting Ray wait for resources that never come."""
    import ray

    have = ray.cluster_resources()
    have_cpus, have_gpus = have.get("CPU", 0), have.get("GPU", 0)
    if cpus > have_cpus or gpus > have_gpus:
        raise ValueError(
            f"{what} needs {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray cluster has "
            f"{have_cpus:g} CPU(s) and {have_gpus:g} GPU(s) in all; lower those params or add "
            "nodes (ray.num_cpus / ray.num_gpus size a local cluster)"
        )


def is_loopback_uri(uri: str) -> bool:
    """Whether `uri`'s host is this machine only: localhost, 127.0.0.0/8, ::1 (or 0.0.0.0 / ::,
    which a client reads as its own machine). Names are not resolved: a host name that other
    machines resolve elsewhere is theirs to reach."""
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost") or host == "localhost.localdomain":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


def reach_problems(
    hosts: Collection[str], tracking: tuple[str, str], endpoints: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """What Ray workers on other machines could not reach, one line each; [] on one machine.

    `hosts` are the distinct addresses of the cluster's alive nodes (NodeManagerAddress);
    `tracking` is (where it was set, MLflow tracking URI); `endpoints` are the S3 endpoints the
    store uses, as (variable, URL). A SQLite or file store, or any loopback address, names only
    the driver's machine.
    """
    count = len(set(hosts))
    if count < 2:
        return []
    spans = f"the Ray cluster spans {count} machines"
    problems = []
    name, uri = tracking
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        problems.append(
            f"{name}: {spans} but the MLflow store {redact_uri(uri)} is a file on this one; run "
            "`mlflow server` and set mlflow.tracking_uri or $MLFLOW_TRACKING_URI to its http:// "
            "address"
        )
    elif is_loopback_uri(uri):
        problems.append(
            f"{name}: {spans} but the MLflow server {redact_uri(uri)} is a loopback address, "
            "which each worker reads as its own machine; give an address of the server that "
            "the other machines reach"
        )
    for variable, url in endpoints:
        if is_loopback_uri(url):
            problems.append(
                f"{variable}: {spans} but the S3 endpoint {redact_uri(url)} is a loopback "
                "address, which each worker reads as its own machine; give an address of the "
                "S3 server that the other machines reach"
            )
    return problems


# Where the store's S3 client finds its endpoint, first match wins (pipelines/store.py).
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def store_endpoints(params: Params) -> list[tuple[str, str]]:
    """The S3 endpoint the shared store's client uses (pipelines/store.py: $AWS_ENDPOINT_URL_S3,
    else $AWS_ENDPOINT_URL), as (variable, URL); [] for a store that is not on S3."""
    if not shared_store(params).root.startswith("s3://"):
        return []
    found = [(name, os.environ[name]) for name in S3_ENDPOINT_ENVS if os.environ.get(name)]
    return found[:1]


def tracking_source(params: Params) -> str:
    """Where the tracking URI comes from, as a params key or a variable."""
    if params.mlflow.tracking_uri:
        return "mlflow.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "mlflow.tracking_uri (null: the SQLite file in the repository)"


def check_reach(params: Params) -> None:
    """On a cluster of several machines, refuse what workers on other machines cannot reach.

    A SQLite or file MLflow store lives on the driver's disk, and a loopback MLflow or S3
    address (127.0.0.1, localhost, ::1) is each worker's own machine: any of them fails before
    any work, naming the key or variable (`reach_problems`). A local storage root is accepted as
    a mount every node shares (NFS), with a note saying so.
    """
    import ray

    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    problems = reach_problems(
        hosts, (tracking_source(params), tracking_uri(params)), store_endpoints(params)
    )
    if problems:
        raise ValueError("; ".join(problems))
    shared = shared_store(params)
    if len(hosts) > 1 and shared.is_local:
        print(
            f"[store] {shared.root} is a local folder on a cluster of {len(hosts)} machines: it "
            "must be the same shared mount (NFS) on every node, else use s3:// or gs://",
            flush=True,
        )


def write_yaml(path: Path, payload: Any) -> None:
    from ddpm.io_utils import atomic_write

    with atomic_write(path, "w") as handle:
        yaml.safe_dump(payload, handle, sort_keys=True)


def stage_main(
    stage: str,
    run: Callable[..., Any],
    doc: str | None,
    argv: list[str] | None = None,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    preflight: Callable[[Params], None] | None = None,
) -> None:
    """The command line of every stage: validate params, reach Ray, run inside one MLflow run.

    Params are loaded (and so validated) and `preflight` checks the stage's inputs before Ray or
    MLflow start, so a bad value or a missing file fails before any work. `configure` adds
    stage-specific options; their values reach `run` as keywords.
    """
    parser = argparse.ArgumentParser(description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    if configure is not None:
        configure(parser)
    options = vars(parser.parse_args(argv))
    with refuse_bad_input(stage):
        params = load_params(options.pop("params"))
        if preflight is not None:
            preflight(params)
        check_mlflow_credentials(tracking_uri(params))
    started = time.monotonic()
    init_ray(params)
    with refuse_bad_input(stage):
        check_reach(params)
    with mlflow_run(stage, params):
        run(params, **options)
    outputs = ", ".join(dvc_outputs(stage=stage)) or "(none declared in dvc.yaml)"
    print(f"[{stage}] done in {time.monotonic() - started:.0f} s; outputs: {outputs}", flush=True)


# Exit status of a stage that refused its params or inputs before any work.
BAD_INPUT_EXIT = 2


@contextlib.contextmanager
def refuse_bad_input(stage: str) -> Iterator[None]:
    """The checks a stage makes before any work (params, its inputs, what the cluster reaches):
    a ValueError or FileNotFoundError there ends the process with its message on stderr, which
    names the keys and the fix, and exit status 2, without a traceback (nothing ran that a
    traceback would explain). Failures during the work keep their tracebacks."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        message = redact_uri(str(err)) or type(err).__name__
        print(f"[{stage}] {message}", file=sys.stderr, flush=True)
        raise SystemExit(BAD_INPUT_EXIT) from None
