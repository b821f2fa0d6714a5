"""docs/PIPELINE.md's `ray job submit` block, verbatim, writes the declared outputs (token auth on).

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
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stop_process_group(proc: subprocess.Popen) -> None:
    """End a server started with start_new_session=True: its whole group, SIGTERM then SIGKILL,
    each wait bounded."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def documented_block(heading: str) -> str:
    """The first bash block after `heading` in docs/PIPELINE.md, verbatim."""
    text = (REPO / "docs/PIPELINE.md").read_text(encoding="utf-8")
    return text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]


def stop_processes_under(temp_dir: str) -> None:
    """End the Ray processes whose command line names `temp_dir`: only the head this test
    started, never another Ray on the machine."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            mine.append(proc)
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def test_documented_job_submission_runs_verbatim_with_token_auth(tmp_path):
    """docs/PIPELINE.md's `ray job submit` block, as a user would paste it, on a new cluster with
    token authentication on; the prepare stage's outputs land in the repository."""
    block = documented_block("### `ray job submit`")
    assert "ray job submit" in block and "export RAY_AUTH_MODE=token" in block
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("ddpm", "pipelines"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # dvc.yaml templates from it
    params["data"]["max_images"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "DDPM_REPO_ROOT"):
        env.pop(name, None)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True, timeout=120)
    gcs, dashboard, agent = free_ports(3)
    # Unix socket paths must stay short: a session folder under pytest's tmp_path is too long.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    # A home without ~/.ray/auth_token, as on a new machine: the block must create the token.
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        HOME=str(home),
        RAY_PORT=str(gcs),
        RAY_DASHBOARD_PORT=str(dashboard),
        RAY_AGENT_PORT=str(agent),
        RAY_TMPDIR=temp_dir,
    )
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # The failure the docs warn about, on the same head: the job CLI without the token mode.
        refused = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}"]
            + ["--", "true"],
            env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert "shard-00000.parquet" in done.stdout and "manifest.json" in done.stdout  # `ls`
    assert "prepare:" in done.stdout  # `dvc status prepare` reads the job's outputs
    assert len((home / ".ray/auth_token").read_text().strip()) >= 32
    assert refused.returncode != 0
    assert "missing authentication token" in (refused.stdout + refused.stderr).lower()

    # The outputs dvc.yaml declares for prepare, in the repository, not in Ray's copy of it.
    for split in ("train", "test"):
        manifest = json.loads((repo / "data/prepared" / split / "manifest.json").read_text())
        assert manifest["count"] == 100 and manifest["shape"] == [28, 28, 1]
    assert json.loads((repo / "metrics/details/data.json").read_text())["train_count"] == 100
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    assert run.data.tags["stage"] == "prepare" and run.data.tags["pipeline_id"] == "job-1"
    assert run.data.metrics["train_count"] == 100
