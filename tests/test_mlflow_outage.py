"""An MLflow server that stops mid-run never stops training: metrics are kept and sent later."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.worker import MlflowLogger, MlflowTarget

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(store: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--default-artifact-root", str(store / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.returncode}") from None
            time.sleep(0.5)
    _stop(server)
    raise TimeoutError("mlflow server did not answer /health within 180 s")


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: its workers too
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_logger_keeps_metrics_through_an_outage_and_sends_them_on_recovery(tmp_path, capsys):
    """The run exists in the store, but the server that fronts it is down (as if it had stopped
    mid-stage); the logger keeps what it cannot send and sends it once the server is up."""
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    logger = MlflowLogger(MlflowTarget(uri, run_id))

    started = time.monotonic()
    logger.log([(1, {"loss": 1.0}), (2, {"loss": 0.9})])  # nothing listens on the port
    logger.log([(3, {"loss": 0.8})])  # within the retry pause: kept, not even tried
    assert time.monotonic() - started < 30  # no minutes of retries inside a training step
    assert logger.unsent == 3
    said = capsys.readouterr().out
    assert said.count("MLflow is unreachable") == 1 and "training goes on" in said

    server = _start_server(tmp_path, port)
    try:
        logger.retry_at = 0.0  # the pause has passed
        logger.log([(4, {"loss": 0.7})])
        assert logger.unsent == 0
        assert "MLflow is back" in capsys.readouterr().out
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)
        ]  # fmt: skip
    finally:
        _stop(server)
