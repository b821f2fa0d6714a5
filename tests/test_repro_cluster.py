"""One local Ray cluster per `dvc repro` (pipelines/repro_cluster.py), with real DVC and Ray:
the stages of one invocation share it, each as a job of its own; it ends when DVC ends, also
when DVC is killed; the next invocation gets a cluster of its own.

The stages are a probe (PROBE) that joins Ray as a stage does (`pipelines.cluster.init_ray`) and
writes what it found, in a scratch DVC project with this repository's params.yaml.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.repro_cluster import process_running

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# How long the holder and its cluster may take to end after DVC did (POLL_S, then Ray's
# shutdown, ~2 s, on a busy machine).
END_TIMEOUT_S = 30

PROBE = """
import json, os, re, sys, time
from pathlib import Path
import psutil, ray
from pipelines import cluster
from pipelines.project import load_params

cluster.init_ray(load_params(None), "probe")
context = ray.get_runtime_context()
where = ray.remote(num_cpus=1)(lambda: (os.getpid(), os.environ.get("RAY_ADDRESS")))
worker_pid, worker_address = ray.get(where.remote())
records = [json.loads(p.read_text()) for p in Path(".dvc/tmp").glob("ray-cluster-*.json")]
# The cluster's processes name its GCS port on their command lines (the GCS server as
# gcs_server_port=, the raylet, dashboard and workers as the GCS address).
port = context.gcs_address.rsplit(":", 1)[1]
lines = {p: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])}
processes = [[p.pid, p.create_time()] for p, line in lines.items()
             if f"gcs_server_port={port}" in line or re.search(rf"\\d:{port}\\b", line)]
gcs_server = [[p.pid, p.create_time()] for p, line in lines.items()
              if f"gcs_server_port={port}" in line]
found = {"gcs": context.gcs_address, "job": context.get_job_id(), "worker_pid": worker_pid,
         "worker_address": worker_address, "records": records, "processes": processes,
         "gcs_server": gcs_server, "auth": os.environ.get("RAY_AUTH_MODE")}
cluster.shutdown_ray()
Path(sys.argv[1]).write_text(json.dumps(found))
if len(sys.argv) > 2:  # the stage that the test kills DVC during
    Path(sys.argv[2]).write_text(str(os.getpid()))
    time.sleep(600)
"""

DVC_YAML = """
stages:
  first:
    cmd: python probe.py first.json
    deps: [probe.py]
    outs: [{first.json: {cache: false}}]
  second:
    cmd: python probe.py second.json
    deps: [probe.py, first.json]
    outs: [{second.json: {cache: false}}]
  hangs:
    cmd: python probe.py hangs.json hangs.pid
    deps: [probe.py]
    outs: [{hangs.json: {cache: false}}]
"""


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    subprocess.run("git init -q && dvc init -q", shell=True, cwd=tmp_path, env=env(), check=True)
    return tmp_path


def env() -> dict[str, str]:
    """This checkout's code and tools, and neither a cluster address nor $RAY_AUTH_MODE: a
    user's shell, where stages start a local cluster and Ray turns its token auth on."""
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", "DDPM_REPO_ROOT", "DDPM_PIPELINE_ID"}
    return {
        **{k: v for k, v in os.environ.items() if k not in drop and not k.startswith("DVC_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }


def still_running(processes: list[list[float]]) -> list[list[float]]:
    """Those of `processes` ([pid, start time] each) still running after END_TIMEOUT_S."""
    deadline = time.monotonic() + END_TIMEOUT_S
    while True:
        alive = [p for p in processes if process_running(int(p[0]), p[1])]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_one_cluster_per_dvc_invocation_ending_with_it(project):
    done = subprocess.run(
        ["dvc", "repro", "second"],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = (json.loads((project / f"{s}.json").read_text()) for s in ("first", "second"))
    # One cluster, one holder, two jobs; workers find the cluster they run in.
    assert first["gcs"] == second["gcs"] and first["job"] != second["job"]
    assert first["records"] == second["records"] and len(first["records"]) == 1
    (record,) = first["records"]
    assert record["address"] == first["worker_address"] == second["worker_address"]
    assert record["address"].rsplit(":", 1)[1] == first["gcs"].rsplit(":", 1)[1]
    assert record["num_cpus"] == (os.cpu_count() or 1)
    assert "started it" in done.stdout and "joining it" in done.stdout
    # The cluster demands the token, and the stage that joined it sent it.
    assert first["auth"] == second["auth"] == "token"
    holder = [record["holder_pid"], record["holder_started"]]
    # The same GCS server, and more of the cluster's processes beside it, seen from the stages.
    assert len(first["gcs_server"]) == 1 and first["gcs_server"] == second["gcs_server"]
    assert len(first["processes"]) >= 3
    # DVC has exited: the holder and the cluster's processes end, and the record is removed.
    assert still_running([holder, *first["processes"], *second["processes"]]) == []
    assert not list((project / ".dvc/tmp").glob("ray-cluster-*"))

    # A DVC killed mid-stage: its cluster ends all the same, and was not the first one.
    dvc = subprocess.Popen(
        ["dvc", "repro", "hangs"],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stage_pid = None
    try:
        deadline = time.monotonic() + 300
        while not (project / "hangs.pid").exists():
            assert dvc.poll() is None and time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.2)
        stage_pid = int((project / "hangs.pid").read_text())
        hangs = json.loads((project / "hangs.json").read_text())
        assert hangs["gcs"] != first["gcs"]
        (record,) = hangs["records"]
        holder = [record["holder_pid"], record["holder_started"]]
        assert len(hangs["gcs_server"]) == 1 and len(hangs["processes"]) >= 3
        assert all(process_running(int(p[0]), p[1]) for p in [holder, *hangs["gcs_server"]])
        dvc.kill()
        dvc.wait(timeout=30)
        assert still_running([holder, *hangs["processes"]]) == []
        assert not list((project / ".dvc/tmp").glob("ray-cluster-*"))
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait(timeout=30)
        if stage_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stage_pid, signal.SIGKILL)
