"""Params that could only fail late are refused when params load, naming the key and the fix
(pipelines/params.py); a stage's command line prints such a refusal as one message, not a
traceback; a cluster that spans machines refuses loopback and file addresses; MLflow credentials
are checked before any work, and URIs are printed and logged without them
(pipelines/credentials.py)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ddpm.errors import CheckpointError
from ddpm.validation import ConfigError
from pipelines import cluster, credentials, project, provenance, stage_cli, tracking
from pipelines.params import (
    OUTPUT_KEYS,
    SCORE_SPLITS,
    EvaluateParams,
    FidParams,
    Params,
    TrainParams,
    check_checkpoint,
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


def test_a_misspelt_dataset_and_every_other_problem_come_in_one_error():
    """Each section's own problems and each rule between sections, all in one ValueError in
    the order of the sections, each under its dotted key."""
    raw = {
        "data": {"dataset": "mnist_mlxten"},
        "model": {"overrides": {"width": 3}},
        "tune": {"grace_period": 50},
        "sample": {"precision": "fp16"},
        "ray": {"num_cpus": 1},
    }
    lines = error_of(raw).splitlines()
    assert lines[0] == "invalid params in test.yaml:"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  - data.dataset",
        "  - model.overrides.width",
        "  - tune.grace_period",
        "  - sample.precision",
        "  - train.num_workers",  # params.yaml's 2 CPUs per worker against ray.num_cpus
    ]
    assert lines[3] == "  - tune.grace_period: must be <= tune.steps_per_trial (40), got 50"


def test_a_section_lists_its_own_problems_by_field():
    """A pipeline section builds with any typed values and lists its rules' problems; the
    library config it extends still refuses to be built with one of its own."""
    train = TrainParams(batch_size=30, num_workers=4, max_failures=-1)
    assert train.problems() == [
        ("max_failures", "must be >= 0, got -1"),
        (
            "batch_size",
            "must be divisible by train.num_workers (4) so every worker gets the same share, "
            "got 30",
        ),
    ]
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        TrainParams(lr=-1.0)
    assert EvaluateParams(fid=FidParams(batch_size=0)).problems() == [
        ("fid.batch_size", "must be > 0, got 0")
    ]


def test_a_type_error_does_not_hide_other_sections_errors():
    found = problems({"train": {"steps": "many"}, "evaluate": {"baseline_images": 8}})
    keys = {p.split(":")[0] for p in found}
    assert keys == {"train.steps", "evaluate.baseline_images"}, found


def test_rules_on_a_value_that_did_not_build_are_left_out():
    # batch_size did not build, so its default (128) stands in: a divisibility error about 128
    # would blame a value the user never wrote.
    found = problems({"train": {"batch_size": "x", "num_workers": 3}})
    assert len(found) == 1 and found[0].startswith("train.batch_size: got 'x'"), found


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"seed: 0\n", "not a torch checkpoint file (neither a zip archive nor a pickle)"),
        (
            b"PK\x03\x04" + b"\x00" * 60,
            "truncated or damaged: a zip archive without its central directory",
        ),
        (b"", "an empty file, not a torch checkpoint"),
    ],
    ids=["text", "truncated-zip", "empty"],
)
def test_a_file_that_is_no_checkpoint_is_the_librarys_one_line_error(tmp_path, content, problem):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    params = params_from_dict({"sample": {"checkpoint": "weights.pt"}})
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(params, path, tmp_path / "data", data_required=False)
    assert str(info.value) == f"sample.checkpoint: {path}: {problem}"


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


# ---------------------------------------------------------------------------------------------
# B. A stage's command line prints a params or preflight refusal as one message.


def run_stage(
    stage: str, repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m pipelines.<stage> *args` as DVC runs it, on the repository `repo` (this
    checkout's code), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{stage}", *args],
        cwd=repo,
        env={
            **os.environ,
            project.REPO_ROOT_ENV: str(repo),
            "PYTHONPATH": str(REPO),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_stage_command_line_prints_a_params_error_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  grid_size: 8\n  num_images: 16\nevaluate:\n  baseline_images: 8\n")
    done = run_stage("sample", tmp_path, "--params", str(bad))
    assert done.returncode == stage_cli.BAD_INPUT_EXIT, done.stderr
    assert "Traceback" not in done.stderr and "Error:" not in done.stderr, done.stderr
    assert f"[sample] invalid params in {bad}:" in done.stderr
    assert "sample.grid_size: a 8x8 grid needs sample.num_images >= 64, got 16" in done.stderr
    assert "evaluate.baseline_images:" in done.stderr
    assert "[ray]" not in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_stage_main_refuses_preflight_errors_cleanly_and_keeps_other_tracebacks(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    (tmp_path / "params.yaml").write_text("seed: 1\n")

    def ran(*args, **kwargs):
        raise AssertionError("the stage ran")

    def missing(params):
        raise FileNotFoundError("sample.checkpoint: models/ema.pt is missing; run train first")

    with pytest.raises(SystemExit) as exit_info:
        stage_cli.stage_main("demo", ran, None, argv=[], preflight=missing)
    assert exit_info.value.code == stage_cli.BAD_INPUT_EXIT
    err = capsys.readouterr().err
    assert err == "[demo] sample.checkpoint: models/ema.pt is missing; run train first\n"

    with pytest.raises(SystemExit):
        stage_cli.stage_main("demo", ran, None, argv=["--params", "nowhere.yaml"])
    assert f"params file {tmp_path / 'nowhere.yaml'} does not exist" in capsys.readouterr().err

    def broken(params):
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError, match="a bug"):  # not turned into a one-line exit
        stage_cli.stage_main("demo", ran, None, argv=[], preflight=broken)


# ---------------------------------------------------------------------------------------------
# C. What other hosts cannot reach.

TWO_HOSTS = {"10.0.0.1", "10.0.0.2"}


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "http://127.0.1.1:5000",
        "http://localhost:5000",
        "https://LOCALHOST/",
        "http://[::1]:5000",
        "http://0.0.0.0:5000",
        "http://user:pw@127.0.0.1:5000",
    ],
)
def test_loopback_tracking_uri_is_refused_on_two_hosts(uri):
    found = cluster.reach_problems(TWO_HOSTS, ("MLFLOW_TRACKING_URI", uri))
    assert len(found) == 1 and found[0].startswith("MLFLOW_TRACKING_URI: the Ray cluster spans 2")
    assert "loopback" in found[0] and "pw" not in found[0]


def test_loopback_s3_endpoint_is_refused_on_two_hosts():
    endpoints = [("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")]
    found = cluster.reach_problems(
        TWO_HOSTS, ("mlflow.tracking_uri", "http://10.0.0.1:5000"), endpoints
    )
    assert (
        len(found) == 1 and found[0].startswith("AWS_ENDPOINT_URL: ") and "S3 endpoint" in found[0]
    )


def test_file_store_is_refused_on_two_hosts():
    found = cluster.reach_problems(TWO_HOSTS, ("mlflow.tracking_uri", "sqlite:////repo/mlflow.db"))
    assert len(found) == 1 and "is a file on this one" in found[0]


@pytest.mark.parametrize(
    "hosts, uri, endpoint",
    [
        ({"127.0.0.1"}, "http://127.0.0.1:5000", "http://127.0.0.1:9000"),  # one machine
        ({"10.0.0.1"}, "sqlite:////repo/mlflow.db", "http://localhost:9000"),
        (TWO_HOSTS, "http://10.0.0.1:5000", "http://10.0.0.1:9000"),  # reachable addresses
        (TWO_HOSTS, "https://mlflow.example.org", "https://s3.example.org"),
        (TWO_HOSTS, "http://127-0-0-1.example.org:5000", "http://localhost-s3.example.org"),
    ],
)
def test_reachable_or_single_host_setups_are_accepted(hosts, uri, endpoint):
    assert (
        cluster.reach_problems(
            hosts, ("MLFLOW_TRACKING_URI", uri), [("AWS_ENDPOINT_URL", endpoint)]
        )
        == []
    )


def test_store_endpoint_is_the_one_the_s3_store_uses(monkeypatch, tmp_path):
    monkeypatch.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    local = params_from_dict({"storage": {"root": "/mnt/shared"}})
    s3 = params_from_dict({"storage": {"root": "s3://bucket/ddpm"}})
    assert cluster.store_endpoints(local) == []
    assert cluster.store_endpoints(s3) == [("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://10.0.0.1:9000")
    assert cluster.store_endpoints(s3) == [("AWS_ENDPOINT_URL_S3", "http://10.0.0.1:9000")]


def test_tracking_source_names_the_key_or_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_source(params_from_dict({})) == "MLFLOW_TRACKING_URI"
    given = params_from_dict({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    assert tracking.tracking_source(given) == "mlflow.tracking_uri"


# ---------------------------------------------------------------------------------------------
# D. Credentials: never shown, checked before any work against a real basic-auth server.


@pytest.mark.parametrize(
    "text, shown",
    [
        ("https://alice:S3CRET@host:5000/x", "https://alice:***@host:5000/x"),
        ("http://TOKEN@host", "http://***@host"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:////repo/mlflow.db", "sqlite:////repo/mlflow.db"),
        (
            "failed: HTTPConnectionPool(url='http://a:b@h/api') then s3://k:s@bucket/x",
            "failed: HTTPConnectionPool(url='http://a:***@h/api') then s3://k:***@bucket/x",
        ),
        ("user@example.org is no URI", "user@example.org is no URI"),
    ],
)
def test_redact_uri_hides_credentials(text, shown):
    assert credentials.redact_uri(text) == shown


ADMIN, PASSWORD = "admin", "right-password-7f3a"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 as docker/ runs it, one admin user."""
    from s3_server import mlflow_auth_server

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")
    }
    started = time.monotonic()
    with mlflow_auth_server(
        tmp_path_factory.mktemp("mlflow-auth"), ADMIN, PASSWORD, env=env
    ) as url:
        print(f"basic-auth server up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield url


@pytest.fixture
def no_credentials(monkeypatch):
    for name in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_right_password_passes_the_credentials_check(auth_server, no_credentials):
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking.check_mlflow_credentials(auth_server)


def test_wrong_or_missing_password_fails_in_one_line(auth_server, no_credentials):
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-1")
    with pytest.raises(ValueError) as info:
        tracking.check_mlflow_credentials(auth_server)
    assert str(info.value) == (
        f"MLflow server {auth_server} refused the credentials in MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD (401)"
    )
    no_credentials.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_PASSWORD is not set \(401\)$"):
        tracking.check_mlflow_credentials(auth_server)
    no_credentials.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(ValueError, match=r"needs credentials and got none: set MLFLOW_TRACKING_"):
        tracking.check_mlflow_credentials(auth_server)
    in_uri = auth_server.replace("http://", f"http://{ADMIN}:wrong-password-2@")
    with pytest.raises(ValueError) as info:
        tracking.check_mlflow_credentials(in_uri)
    message = str(info.value)
    assert (
        "user:password in the tracking URI (401)" in message and "wrong-password-2" not in message
    )
    assert f"http://{ADMIN}:***@127.0.0.1" in message
    tracking.check_mlflow_credentials(auth_server.replace("http://", f"http://{ADMIN}:{PASSWORD}@"))


def test_stage_with_a_wrong_password_stops_before_ray(auth_server, tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    wrong = {
        "MLFLOW_TRACKING_URI": auth_server,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": "wrong-password-3",
    }
    done = run_stage("prepare", tmp_path, env=wrong)
    assert done.returncode == stage_cli.BAD_INPUT_EXIT, done.stderr
    assert done.stderr == (
        f"[prepare] MLflow server {auth_server} refused the credentials in "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (401)\n"
    )
    assert "[ray]" not in done.stdout and "wrong-password-3" not in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_mlflow_run_prints_and_logs_the_uri_without_its_password(
    auth_server, no_credentials, tmp_path, capsys
):
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    # mlflow_run sets the process's tracking URI and experiment: put them back afterwards.
    no_credentials.setattr(utils, "_tracking_uri", utils._tracking_uri)
    no_credentials.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    no_credentials.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    no_credentials.setenv(provenance.PIPELINE_ID_ENV, "redaction-test")
    no_credentials.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    # A training worker run earlier in this process set MLflow's request timeout to its own
    # 10 s (pipelines/worker.py); a stage driver has MLflow's 120 s, which a server that a busy
    # CI machine answers slowly needs.
    no_credentials.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with_password = auth_server.replace("http://", f"http://{ADMIN}:{PASSWORD}@")
    params = params_from_dict({"mlflow": {"tracking_uri": with_password, "experiment": "redact"}})
    with tracking.mlflow_run("demo", params, provenance.provenance_tags("demo")) as run:
        pass
    out = capsys.readouterr().out
    # The credentials moved to MLflow's variables: the URI the stage prints carries none.
    assert PASSWORD not in out and f"{ADMIN}:" not in out
    assert f"MLflow run {run.info.run_id} in {auth_server}" in out
    logged = mlflow.MlflowClient(with_password).get_run(run.info.run_id).data.params
    assert logged["mlflow.tracking_uri"] == credentials.redact_uri(with_password)
    assert PASSWORD not in str(logged)


def test_credentials_in_the_tracking_uri_never_reach_ray(monkeypatch):
    """user:password in the tracking URI moves to MLflow's variables in the driver's own
    environment (which a local cluster's workers inherit); the runtime environment Ray shows in
    its dashboard gets the bare URI."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:S3%40CRET@mlflow.example:5000/x")
    env = cluster.worker_env(params_from_dict({}), "p")
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/x"
    assert "S3" not in json.dumps(env) and "alice" not in json.dumps(env)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "S3@CRET"
    # Variables the user set win over the URI's.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mine")
    assert tracking.tracking_uri(params_from_dict({})) == "https://mlflow.example:5000/x"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "mine"
