"""evaluate stage: sample quality and test likelihood -> metrics/ (headline and details) + plots.

Reported for three image sets, so each number has a scale:
  * `samples`: the sample stage's images from the EMA model in `sample.checkpoint` (train's
    output by default; any EMA export or checkpoint, such as the paper's converted weights);
  * `untrained`: the same sampler run on the same network freshly initialised (the baseline the
    trained model must beat; `margin` holds the differences and ratios, each with a `*_stderr`
    beside it: null where the statistic has no per-image decomposition, the Fréchet distance);
  * `real_test`: the held-out test split itself, the best a perfect model could score with this
    few images (Fréchet distances are biased upwards at small sample sizes).

Metrics: the offline classifier's Fréchet distance to the training split, its classifier score and
the class coverage of the predictions; FID and Inception Score against the training set when the
FID Inception weights exist (else null, with the reason in the JSON and the MLflow run); the test
NLL in bits/dim from the full variational bound (Eq. 5, all T terms; its per-timestep terms are
the DVC plot) and from the Monte-Carlo estimate for both models, each ± its standard error over the
images. Both bounds clip x̂_0 to [-1, 1] in the reverse mean, as the reference codes evaluate it
(`ddpm.likelihood`); `bound_clip_denoised` in the JSON records that. The two models' Monte-Carlo
bounds use the same images and the same (t, ε) draws, so their difference is paired and its
standard error small.

The heavy parts (the bound, the baseline's sampling, feature extraction) are Ray tasks that may
run on any node: they load the EMA weights, the classifier, the Inception weights and the training
split from the shared store (pipelines/store.py), where the driver publishes them, and the FID
reference statistics are cached there too (`cache/refstats/`), so a cluster computes them once.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ddpm.evaluation import MC_BATCH, MC_NUM_T, mean_and_stderr
from ddpm.images import image_grid, to_nhwc
from ddpm.io_utils import atomic_write
from ddpm.seeding import derive_seed
from pipelines import sample
from pipelines.cluster import gpu_available
from pipelines.params import Params
from pipelines.plots import csv_line_plot
from pipelines.project import absolute, repo_root, shared_store, trained_model_params
from pipelines.run_info import phase, write_run_info
from pipelines.stage_cli import stage_main
from pipelines.stage_metrics import DETAILS_DIR, headline, write_stage_metrics
from pipelines.store import Store, fetch_prepared, node_cache, publish_blob, publish_prepared
from pipelines.tracking import log_key_metrics

# The store folder of FID reference statistics (ddpm.metrics.reference_stats entries).
REFSTATS_DIR = "cache/refstats"
# How the bound is evaluated: x̂_0 clipped to [-1, 1] (the reference codes' bound). Recorded in the
# run info and the MLflow run, because the unclipped bound can be several bits/dim higher.
BOUND_CLIP_DENOISED = True
# Splits of the classifier score: its standard error is their std / √(splits - 1).
CLASSIFIER_SPLITS = 10
# Below this test accuracy the offline classifier does not tell the classes apart, so Fréchet
# distances in its feature space measure little: its metrics are reported but marked invalid,
# and no margin is built from them (a 10.8%-accurate classifier once gave a "16.8x" margin).
CLASSIFIER_MIN_ACCURACY = 0.9


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error over images; the error is null (not NaN, which is not JSON) for
    a single image."""
    # A copy: arrays from ray.get are read-only views of the object store, which torch
    # cannot wrap without a warning.
    mean, stderr = mean_and_stderr(torch.tensor(values))
    return mean, stderr if np.isfinite(stderr) else None


def _pm(entry: dict[str, Any], key: str) -> str:
    """`entry[key]` ± its standard error, for the log."""
    stderr = entry.get(f"{key}_stderr")
    return f"{entry[key]:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def _model(shared: Store, ema_key: str, device: str, untrained_seed: int | None):
    """The EMA model, or (untrained_seed given) the same architecture freshly initialised."""
    from ddpm.training import configs_of, load_ema_model

    model, diffusion, meta = load_ema_model(shared.fetch_file(ema_key), device)
    if untrained_seed is not None:
        model_config, _ = configs_of(meta["config"])
        learn_sigma = diffusion.output_channels_multiplier == 2
        model = model_config.build(learn_sigma=learn_sigma, seed=untrained_seed)
        model = model.to(device).eval().requires_grad_(False)
    return model, diffusion


def full_bound(
    shared: Store, ema_key: str, images_nchw: torch.Tensor, seed: int, device: str
) -> dict[str, np.ndarray]:
    """Worker: every term of the bound for a chunk of uint8 test images."""
    from ddpm.likelihood import bits_per_dim

    model, diffusion = _model(shared, ema_key, device, None)
    generator = torch.Generator().manual_seed(seed)
    out = bits_per_dim(
        diffusion,
        model,
        images_nchw.to(device),
        clip_denoised=BOUND_CLIP_DENOISED,
        generator=generator,
    )
    return {k: v.cpu().numpy() for k, v in out.items()}


def mc_bound(
    shared: Store,
    ema_key: str,
    images_nchw: torch.Tensor,
    seed: int,
    device: str,
    untrained_seed: int | None,
) -> np.ndarray:
    """Worker: the Monte-Carlo estimate of the bound per image, in batches of MC_BATCH.

    The draws depend on `seed` and the images only, so the trained and the untrained model,
    called with one seed, are scored with the same (t, ε): their per-image difference is paired.
    """
    from ddpm.likelihood import mc_bits_per_dim

    model, diffusion = _model(shared, ema_key, device, untrained_seed)
    generator = torch.Generator().manual_seed(seed)
    values = [
        mc_bits_per_dim(
            diffusion,
            model,
            batch.to(device),
            num_t=MC_NUM_T,
            generator=generator,
            clip_denoised=BOUND_CLIP_DENOISED,
        )["bpd"]
        .cpu()
        .numpy()
        for batch in images_nchw.split(MC_BATCH)
    ]
    return np.concatenate(values)


def baseline_samples(shared: Store, ema_key: str, params: Params, device: str) -> np.ndarray:
    """Worker: evaluate.baseline_images from the untrained network with the sample stage's
    sampler settings."""
    from ddpm.sampling import draw_images

    model, diffusion = _model(shared, ema_key, device, params.seed)
    generator = torch.Generator().manual_seed(derive_seed(params.seed, "evaluate.baseline"))
    return draw_images(
        diffusion,
        model,
        params.evaluate.baseline_images,
        model.config.image_shape,
        params.sampler_config(),
        batch_size=params.sample.batch_size,
        generator=generator,
        device=device,
    )


def classifier_scores(
    shared: Store,
    classifier_key: str,
    data_key: str,
    sets: dict[str, np.ndarray],
    batch_size: int,
    device: str,
) -> dict[str, dict[str, Any]]:
    """Worker: offline metrics of each image set against the training split's features."""
    from ddpm.data import load_split
    from ddpm.metrics import accumulate_features, classifier_metrics, load_classifier

    classifier = load_classifier(shared.fetch_file(classifier_key)).to(device)
    train, _ = load_split(fetch_prepared(shared, data_key), "train")
    reference, _ = accumulate_features(
        classifier, _batches(to_nhwc(train), batch_size), device=device
    )
    return {
        name: classifier_metrics(
            classifier,
            _batches(images, batch_size),
            reference,
            device=device,
            splits=CLASSIFIER_SPLITS,
        )
        for name, images in sets.items()
    }


def fid_scores(
    shared: Store,
    weights_key: str,
    data_key: str,
    sets: dict[str, np.ndarray],
    batch_size: int,
    device: str,
) -> dict[str, dict[str, Any]]:
    """Worker: FID against the training split (statistics cached in the store) and Inception
    Score."""
    import hashlib

    from ddpm.metrics import inception_metrics, load_fid_inception, reference_stats

    network = load_fid_inception(shared.fetch_file(weights_key), device=device)
    data_dir = fetch_prepared(shared, data_key)
    digest = hashlib.sha256((data_dir / "train" / "manifest.json").read_bytes()).hexdigest()
    # The node's cache folder mirrors the store's for this dataset: entries computed on any
    # node are found here, and a new entry is uploaded for the others.
    cache = node_cache() / REFSTATS_DIR
    for name in shared.list_files(REFSTATS_DIR):
        if digest in name and not (cache / name).is_file():
            shared.download(f"{REFSTATS_DIR}/{name}", cache / name)
    reference = reference_stats(
        network,
        _lazy_train_batches(data_dir, batch_size),
        cache,
        digest,
        device=device,
        progress=True,
    )
    stored = set(shared.list_files(REFSTATS_DIR))
    for path in cache.glob(f"*{digest}*"):
        if path.name not in stored:
            shared.upload(path, f"{REFSTATS_DIR}/{path.name}")
    return {
        name: inception_metrics(network, _batches(images, batch_size), reference, device=device)
        for name, images in sets.items()
    }


def _lazy_train_batches(data_dir: Path, batch_size: int):
    """Only consumed when the cached reference statistics are missing."""
    from ddpm.data import load_split

    train, _ = load_split(data_dir, "train")
    yield from _batches(to_nhwc(train), batch_size)


def _batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@dataclasses.dataclass(frozen=True)
class Work:
    """Where the Ray tasks find their inputs (the shared store and the keys the driver published
    there) and the device they run on."""

    shared: Store
    ema_key: str
    data_key: str
    classifier_key: str
    device: str

    def task(self, fn):
        return ray.remote(num_cpus=1, num_gpus=1 if self.device == "cuda" else 0)(fn)


@dataclasses.dataclass(frozen=True)
class Gathered:
    """What the tasks and the classifier file give, before any statistic is taken."""

    scores: dict[str, dict[str, Any]]  # classifier_scores of each image set, in report order
    fid: dict[str, dict[str, Any]]  # fid_scores of each image set; empty without FID
    fid_reason: str | None  # why there is no FID
    terms: np.ndarray  # [N, T]: the full bound's per-timestep terms of each test image
    prior: np.ndarray  # [N]
    total: np.ndarray  # [N]
    mc: dict[str, np.ndarray]  # "samples", "untrained": the paired Monte-Carlo bound per image
    accuracy: float  # the offline classifier's test accuracy

    @property
    def bpd_per_timestep(self) -> np.ndarray:
        """[T]: the mean over test images of each term of the bound."""
        return self.terms.mean(axis=0)


@dataclasses.dataclass(frozen=True)
class Launched:
    """The tasks started before any result is needed."""

    bounds: list[ray.ObjectRef]  # the full bound of each chunk of test images
    mc: dict[str, ray.ObjectRef]  # the Monte-Carlo bound of the trained and untrained model
    baseline: ray.ObjectRef  # the untrained network's samples


def set_entry(
    score: dict[str, Any], fid: dict[str, Any] | None, mc: np.ndarray | None
) -> dict[str, Any]:
    """The report of one image set: its classifier scores, its FID (when given) and its
    Monte-Carlo bound (when given)."""
    entry = {
        "classifier_fd": score["classifier_fd"],
        "classifier_fd_stderr": score["classifier_fd_stderr"],
        "classifier_score": score["classifier_score"],
        "classes_present": score["classes_present"],
        "class_entropy": score["class_entropy"],
    }
    # Absent rather than null without the weights: `dvc metrics show` prints "-".
    if fid is not None:
        entry["fid"] = fid["fid"]
        entry["inception_score"] = fid["inception_score"]
    # The split scores' population std over √(splits - 1): the standard error of their mean.
    entry["classifier_score_stderr"] = float(
        score["classifier_score_std"] / np.sqrt(CLASSIFIER_SPLITS - 1)
    )
    if mc is not None:
        entry["test_nll_bpd_mc"], entry["test_nll_bpd_mc_stderr"] = _mean_and_stderr(mc)
    return entry


def margins(
    trained: dict[str, Any],
    untrained: dict[str, Any],
    mc: dict[str, np.ndarray],
    classifier_valid: bool,
) -> dict[str, Any]:
    """How far the trained model is ahead of the untrained one: by the test bound always, by the
    classifier's features only when they are valid."""
    # Same images, same draws: the per-image difference removes what the two bounds share.
    nll_margin, nll_margin_stderr = _mean_and_stderr(mc["untrained"] - mc["samples"])
    margin = {
        "bpd_mc_gain": nll_margin,  # untrained minus trained test bound, bits/dim
        "bpd_mc_gain_stderr": nll_margin_stderr,
    }
    if classifier_valid:
        margin |= {
            # How many times closer to the data the trained model's samples are, by feature FD
            # (a statistic of the whole set, with no per-image error).
            "fd_ratio": untrained["classifier_fd"] / max(trained["classifier_fd"], 1e-12),
            # Trained minus untrained score: two independent sample sets, errors in quadrature.
            "score_gain": trained["classifier_score"] - untrained["classifier_score"],
            "score_gain_stderr": float(
                np.hypot(trained["classifier_score_stderr"], untrained["classifier_score_stderr"])
            ),
        }
    return margin


def build_report(g: Gathered) -> dict[str, Any]:
    """The full report (metrics/details/evaluate.json) from the gathered numbers: each image
    set's entry, the full bound of the trained model, whether the classifier's metrics are
    valid, and the margins."""
    report: dict[str, Any] = {
        name: set_entry(score, g.fid.get(name), g.mc.get(name)) for name, score in g.scores.items()
    }
    trained, untrained = report["samples"], report["untrained"]
    trained["test_nll_bpd"], trained["test_nll_bpd_stderr"] = _mean_and_stderr(g.total)
    trained["test_nll_bpd_prior"] = float(g.prior.mean())
    # (the classifier's accuracy itself is in metrics/classifier.json)
    classifier_valid = g.accuracy >= CLASSIFIER_MIN_ACCURACY
    report["classifier_metrics_valid"] = classifier_valid
    report["margin"] = margins(trained, untrained, g.mc, classifier_valid)
    return report


# The trained model's numbers in metrics/evaluate.json (pipelines/stage_metrics.py): keys of
# the `samples` set's entry. The classifier's only while its metrics are valid; FID and IS only
# when the Inception weights exist.
LIKELIHOOD_KEYS = ("test_nll_bpd", "test_nll_bpd_mc")
CLASSIFIER_KEYS = ("classifier_fd", "classifier_score")
INCEPTION_KEYS = ("fid", "inception_score")


def evaluate_headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/evaluate.json: the trained model's test bounds, sample quality by the offline
    classifier (when valid) and FID/IS (when computed); the rest of the report (the untrained
    and real-test sets, the margins) is in metrics/details/evaluate.json."""
    valid = report["classifier_metrics_valid"]
    keys = LIKELIHOOD_KEYS + (CLASSIFIER_KEYS if valid else ()) + INCEPTION_KEYS
    return headline(report["samples"], keys)


def build_run_info(g: Gathered) -> dict[str, Any]:
    """Why FID is missing, how many images each number used and how the bound was taken: the
    run info and the MLflow run's tags, not the metrics."""
    return {
        "fid_unavailable_reason": g.fid_reason,
        "num_images": {name: int(score["num_samples"]) for name, score in g.scores.items()},
        "test_nll_images": int(len(g.total)),
        "bound_clip_denoised": BOUND_CLIP_DENOISED,
        "classifier_test_accuracy": g.accuracy,
    }


def report_metrics(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The MLflow metrics of each group of the report ("samples.classifier_fd", ...): its
    numbers, without the missing ones."""
    return {
        name: {f"{name}.{k}": float(v) for k, v in entry.items() if isinstance(v, (int, float))}
        for name, entry in report.items()
        if isinstance(entry, dict)
    }


def publish(params: Params) -> Work:
    """The EMA weights, the prepared data and the classifier into the shared store."""
    shared = shared_store(params)
    return Work(
        shared=shared,
        ema_key=publish_blob(shared, absolute(params.sample.checkpoint)),  # checked by preflight
        data_key=publish_prepared(shared, absolute(params.data.out_dir)),
        classifier_key=publish_blob(shared, absolute(params.classifier.out)),
        device="cuda" if gpu_available() else "cpu",
    )


def launch(params: Params, work: Work, test: torch.Tensor) -> Launched:
    """Everything that needs no other result, at once (Ray runs it on the free CPUs/GPUs): the
    full bound in chunks, the Monte-Carlo bound of both models and the untrained samples."""
    e = params.evaluate
    bounds = [
        work.task(full_bound).remote(
            work.shared,
            work.ema_key,
            chunk,
            derive_seed(params.seed, "evaluate.nll", k),
            work.device,
        )
        for k, chunk in enumerate(test[: e.nll_images].split(e.nll_batch_size))
    ]
    mc_task = work.task(mc_bound)
    mc_images = test[: e.mc_images]
    mc_seed = derive_seed(params.seed, "evaluate.mc")
    mc = {
        "samples": mc_task.remote(work.shared, work.ema_key, mc_images, mc_seed, work.device, None),
        "untrained": mc_task.remote(
            work.shared, work.ema_key, mc_images, mc_seed, work.device, params.seed
        ),
    }
    baseline = work.task(baseline_samples).remote(work.shared, work.ema_key, params, work.device)
    return Launched(bounds, mc, baseline)


def fid_of(
    params: Params, work: Work, sets: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """FID and Inception Score of each image set, or none and the reason."""
    from ddpm.metrics import resolve_fid_weights

    e = params.evaluate
    if not e.fid.enabled:
        reason = "evaluate.fid.enabled is false"
    else:
        try:
            weights = resolve_fid_weights(e.fid.inception_weights)
        except FileNotFoundError as err:
            reason = str(err)
        else:
            key = publish_blob(work.shared, weights)
            task = work.task(fid_scores)
            args = (work.shared, key, work.data_key, sets, e.fid.batch_size, work.device)
            return ray.get(task.remote(*args)), None
    print(f"[evaluate] FID and IS skipped: {reason}", flush=True)
    return {}, reason


def gather(params: Params, work: Work, launched: Launched, sets: dict[str, np.ndarray]) -> Gathered:
    """The scores of the image sets, then the launched bounds, and the classifier's accuracy."""
    from ddpm.metrics import load_classifier

    scores = ray.get(
        work.task(classifier_scores).remote(
            work.shared,
            work.classifier_key,
            work.data_key,
            sets,
            params.evaluate.batch_size,
            work.device,
        )
    )
    fid, fid_reason = fid_of(params, work, sets)
    bounds = ray.get(launched.bounds)
    accuracy = load_classifier(absolute(params.classifier.out)).metadata["test_accuracy"]
    return Gathered(
        scores=scores,
        fid=fid,
        fid_reason=fid_reason,
        terms=np.concatenate([b["terms"] for b in bounds]),
        prior=np.concatenate([b["prior"] for b in bounds]),
        total=np.concatenate([b["total"] for b in bounds]),
        mc={name: ray.get(ref) for name, ref in launched.mc.items()},
        accuracy=float(accuracy),
    )


def write_outputs(params: Params, report: dict[str, Any], g: Gathered) -> list[Path]:
    """The metrics files, the run info and the per-timestep plot (CSV and PNG); returns the
    files MLflow keeps."""
    out_dir = absolute(params.evaluate.out_dir)
    plots_dir = absolute(params.evaluate.plots_dir)
    headline_file = write_stage_metrics(out_dir, "evaluate", evaluate_headline(report), report)
    write_run_info(repo_root(), "evaluate", build_run_info(g))
    with atomic_write(plots_dir / "bpd_per_timestep.csv", "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t", "bits_per_dim"])
        for i, value in enumerate(g.bpd_per_timestep):
            writer.writerow([i + 1, f"{value:.8g}"])  # paper numbering: index i is t = i + 1
    trained, untrained = report["samples"], report["untrained"]
    print(
        f"[evaluate] classifier FD {_pm(trained, 'classifier_fd')} (untrained "
        f"{untrained['classifier_fd']:.3f}, real test {report['real_test']['classifier_fd']:.3f}); "
        f"test NLL {_pm(trained, 'test_nll_bpd')} bits/dim (x̂_0 clipped: {BOUND_CLIP_DENOISED}; "
        f"Monte-Carlo {_pm(trained, 'test_nll_bpd_mc')}, untrained "
        f"{_pm(untrained, 'test_nll_bpd_mc')}) -> {headline_file} and {out_dir / DETAILS_DIR}",
        flush=True,
    )
    return [
        headline_file,
        out_dir / DETAILS_DIR / "evaluate.json",
        plots_dir / "bpd_per_timestep.csv",
        write_bpd_png(plots_dir),
    ]


def log_evaluation(
    report: dict[str, Any], g: Gathered, artifacts: list[Path], untrained_grid: np.ndarray
) -> None:
    import mlflow

    for metrics in report_metrics(report).values():
        mlflow.log_metrics(metrics)
    # The names every run with these numbers shares, so one MLflow chart compares experiments.
    valid = report["classifier_metrics_valid"]
    log_key_metrics(
        {
            "test_bpd": report["samples"]["test_nll_bpd"],
            "classifier_fd": report["samples"]["classifier_fd"] if valid else None,
        }
    )
    for i, value in enumerate(g.bpd_per_timestep):
        mlflow.log_metric("bpd_per_timestep", float(value), step=i + 1)
    mlflow.set_tag("bound_clip_denoised", str(BOUND_CLIP_DENOISED).lower())
    if g.fid_reason:
        mlflow.set_tag("fid_unavailable_reason", g.fid_reason[:5000])
    for path in artifacts:
        mlflow.log_artifact(str(path))
    mlflow.log_image(untrained_grid, "untrained_grid.png")


def warn_if_invalid(report: dict[str, Any], accuracy: float) -> None:
    if not report["classifier_metrics_valid"]:
        print(
            f"[evaluate] WARNING: the offline classifier's test accuracy is {accuracy:.1%}, below "
            f"{CLASSIFIER_MIN_ACCURACY:.0%}: its Fréchet distances and scores are marked invalid "
            "and no classifier margin is given (train it longer: classifier.epochs)",
            flush=True,
        )


def run(params: Params) -> dict[str, Any]:
    from ddpm.data import load_split

    e = params.evaluate
    samples, _ = load_split(absolute(params.sample.out_dir))
    test, _ = load_split(absolute(params.data.out_dir), "test")
    print(
        f"[evaluate] {len(samples)} samples; bound on {len(test[: e.nll_images])} test images "
        f"({e.nll_batch_size} per task); Monte-Carlo bound on {len(test[: e.mc_images])}",
        flush=True,
    )
    with phase("publish"):
        work = publish(params)
    with phase("compute"):
        launched = launch(params, work, test)
        sets = {
            "samples": to_nhwc(samples),
            "untrained": ray.get(launched.baseline),
            "real_test": to_nhwc(test),
        }
        gathered = gather(params, work, launched, sets)
    report = build_report(gathered)
    warn_if_invalid(report, gathered.accuracy)
    with phase("outputs"):
        artifacts = write_outputs(params, report, gathered)
    grid = params.sample.grid_size
    untrained_grid = image_grid(sets["untrained"][: grid**2], ncol=grid)
    with phase("mlflow_log"):
        log_evaluation(report, gathered, artifacts, untrained_grid)
    return report


def write_bpd_png(plots_dir: Path) -> Path:
    """plots/bpd_per_timestep.png from its CSV: what `dvc plots show` draws offline."""
    return csv_line_plot(
        plots_dir / "bpd_per_timestep.csv",
        plots_dir / "bpd_per_timestep.png",
        "t",
        "bits_per_dim",
        title="Test bits/dim of each term of the bound (Eq. 5), by timestep",
        xlabel="timestep t (L_0 at t = 1)",
        ylabel="bits/dim",
        log_x=True,
        log_y=True,
    )


def preflight(params: Params) -> None:
    """The model the samples came from (sample.checkpoint) loads and fits the prepared data."""
    sample.preflight(params, data_required=True)


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", run, __doc__, argv, preflight=preflight, overlay=trained_model_params)


if __name__ == "__main__":
    main()
