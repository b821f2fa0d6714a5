"""The MLflow UI commands of README.md and docs/PIPELINE.md, run as written: each serves the
store a stage logs to, on the address the stage's printed link names, in two processes.

Each runs in a scratch folder (its own mlflow.db, with .venv linked to this checkout's), in a
session of its own that the test ends, pass or fail.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipelines import tracking

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def ui_command(path: Path) -> str:
    """The one `mlflow ui` line of `path`'s bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if "mlflow ui" in line]
    assert len(lines) == 1, lines
    return lines[0]


def logged_run(folder: Path) -> tuple[str, str]:
    """A run in the scratch folder's SQLite store, as a stage would log it: (experiment, run)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("docs")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "final_loss", 0.25)
    return experiment, run.info.run_id


def wait_for(url: str, process: subprocess.Popen) -> bytes:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the UI exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {START_TIMEOUT_S} s")


@pytest.mark.parametrize("doc", ["README.md", "docs/PIPELINE.md"])
def test_the_documented_mlflow_ui_serves_the_runs_in_two_processes(doc, tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5000)) == 0:
            pytest.skip("port 5000, the documented one, is taken on this machine")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    experiment, run_id = logged_run(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PWD": str(tmp_path)}
    ui = subprocess.Popen(
        ["bash", "-c", ui_command(REPO / doc)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        link = tracking.run_url(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment, run_id)
        page, _, route = link.partition("#")
        assert route == f"/experiments/{experiment}/runs/{run_id}"
        assert b"<html" in wait_for(page, ui).lower()
        api = f"{page.rstrip('/')}/api/2.0/mlflow/runs/get?run_id={run_id}"
        assert b'"final_loss"' in wait_for(api, ui)
        processes = [ui.pid, *(p.pid for p in psutil.Process(ui.pid).children(recursive=True))]
        # bash, mlflow's command and its one uvicorn worker; the job runner would add 8 more.
        assert len(processes) <= 3, processes
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)
