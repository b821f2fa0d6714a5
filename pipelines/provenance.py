"""What produced a run: git commit, tag and whether the worktree differed, the DVC stage's hash and
the id shared by every stage of one `dvc repro`.

Computed once per stage process, in the driver (which has the repository), and handed on: to the
stage's MLflow run as tags, to Ray workers as their environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ddpm.io_utils import file_digest
from pipelines.project import repo_root

PIPELINE_ID_ENV = "DDPM_PIPELINE_ID"


# DVC hands `dvc exp run`'s experiment name to every stage command in this variable.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
# What DVC writes after each stage of a repro: the hashes of what ran.
DVC_LOCK = "dvc.lock"


def git_info(root: Path | None = None) -> dict[str, str]:
    """Commit, exact tag (if HEAD has one) and whether the worktree differs from HEAD.

    `git_dirty` leaves out what `dvc repro` itself rewrites: the paths dvc.yaml declares as
    outputs (DVC deletes a stage's git-tracked outputs, metrics/*.json, before running it) and
    dvc.lock (rewritten after each stage). Both always differ mid-repro, and a run made at a clean
    tag would otherwise claim uncommitted changes.
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
            rewritten = [prefix + out for out in [*dvc_outputs(root), DVC_LOCK]]
            changed = [p for p in _porcelain_paths(status) if not _under_any(p, rewritten)]
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


def pipeline_id() -> str:
    """One id shared by every stage of one `dvc repro` / `dvc exp run`.

    $DDPM_PIPELINE_ID wins (set it to group stages that are started by hand or as Ray jobs).
    Otherwise each stage, a separate child process of DVC, finds the `dvc` process above it and
    hashes (host, pid, start time): the same for all stages of one invocation, different for the
    next one, and needing no shared file (a file written by the first stage would go stale
    whenever the first stages are skipped as up to date). Without a DVC ancestor the id is a
    fresh random one. A stage computes it once (`provenance_tags`) and hands it to its Ray workers
    (`pipelines.cluster.worker_env`).
    """
    env = os.environ.get(PIPELINE_ID_ENV)
    if env:
        return env
    invocation = dvc_invocation()
    if invocation is None:
        return "run-" + uuid.uuid4().hex[:12]
    pid, started = invocation
    seed = f"{socket.gethostname()}:{pid}:{started:.3f}"
    return "dvc-" + hashlib.sha256(seed.encode()).hexdigest()[:12]


def dvc_invocation() -> tuple[int, float] | None:
    """(pid, start time) of the `dvc` process this one runs under (`dvc repro`, `dvc exp run`:
    the nearest ancestor whose command is dvc), or None. The pair names one invocation: a pid
    alone may be reused once that process has ended."""
    for pid, argv, started in _process_chain():
        words = [Path(a).name for a in argv[:3]]
        if "dvc" in words or any(a.endswith("/dvc") for a in argv[:2]):
            return pid, started
    return None


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


# Every tag provenance_tags can set, and the CPU kernels the stage pinned (pipelines/kernels.py).
PROVENANCE_KEYS = (
    "cpu_kernels",
    "stage",
    "pipeline_id",
    "git_commit",
    "mlflow.source.git.commit",
    "git_tag",
    "git_dirty",
    "dvc_exp_name",
    "dvc_stage_hash",
)


def provenance_tags(stage: str) -> dict[str, str]:
    """What produced a run: stage, pipeline_id, dvc_exp_name (under `dvc exp run`), git_commit
    (+ git_tag, git_dirty) and dvc_stage_hash. Computed once by the stage's driver, which has the
    repository, and recorded on its MLflow run; a Tune trial on another node receives them."""
    tags = {"stage": stage, "pipeline_id": pipeline_id(), **git_info()}
    exp_name = os.environ.get(DVC_EXP_NAME_ENV)
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    stage_hash = dvc_stage_hash(stage)
    if stage_hash:
        tags["dvc_stage_hash"] = stage_hash
    return tags


def recorded_provenance(run_tags: Mapping[str, str]) -> dict[str, str]:
    """The provenance tags among a run's tags (which also hold MLflow's own and the host's), so
    that runs nested under a stage's run carry the stage's provenance without computing it
    again."""
    return {key: run_tags[key] for key in PROVENANCE_KEYS if key in run_tags}
