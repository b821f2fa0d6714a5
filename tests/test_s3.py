"""A DVC remote on a real S3 API (moto's server on loopback) found through AWS_ENDPOINT_URL.

The pipeline's store, MLflow's artifacts and a DVC remote on S3 (push, fresh clone, pull, nothing
to reproduce) are checked end to end on the real DAG in tests/test_multi_host.py, where the S3
server runs on a host of its own."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from s3_server import (
    S3Endpoint,
    dvc_command,
    moto_s3_fixture,
)

pytestmark = pytest.mark.slow

s3 = pytest.fixture(scope="module")(moto_s3_fixture)

# 4 KiB with every byte value, so a text-mode or encoding mangling anywhere shows up.
PAYLOAD = bytes(range(256)) * 16


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
