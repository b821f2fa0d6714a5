"""classifier stage: the offline quality classifier, trained on the prepared train split.

Its penultimate features give the classifier Fréchet distance, its softmax the classifier score
and the class coverage of samples (pipelines/evaluate.py), so generated digits can be judged on a
machine without the Inception weights. The training runs as one Ray task (on a GPU when the
cluster has one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from ddpm.io_utils import write_json
from pipelines.common import absolute, gpu_available, stage_main
from pipelines.params import Params


def train_and_save(
    data_dir: str, out_path: str, epochs: int, batch_size: int, lr: float, seed: int, device: str
) -> dict[str, Any]:
    """Train on `data_dir/train`, report accuracy on `data_dir/test`, save to `out_path`."""
    from ddpm.data import load_manifest, load_split
    from ddpm.images import to_nhwc
    from ddpm.metrics import save_classifier, train_classifier

    manifest = load_manifest(Path(data_dir) / "train")
    num_classes = len(manifest["label_names"])
    if num_classes < 2:
        raise ValueError(
            f"{data_dir}/train/manifest.json lists {num_classes} label(s); the offline "
            "classifier needs a labelled dataset with at least 2 classes"
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
        progress=True,
    )
    sha = save_classifier(
        model.cpu(), out_path, metadata={"label_names": manifest["label_names"], **report}
    )
    return {**report, "sha256": sha}


def run(params: Params) -> dict[str, Any]:
    import mlflow

    c = params.classifier
    use_gpu = gpu_available()
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(train_and_save)
    out = absolute(c.out)
    report = ray.get(
        task.remote(
            str(absolute(params.data.out_dir)),
            str(out),
            c.epochs,
            c.batch_size,
            c.lr,
            params.seed,
            "cuda" if use_gpu else "cpu",
        )
    )
    print(f"[classifier] test accuracy {report['test_accuracy']:.4f} -> {out}", flush=True)
    write_json(absolute(params.evaluate.out_dir) / "classifier.json", report)
    mlflow.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
    mlflow.log_artifact(str(out), artifact_path="model")
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("classifier", run, __doc__, argv)


if __name__ == "__main__":
    main()
