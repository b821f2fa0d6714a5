"""prepare stage: the raw dataset -> `data/prepared/{train,test}` Parquet shards + manifests.

The conversion runs in the stage's own process, next to the repository: its input (data.source,
usually a DVC-tracked file of the repository) and its output (a DVC output) are both on the
driver's disk, which Ray workers on other machines cannot read. The stages that use the data on
the cluster publish it to the shared store (pipelines/store.py) under its digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm.data import prepare_dataset
from pipelines.params import Params
from pipelines.project import absolute, repo_root
from pipelines.run_info import phase, write_run_info
from pipelines.stage_cli import stage_main
from pipelines.stage_metrics import write_stage_details


def prepare_kwargs(params: Params) -> dict[str, Any]:
    d = params.data
    return dict(
        name=d.dataset,
        source=str(absolute(d.source)) if d.source is not None else None,
        out_dir=str(absolute(d.out_dir)),
        image_size=d.image_size,
        channels=d.channels,
        shard_rows=d.shard_rows,
        test_fraction=d.test_fraction,
        seed=params.seed,
        max_corrupt_fraction=d.max_corrupt_fraction,
        max_images=d.max_images,
        download=d.download,
    )


def check_source(params: Params) -> None:
    """A raw source that does not exist fails here, before Ray starts."""
    d = params.data
    if d.source is None or d.download:
        return
    source = absolute(d.source)
    if not source.exists():
        raise FileNotFoundError(
            f"data.source {d.source!r}: {source} does not exist (dataset {d.dataset!r})"
        )


def run(params: Params) -> dict[str, Any]:
    """Write the shards, the data metrics file and log counts to the active MLflow run."""
    import mlflow

    kwargs = prepare_kwargs(params)
    print(f"[prepare] {params.data.dataset} -> {kwargs['out_dir']}", flush=True)
    with phase("compute"):
        summary = prepare_dataset(**kwargs, progress=True)
    # Counts compare across runs; the dataset's name, image shape and shard layout describe it.
    counts: dict[str, Any] = {}
    for split, info in summary["splits"].items():
        counts[f"{split}_count"] = info["count"]
        counts[f"{split}_skipped"] = info["skipped"]
        print(f"[prepare] {split}: {info['count']} images {info['shape']}", flush=True)
    with phase("outputs"):
        write_stage_details(absolute(params.evaluate.out_dir), "data", counts)
        write_run_info(
            repo_root(),
            "prepare",
            {
                "dataset": summary["dataset"],
                "shape": next(iter(summary["splits"].values()))["shape"],
                "out_dir": str(kwargs["out_dir"]),
                "shards": {split: info["shards"] for split, info in summary["splits"].items()},
            },
        )
    with phase("mlflow_log"):
        mlflow.log_metrics({k: float(v) for k, v in counts.items() if isinstance(v, int)})
        out_dir = Path(kwargs["out_dir"])
        for split in summary["splits"]:
            mlflow.log_artifact(
                str(out_dir / split / "manifest.json"), artifact_path=f"data/{split}"
            )
        mlflow.log_dict(summary, "data/summary.json")
    return summary


def main(argv: list[str] | None = None) -> None:
    # Prepare reads and writes files on this machine only: no Ray cluster to start.
    stage_main("prepare", run, __doc__, argv, preflight=check_source, uses_ray=False)


if __name__ == "__main__":
    main()
