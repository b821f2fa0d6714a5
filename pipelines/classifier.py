"""classifier stage: the offline quality classifier, trained on the prepared train split.

Its penultimate features give the classifier Fréchet distance, its softmax the classifier score
and the class coverage of samples (pipelines/evaluate.py), so generated digits can be judged on a
machine without the Inception weights. The training runs as one Ray task (on a GPU when the
cluster has one) on any node: it reads the prepared data from the shared store and returns the
saved weights' bytes, which the driver writes to classifier.out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray

from ddpm.io_utils import atomic_write
from pipelines.cluster import gpu_available
from pipelines.params import Params
from pipelines.project import absolute, repo_root, shared_store
from pipelines.run_info import phase, write_run_info
from pipelines.stage_cli import stage_main
from pipelines.stage_metrics import headline, write_stage_metrics
from pipelines.store import Store, fetch_prepared, publish_prepared

# What metrics/details/classifier.json holds: how well the judge of sample quality does
# (metrics/classifier.json: the test accuracy and its standard error, pipelines/stage_metrics.py).
CLASSIFIER_METRICS = ("test_accuracy", "test_accuracy_stderr", "train_loss")


def train_and_save(
    shared: Store, data_key: str, epochs: int, batch_size: int, lr: float, seed: int, device: str
) -> tuple[dict[str, Any], bytes]:
    """Train on the dataset's train split, report accuracy on its test split; returns the report
    and the saved checkpoint's bytes."""
    from ddpm.data import load_manifest, load_split
    from ddpm.images import to_nhwc
    from ddpm.metrics import save_classifier, train_classifier

    data_dir = fetch_prepared(shared, data_key)
    manifest = load_manifest(data_dir / "train")
    num_classes = len(manifest["label_names"])
    if num_classes < 2:
        raise ValueError(
            f"{shared.uri(data_key)}/train/manifest.json lists {num_classes} label(s); the "
            "offline classifier needs a labelled dataset with at least 2 classes"
        )
    # load_split gives NCHW; the classifier takes on-disk NHWC uint8.
    images, labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    model, report = train_classifier(
        to_nhwc(images),
        labels.numpy(),
        num_classes=num_classes,
        test_images=to_nhwc(test_images),
        test_labels=test_labels.numpy(),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        # No bar: from a Ray task every redraw of one arrives as a line of its own.
        progress=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "classifier.pt"
        sha = save_classifier(
            model.cpu(), path, metadata={"label_names": manifest["label_names"], **report}
        )
        return {**report, "sha256": sha}, path.read_bytes()


def run(params: Params) -> dict[str, Any]:
    import mlflow

    c = params.classifier
    use_gpu = gpu_available()
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(train_and_save)
    out = absolute(c.out)
    shared = shared_store(params)
    with phase("publish"):
        data_key = publish_prepared(shared, absolute(params.data.out_dir))
    print(f"[classifier] training {c.epochs} epochs in a Ray task", flush=True)
    with phase("compute"):
        report, weights = ray.get(
            task.remote(
                shared,
                data_key,
                c.epochs,
                c.batch_size,
                c.lr,
                params.seed,
                "cuda" if use_gpu else "cpu",
            )
        )
    with phase("outputs"):
        with atomic_write(out, "wb") as handle:
            handle.write(weights)
        print(f"[classifier] test accuracy {report['test_accuracy']:.4f} -> {out}", flush=True)
        # The weights' digest, the epochs and the data sizes describe the run.
        results = {k: v for k, v in report.items() if k in CLASSIFIER_METRICS}
        write_stage_metrics(
            absolute(params.evaluate.out_dir),
            "classifier",
            headline(report, ["test_accuracy"]),
            results,
        )
        write_run_info(
            repo_root(),
            "classifier",
            {**{k: v for k, v in report.items() if k not in CLASSIFIER_METRICS}, "out": str(out)},
        )
    with phase("mlflow_log"):
        mlflow.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out), artifact_path="model")
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("classifier", run, __doc__, argv)


if __name__ == "__main__":
    main()
