"""MLflow artifacts and a DVC remote on a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from s3_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    S3Endpoint,
    dvc_command,
    dvc_s3_roundtrip,
    mlflow_server,
    moto_s3_fixture,
)

pytestmark = pytest.mark.slow

s3 = pytest.fixture(scope="module")(moto_s3_fixture)

# 4 KiB with every byte value, so a text-mode or encoding mangling anywhere shows up.
PAYLOAD = bytes(range(256)) * 16


@pytest.fixture
def mlflow_on_s3(s3: S3Endpoint, tmp_path):
    """An MLflow tracking server whose artifact store is s3://mlflow-bucket/mlflow."""
    bucket = s3.create_bucket("mlflow-bucket")
    with mlflow_server(tmp_path / "mlflow-server", s3, bucket) as uri:
        yield uri, bucket


def test_mlflow_artifacts_land_in_s3_through_the_tracking_server(
    mlflow_on_s3, s3: S3Endpoint, tmp_path, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    uri, bucket = mlflow_on_s3
    # The client proxies artifacts through the server (mlflow-artifacts:/): it needs no S3
    # keys or endpoint, and must not silently write to S3 itself.
    for name in (*s3.env, "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)

    blob = tmp_path / "blob.bin"
    blob.write_bytes(PAYLOAD)
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    config = {"lr": 0.0002, "steps": 17}

    experiment_id = mlflow.create_experiment("s3-artifacts")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("loss", 0.125, step=3)
        mlflow.log_artifact(str(blob), artifact_path="data")
        mlflow.log_image(image, artifact_file="samples/grid.png")
        mlflow.log_dict(config, "config.json")
    run_id = run.info.run_id

    info = MlflowClient(uri).get_run(run_id).info
    assert info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.125)]

    # What the server really put in the bucket, read with boto3 straight from S3.
    prefix = f"mlflow/{experiment_id}/{run_id}/artifacts/"
    stored = s3.objects(bucket, prefix="mlflow/")
    assert sorted(stored) == sorted(
        prefix + name for name in ("data/blob.bin", "samples/grid.png", "config.json")
    )
    assert stored[prefix + "data/blob.bin"] == PAYLOAD
    assert json.loads(stored[prefix + "config.json"]) == config
    png = tmp_path / "from-bucket.png"
    png.write_bytes(stored[prefix + "samples/grid.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), image)

    # And back through the tracking server, as the evaluation stage reads them.
    back = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="data/blob.bin", dst_path=str(tmp_path / "down")
        )
    )
    assert back.read_bytes() == PAYLOAD
    listed = {f.path: f.file_size for f in MlflowClient(uri).list_artifacts(run_id, "data")}
    assert listed == {"data/blob.bin": len(PAYLOAD)}


# The stage writes PAYLOAD from a script that git tracks, so the DVC stage has a real dependency.
GENERATOR = "import pathlib\npathlib.Path('out.txt').write_bytes(bytes(range(256)) * 16)\n"


def _git_dvc_repo(path: Path, env: dict[str, str]) -> None:
    path.mkdir()

    def run(*command: str) -> None:
        subprocess.run(command, cwd=path, env=env, check=True, capture_output=True, timeout=300)

    run("git", "init", "-q")
    run("git", "config", "user.name", "DDPM test")
    run("git", "config", "user.email", "ddpm-test@example.invalid")
    run(*dvc_command(), "init", "-q")
    (path / "gen.py").write_text(GENERATOR)
    run(*dvc_command(), "stage", "add", "-n", "make", "-d", "gen.py", "-o", "out.txt",
        "python gen.py")  # fmt: skip
    run(*dvc_command(), "repro")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "a one-stage pipeline")


def test_dvc_remote_on_s3_round_trips_outputs_into_a_fresh_clone(s3: S3Endpoint, tmp_path):
    bucket = s3.create_bucket("dvc-bucket")
    # The stage command says `python`: this interpreter's, whatever the outer PATH holds.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    repo = tmp_path / "repo"
    _git_dvc_repo(repo, env)
    assert (repo / "out.txt").read_bytes() == PAYLOAD

    result = dvc_s3_roundtrip(repo, s3, bucket, env=env)

    assert result.remote_url == f"s3://{bucket}/dvc"
    assert "1 file pushed" in result.push.stdout
    # The pushed object is the output's bytes under DVC's content address from dvc.lock.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = lock["stages"]["make"]["outs"][0]["md5"]
    assert md5 == hashlib.md5(PAYLOAD).hexdigest()
    assert s3.objects(bucket, prefix="dvc/") == {f"dvc/files/md5/{md5[:2]}/{md5[2:]}": PAYLOAD}

    # The committed config names the endpoint but never a key: those stay in the environment.
    config = (repo / ".dvc" / "config").read_text()
    assert f"endpointurl = {s3.url}" in config and f"url = s3://{bucket}/dvc" in config
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, "access_key", "secret"):
        assert secret not in config
    assert not (repo / ".dvc" / "config.local").exists()

    clone = result.clone
    assert (clone / "out.txt").read_bytes() == PAYLOAD
    assert "1 file fetched" in result.pull.stdout
    assert result.status.stdout.strip() == "Data and pipelines are up to date."

    run_env = {**env, **s3.env}
    repro = subprocess.run(
        [*dvc_command(), "repro"], cwd=clone, env=run_env, capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    assert "Stage 'make' didn't change, skipping" in repro.stdout
    assert "Data and pipelines are up to date." in repro.stdout
    assert (clone / "out.txt").read_bytes() == PAYLOAD
    in_sync = subprocess.run(
        [*dvc_command(), "status", "--cloud"], cwd=clone, env=run_env, capture_output=True,
        text=True, timeout=300, check=True,
    )  # fmt: skip
    assert in_sync.stdout.strip() == "Cache and remote 'store' are in sync."


def test_dvc_s3_takes_the_endpoint_from_aws_endpoint_url(s3: S3Endpoint, tmp_path):
    """A remote with no endpointurl in its config still reaches the endpoint in the env: a
    cluster can point every tool at its object store with one variable."""
    bucket = s3.create_bucket("dvc-env-bucket")
    env = {**os.environ, **s3.env}
    repo = tmp_path / "repo"
    repo.mkdir()
    data = b"endpoint from the environment\n"

    def dvc(*args: str) -> str:
        done = subprocess.run(
            [*dvc_command(), *args], cwd=repo, env=env, capture_output=True, text=True,
            timeout=300, check=True,
        )  # fmt: skip
        return done.stdout

    dvc("init", "-q", "--no-scm")
    (repo / "data.bin").write_bytes(data)
    dvc("add", "data.bin")
    dvc("remote", "add", "-d", "store", f"s3://{bucket}/dvc")
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
    assert "1 file pushed" in dvc("push")
    md5 = hashlib.md5(data).hexdigest()
    assert s3.objects(bucket) == {f"dvc/files/md5/{md5[:2]}/{md5[2:]}": data}
