"""One local Ray cluster for all the stages of one `dvc repro` (or `dvc exp run`), when no
cluster address is given.

A Ray cluster takes 3-7 s to start and 1.4 s to stop on 2 CPU cores; five stages each starting
their own paid that five times. Instead the first stage that needs Ray starts a holder process,
which starts a local cluster (`pipelines.cluster.start_head`), records its address and waits;
the later stages of the same DVC invocation connect to it as drivers of their own, each with its
own job and runtime environment (`pipelines.cluster.init_ray`).

Its life is the DVC process's: the holder checks every POLL_S whether the `dvc` process it
serves (pid and start time, `pipelines.provenance.dvc_invocation`) still runs, and shuts the
cluster down when it does not, however DVC ended (done, failed, Ctrl-C, killed). Ray ties the
cluster's own processes to the holder (they get SIGKILL when it dies), so killing the holder ends
them too. The record, `<DVC_ROOT>/.dvc/tmp/ray-cluster-<dvc pid>-<dvc start ms>.json`, is named
by that one invocation and written with mode 0600 in the user's repository: another `dvc repro`,
the same user's or another's, finds no record of its own there and starts its own cluster, and
the cluster itself asks every client for this user's Ray token. Outside DVC, or with
$RAY_ADDRESS / ray.address, stages behave as before.

    python -m pipelines.repro_cluster --record PATH --owner PID:START --num-cpus N [--num-gpus G]

is the holder's command line, started by `address_for`; not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm.io_utils import write_json

# DVC sets it for every stage command: the root of the repository (or experiment workspace).
DVC_ROOT_ENV = "DVC_ROOT"
# How often the holder checks that its DVC process still runs.
POLL_S = 0.5
# How long a stage waits for the holder to start the cluster (Ray starts in 3-7 s on 2 idle
# cores; a loaded machine is slower) before it fails naming the holder's log.
HOLDER_START_TIMEOUT_S = 120


def record_path(dvc_root: Path, invocation: tuple[int, float]) -> Path:
    """Where the holder of this DVC invocation records its cluster."""
    pid, started = invocation
    return dvc_root / ".dvc" / "tmp" / f"ray-cluster-{pid}-{round(started * 1000)}.json"


def address_for(
    dvc_root: Path, invocation: tuple[int, float], num_cpus: int, num_gpus: int | None
) -> tuple[str, bool] | None:
    """(address, started now) of this DVC invocation's cluster, starting its holder when there is
    none yet; None when its cluster has other resources than asked (params changed between
    stages), for the stage to start its own."""
    path = record_path(dvc_root, invocation)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        record = live_record(path)
        started = record is None
        if started:
            record = _start_holder(path, invocation, num_cpus, num_gpus)
    if (record["num_cpus"], record["num_gpus"]) != (num_cpus, num_gpus):
        return None
    return record["address"], started


def live_record(path: Path) -> dict[str, Any] | None:
    """The record at `path` if its holder still runs; a stale one is removed."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if process_running(record["holder_pid"], record["holder_started"]):
        return record
    path.unlink(missing_ok=True)
    return None


def process_running(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (not a later process that
    got the same pid)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return (
            abs(process.create_time() - started) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, so two stages never both start a holder. Whoever holds it
    lets go within HOLDER_START_TIMEOUT_S (the longest a start may take): waiting longer fails."""
    with open(path, "a") as handle:
        deadline = time.monotonic() + HOLDER_START_TIMEOUT_S + 10
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    message = f"{path} stayed locked; is a stage of this dvc run stuck?"
                    raise TimeoutError(message) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_holder(
    path: Path, invocation: tuple[int, float], num_cpus: int, num_gpus: int | None
) -> dict[str, Any]:
    pid, started = invocation
    command = [
        sys.executable,
        "-m",
        "pipelines.repro_cluster",
        "--record",
        str(path),
        "--owner",
        f"{pid}:{started!r}",
        "--num-cpus",
        str(num_cpus),
    ]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    log = path.with_suffix(".log")
    # The holder's environment becomes the cluster's, which every later stage's workers inherit
    # under their own job's variables: this stage's DVC variables (DVC_STAGE, ...) stay out.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    with open(log, "w") as output:
        # A session of its own: a Ctrl-C to the terminal's foreground group reaches DVC and
        # the stage, and the holder ends because DVC did, after the stage's own cleanup.
        holder = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + HOLDER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        record = live_record(path)
        if record is not None:
            return record
        if holder.poll() is not None:
            raise RuntimeError(
                f"the local Ray cluster of this dvc invocation did not start (its holder exited "
                f"with {holder.returncode}); see {log}"
            )
        time.sleep(0.1)
    holder.kill()
    raise RuntimeError(
        f"the local Ray cluster of this dvc invocation did not start within "
        f"{HOLDER_START_TIMEOUT_S} s; see {log}"
    )


def hold(path: Path, owner: tuple[int, float], num_cpus: int, num_gpus: int | None) -> None:
    """Start the cluster, record it at `path`, keep it until the owner ends (or the record is
    removed, or this process gets SIGTERM/SIGINT/SIGHUP), then shut it down."""
    import psutil
    import ray

    from pipelines.cluster import start_head

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    address = start_head(num_cpus, num_gpus, runtime_env={}, log_to_driver=False)
    me = psutil.Process()
    try:
        write_json(
            path,
            {
                "address": address,
                "holder_pid": me.pid,
                "holder_started": me.create_time(),
                "owner_pid": owner[0],
                "owner_started": owner[1],
                "num_cpus": num_cpus,
                "num_gpus": num_gpus,
            },
        )
        path.chmod(0o600)
        while not stop.wait(POLL_S):
            if not process_running(*owner) or not path.exists():
                break
    finally:
        path.unlink(missing_ok=True)
        ray.shutdown()
        # The log is kept only when the cluster did not start (above), to say why. The lock
        # guarded starting this invocation's holder, which its stages no longer do: DVC ended.
        path.with_suffix(".log").unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--owner", required=True, help="PID:START of the dvc process")
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--num-gpus", type=int, default=None)
    args = parser.parse_args(argv)
    pid, started = args.owner.split(":", 1)
    hold(args.record, (int(pid), float(started)), args.num_cpus, args.num_gpus)


if __name__ == "__main__":
    main()
