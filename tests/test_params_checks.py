"""Params that could only fail late are refused when params load, naming the key and the fix
(pipelines/params.py)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from pipelines.params import (
    OUTPUT_KEYS,
    SCORE_SPLITS,
    Params,
    flatten,
    load_params_file,
    params_from_dict,
)

REPO = Path(__file__).resolve().parents[1]


def error_of(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        params_from_dict(raw, source="test.yaml")
    return str(info.value)


def problems(raw: dict) -> list[str]:
    """The listed problems of an invalid params dict, one per line."""
    return [line[4:] for line in error_of(raw).splitlines()[1:]]


# ---------------------------------------------------------------------------------------------
# A. Constraints between keys that a stage would otherwise hit at its end or mid-run.

LATE_FAILURES = {
    # evaluate scores its three image sets with SCORE_SPLITS splits each, after all else ran
    # ("ValueError: need at least 10 samples for 10 splits" at evaluate's end).
    "baseline_images_vs_score_splits": (
        {"evaluate": {"baseline_images": 8}},
        "evaluate.baseline_images",
        "need at least 10 images, got 8; raise evaluate.baseline_images",
    ),
    "num_images_vs_score_splits": (
        {"sample": {"num_images": 8, "grid_size": 2}},
        "sample.num_images",
        "need at least 10 images, got 8",
    ),
    "max_images_caps_the_test_split_below_score_splits": (
        {"data": {"max_images": 8}, "train": {"batch_size": 8}},
        "data.max_images",
        "need at least 10 images, got 8; raise data.max_images or set it to null",
    ),
    # Each data-parallel rank must get a whole local batch per epoch (ShardDataset.step_batches
    # raises in every train worker otherwise).
    "max_images_vs_train_batch": (
        {"data": {"max_images": 40}, "train": {"batch_size": 64}, "tune": {"enabled": False}},
        "train.batch_size",
        "data.max_images = 40 caps the train split; lower train.batch_size to at most 40",
    ),
    "max_images_vs_tune_trial_batch": (
        {
            "data": {"max_images": 31},
            "train": {"batch_size": 32, "num_workers": 2},
            "tune": {"enabled": True, "workers_per_trial": 1},
        },
        "train.batch_size",
        "tune.workers_per_trial = 1 (tune: 32 each, at most 31 training images each)",
    ),
    # tune.metric classifier_fd samples with 50 DDIM steps in every trial.
    "classifier_fd_vs_num_timesteps": (
        {"tune": {"metric": "classifier_fd"}, "diffusion": {"num_timesteps": 20}},
        "tune.metric",
        "use tune.metric: mc_bpd or diffusion.num_timesteps >= 50",
    ),
    "classifier_fd_needs_two_eval_images": (
        {"tune": {"metric": "classifier_fd", "eval_images": 1}},
        "tune.eval_images",
        "at least 2 images",
    ),
    # The classifier stage's network pools twice.
    "image_size_vs_offline_classifier": (
        {"data": {"image_size": 2}, "model": {"config": "tiny"}},
        "data.image_size",
        "offline classifier needs images of at least 4x4, got 2",
    ),
    # GPUs a local cluster of ray.num_gpus can never hold (require_resources / run() at start).
    "train_gpus_vs_local_num_gpus": (
        {"train": {"use_gpu": True, "num_workers": 2}, "ray": {"num_gpus": 1}},
        "train.use_gpu",
        "need one GPU each, but ray.num_gpus is 1",
    ),
    "sample_gpu_vs_local_num_gpus": (
        {"sample": {"use_gpu": True}, "ray": {"num_gpus": 0}},
        "sample.use_gpu",
        "set sample.use_gpu: false or raise ray.num_gpus",
    ),
    # A zero divisor was a ZeroDivisionError instead of a message.
    "zero_train_workers": (
        {"train": {"num_workers": 0}},
        "train.num_workers",
        "must be > 0, got 0",
    ),
    "zero_tune_workers": (
        {"tune": {"workers_per_trial": 0}},
        "tune.workers_per_trial",
        "must be > 0, got 0",
    ),
}


@pytest.mark.parametrize("raw, key, fix", LATE_FAILURES.values(), ids=LATE_FAILURES.keys())
def test_late_failure_is_refused_when_params_load(raw, key, fix):
    found = [p for p in problems(raw) if p.startswith(f"{key}: ")]
    assert found, problems(raw)
    assert any(fix in p for p in found), found


def test_score_splits_match_what_evaluate_and_the_library_use():
    from ddpm.metrics import classifier_metrics, inception_metrics
    from pipelines import evaluate

    assert evaluate.CLASSIFIER_SPLITS == SCORE_SPLITS
    for scorer in (inception_metrics, classifier_metrics):
        assert inspect.signature(scorer).parameters["splits"].default == SCORE_SPLITS


def test_score_splits_boundary_is_accepted():
    p = params_from_dict(
        {
            "data": {"max_images": SCORE_SPLITS},
            "train": {"batch_size": SCORE_SPLITS},
            "sample": {"num_images": SCORE_SPLITS, "grid_size": 3},
            "evaluate": {"baseline_images": SCORE_SPLITS},
        }
    )
    assert p.evaluate.baseline_images == SCORE_SPLITS


def test_a_misspelt_dataset_does_not_hide_later_errors():
    found = problems(
        {"data": {"dataset": "mnist_mlxten"}, "evaluate": {"baseline_images": 8}, "seed": -1}
    )
    keys = {p.split(":")[0] for p in found}
    assert {"data.dataset", "evaluate.baseline_images", "seed"} <= keys, found


def test_a_type_error_does_not_hide_other_sections_errors():
    found = problems({"train": {"steps": "many"}, "evaluate": {"baseline_images": 8}})
    keys = {p.split(":")[0] for p in found}
    assert keys == {"train.steps", "evaluate.baseline_images"}, found


def test_rules_on_a_value_that_did_not_build_are_left_out():
    # batch_size did not build, so its default (128) stands in: a divisibility error about 128
    # would blame a value the user never wrote.
    found = problems({"train": {"batch_size": "x", "num_workers": 3}})
    assert len(found) == 1 and found[0].startswith("train.batch_size: got 'x'"), found


def test_yaml_that_does_not_parse_is_a_params_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ValueError, match=rf"params file {bad} is not valid YAML"):
        load_params_file(bad)


# ---------------------------------------------------------------------------------------------
# E. Every output path stays inside the repository, never the repository itself or .git.

BAD_OUTPUTS = {
    "/tmp/elsewhere": "absolute path",
    "../victim": "leads out of the repository",
    "models/../../victim": "leads out of the repository",
    "..": "the repository's parent folder",
    "~/outputs": "home folder",
    "~": "home folder",
    ".": "the repository itself",
    "./": "the repository itself",
    "models/..": "the repository itself",
    "": "non-empty path",
    ".git": "git's own folder",
    ".git/hooks": "git's own folder",
    "models/../.git/objects": "git's own folder",
    "s3://bucket/out": "is a URI",
}


@pytest.mark.parametrize("key", OUTPUT_KEYS)
@pytest.mark.parametrize("value, why", BAD_OUTPUTS.items(), ids=list(BAD_OUTPUTS))
def test_output_path_outside_the_repository_is_refused(key, value, why):
    section, name = key.split(".")
    found = [p for p in problems({section: {name: value}}) if p.startswith(f"{key}: ")]
    assert found and why in found[0], found
    default = flatten(Params().to_dict())[key]
    assert f"give a path relative to the repository, e.g. {default!r}" in found[0]


def test_every_path_valued_output_key_is_checked():
    """Every params key that dvc.yaml templates into an out, metric or plot is in OUTPUT_KEYS."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    templated = set()
    for stage in spec.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                for path in entry if isinstance(entry, dict) else [entry]:
                    templated.update(
                        part.split("}")[0] for part in str(path).split("${")[1:] if "}" in part
                    )
    assert templated <= set(OUTPUT_KEYS), templated - set(OUTPUT_KEYS)


@pytest.mark.parametrize(
    "raw, key, text",
    [
        ({"data": {"out_dir": "models"}}, "data.out_dir", "train.out_dir ('models') is 'models'"),
        (
            {"data": {"out_dir": "models"}, "train": {"out_dir": "models/run"}},
            "data.out_dir",
            "train.out_dir ('models/run') is inside 'models'",
        ),
        (
            {"sample": {"out_dir": "data/prepared/samples"}},
            "data.out_dir",
            "sample.out_dir ('data/prepared/samples') is inside 'data/prepared'",
        ),
        (
            {"data": {"source": "data/prepared/raw.tar.gz", "dataset": "cifar10"}},
            "data.out_dir",
            "data.source ('data/prepared/raw.tar.gz') is inside 'data/prepared', a folder the "
            "prepare stage replaces",
        ),
        (
            {"sample": {"checkpoint": "samples/ema.pt"}},
            "sample.out_dir",
            "sample.checkpoint ('samples/ema.pt') is inside 'samples', a folder the sample stage",
        ),
    ],
)
def test_a_folder_a_stage_replaces_holds_no_other_path(raw, key, text):
    found = [p for p in problems(raw) if p.startswith(f"{key}: ")]
    assert any(text in p for p in found), found


@pytest.mark.parametrize(
    "raw",
    [
        {"data": {"out_dir": "./data/prepared2"}, "train": {"out_dir": "models/../models"}},
        {"evaluate": {"out_dir": "reports", "plots_dir": "reports"}},
        {"classifier": {"out": "models/classifier.pt"}, "train": {"out_dir": "models"}},
        {"data": {"source": "/data/cifar-10-python.tar.gz", "dataset": "cifar10"}},
        {"sample": {"checkpoint": "/opt/weights/ddpm-cifar10.pt"}},
        {"storage": {"root": "/mnt/shared/ddpm"}},
    ],
)
def test_paths_inside_the_repository_and_absolute_inputs_are_accepted(raw):
    params_from_dict(raw)
