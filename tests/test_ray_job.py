"""`ray job submit` of a stage against a local `ray start --head` writes the declared outputs.

The job's working directory is a temporary copy of the repository made by Ray; the stage must
write through DDPM_REPO_ROOT (passed in the job's runtime env) so that the outputs land where
dvc.yaml declares them, in the real repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def ray_head(log_path: Path, num_cpus: int = 2):
    """A one-node Ray cluster on 127.0.0.1 (dashboard address, env with PATH for its `python`).

    Every port is chosen free so that parallel test runs coexist.
    """
    gcs, dash, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    # Unix socket paths must stay short: a session folder under pytest's tmp_path is too long.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # The job must find its store through DDPM_REPO_ROOT, not a URI another test left behind.
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    with log_path.open("w") as log:
        # Own session: teardown signals exactly this process group, never another Ray here.
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 120
            while not dashboard_up(address):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ray head did not come up:\n{log_path.read_text()}")
                time.sleep(1)
            yield address, {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def head(tmp_path):
    with ray_head(tmp_path / "ray_start.log") as (address, env):
        env.pop("RAY_ADDRESS")  # the job CLI talks to the dashboard; the job gets its own
        yield address, env


def dashboard_up(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_submitted_prepare_job_writes_into_the_repository(head, tmp_path):
    address, env = head
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("ddpm", "pipelines"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    (repo / "params.yaml").write_text(yaml.safe_dump({"data": {"max_images": 100}}))
    runtime_env = {"env_vars": {"DDPM_REPO_ROOT": str(repo), "DDPM_PIPELINE_ID": "job-test"}}
    done = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(repo),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "pipelines.prepare",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout

    # The outputs dvc.yaml declares for prepare, in the repository, not in Ray's copy of it.
    for split in ("train", "test"):
        manifest = json.loads((repo / "data/prepared" / split / "manifest.json").read_text())
        assert manifest["count"] == 100 and manifest["shape"] == [28, 28, 1]
    assert json.loads((repo / "metrics/data.json").read_text())["train_count"] == 100
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    assert run.data.tags["stage"] == "prepare" and run.data.tags["pipeline_id"] == "job-test"
    assert run.data.metrics["train_count"] == 100
