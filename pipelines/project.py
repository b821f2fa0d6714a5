"""Where the repository is and what it says: its root, its params (with Tune's choice laid over
them), the shared store and the YAML files stages write.

Stages run as separate processes (one per DVC stage, or a `ray job submit` driver whose working
directory is a temporary copy of the repository), and their Ray workers run in yet other working
directories. So paths resolve to absolute ones here, once, in the driver.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from pipelines.params import Params, load_params_file, load_yaml, samples_train_output
from pipelines.store import STORAGE_ENV, Store

REPO_ROOT_ENV = "DDPM_REPO_ROOT"


# Set by Ray's job manager in a submitted job's driver; holds the job's runtime env as JSON.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_runtime_env() -> dict[str, Any]:
    raw = os.environ.get(_RAY_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


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
    working_dir = ray_job_runtime_env().get("working_dir")
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


def tuned_params(params: Params, stage: str) -> Params:
    """`params` with the tune stage's best configuration (tune.out) laid over it, when enabled.

    With tune.enabled false the tune stage passes params through unchanged, so there is nothing
    to overlay. Each value Tune's choice replaces is said in one line, so that a user who set
    train.lr in params.yaml (or with `dvc exp run -S`) learns that it did not take effect.
    """
    if not params.tune.enabled:
        return params
    best = absolute(params.tune.out)
    if not best.is_file():
        raise FileNotFoundError(f"{best} is missing: run the tune stage first (dvc repro tune)")
    overlay = load_yaml(best, "tune's best configuration") or {}
    tuned = params.merged(overlay, source=str(best))
    before, after = params.flat(), tuned.flat()
    replaced = [f"{k} {before[k]!r} -> {v!r}" for k, v in after.items() if before.get(k) != v]
    if replaced:
        print(
            f"[{stage}] {params.tune.out} (tune.enabled: true) replaces {', '.join(replaced)}",
            flush=True,
        )
    return tuned


def trained_model_params(params: Params, stage: str) -> Params:
    """For the stages that use sample.checkpoint: the params its model was trained with (Tune's
    overlay) when it is the train stage's output; else, another checkpoint, params as they are."""
    return tuned_params(params, stage) if samples_train_output(params) else params


def shared_store(params: Params) -> Store:
    """The shared store: storage.root, else $DDPM_STORAGE, else <repo>/store; a relative folder
    is taken against the repository root."""
    root = params.storage.root or os.environ.get(STORAGE_ENV) or "store"
    if root.startswith("file://"):
        root = root[len("file://") :]
    return Store(root if "://" in root else str(absolute(root)))


def write_yaml(path: Path, payload: Any) -> None:
    from ddpm.io_utils import atomic_write

    with atomic_write(path, "w") as handle:
        yaml.safe_dump(payload, handle, sort_keys=True)
