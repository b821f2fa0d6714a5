"""What a stage's run was like, as opposed to what it produced: wall time, throughput, where its
checkpoint went, digests, why something was skipped.

These change from one run to the next even when the results do not, so they stay out of the
metrics files: a DVC metrics file is an output whose hash dvc.lock records, and a timing in it
would make an exact reproduction look like a change (`dvc metrics diff`, `dvc.lock`). They go to
`run_info/<stage>.json` (git-ignored, not a DVC output) and to the stage's MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm.io_utils import write_json

RUN_INFO_DIR = "run_info"
# A stage's phases in the order they happen (`StageClock`): stage_cli laps the fixed ones; the
# stage's work is `publish` (data and weights to the shared store), `compute` (the Ray work, or
# the local work of a stage without Ray), `outputs` (files and pictures), `mlflow_log` (metrics,
# artifacts, model registration), each marked by `phase`, and `run`, what no phase names.
PHASES = (
    "start_and_imports",
    "params_and_checks",
    "ray_start",
    "mlflow_start",
    "publish",
    "compute",
    "outputs",
    "mlflow_log",
    "run",
    "mlflow_end",
    "ray_shutdown",
)
WORK_PHASES = ("publish", "compute", "outputs", "mlflow_log")


def write_run_info(root: Path, stage: str, info: dict[str, Any]) -> Path:
    """Write `info` to <root>/run_info/<stage>.json and attach it to the active MLflow run."""
    import mlflow

    from pipelines.kernels import in_effect
    from pipelines.tracking import tolerate_mlflow_outage

    info = {**info, "cpu_kernels": in_effect()}
    path = Path(root) / RUN_INFO_DIR / f"{stage}.json"
    write_json(path, info)
    if mlflow.active_run() is not None:
        with tolerate_mlflow_outage(stage, "logging its run info"):
            mlflow.log_dict(info, f"run_info/{stage}.json")
    return path


def add_to_run_info(root: Path, stage: str, extra: dict[str, Any]) -> Path:
    """Merge `extra` into <root>/run_info/<stage>.json (written by the stage's run, if it did)."""
    path = Path(root) / RUN_INFO_DIR / f"{stage}.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, {**info, **extra})
    return path


class StageClock:
    """Wall seconds of a stage process's phases, the first from the process's start: where a
    stage's time goes besides its work (imports, Ray, MLflow), for run_info's `seconds`.

    The stage's own work is split by `phase` into publishing to the store, compute, output
    files and pictures, and MLflow logging; what no phase names is `run`."""

    # The clock of the stage this process runs (the latest stage_main's), which `phase` charges.
    running: StageClock | None = None

    def __init__(self) -> None:
        import psutil  # ships with ray and mlflow

        started = psutil.Process().create_time()
        self.seconds: dict[str, float] = {"start_and_imports": time.time() - started}
        self._last = time.monotonic()
        self._in_phase = False
        StageClock.running = self

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (one of PHASES)."""
        if phase not in PHASES:
            raise ValueError(f"unknown stage phase {phase!r}; one of {', '.join(PHASES)}")
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def in_order(self) -> dict[str, float]:
        """The phases that took time, in the order of PHASES."""
        return {name: self.seconds[name] for name in PHASES if name in self.seconds}

    def total(self) -> float:
        return sum(self.seconds.values())


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the wall time inside to `name` on the running stage's clock (the work before it,
    since the last lap, to `run`). Inside another phase it adds nothing: the outer one keeps the
    time. Without a stage clock (the library used on its own) it only runs the block."""
    if name not in WORK_PHASES:
        raise ValueError(f"unknown work phase {name!r}; one of {', '.join(WORK_PHASES)}")
    clock = StageClock.running
    if clock is None or clock._in_phase:
        yield
        return
    clock.lap("run")
    clock._in_phase = True
    try:
        yield
    finally:
        clock._in_phase = False
        clock.lap(name)
