"""What a stage's run was like, as opposed to what it produced: wall time, throughput, where its
checkpoint went, digests, why something was skipped.

These change from one run to the next even when the results do not, so they stay out of the
metrics files: a DVC metrics file is an output whose hash dvc.lock records, and a timing in it
would make an exact reproduction look like a change (`dvc metrics diff`, `dvc.lock`). They go to
`run_info/<stage>.json` (git-ignored, not a DVC output) and to the stage's MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm.io_utils import write_json

RUN_INFO_DIR = "run_info"


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
