"""The Ray cluster a stage runs on: connect to one or start a local one, what its workers get in
their environment, and what it must hold or reach before any work starts."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import urllib.parse
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pipelines.credentials import redact_uri
from pipelines.kernels import GPU_SETUP_HOOK, kernel_env
from pipelines.params import Params
from pipelines.project import ray_job_runtime_env, shared_store
from pipelines.provenance import PIPELINE_ID_ENV, dvc_invocation
from pipelines.repro_cluster import DVC_ROOT_ENV, address_for
from pipelines.store import S3_SETTINGS_ENV
from pipelines.tracking import tracking_source, tracking_uri

# How long Ray Train lets a worker group wait for its resources and start (Ray's default, 60 s,
# is shorter than a fresh worker takes to import torch on a busy CPU box). Set from
# train.placement_timeout_s; Ray Train hands the driver's value on to its controller.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def worker_env(params: Params, pipeline_id: str) -> dict[str, str]:
    """Environment for Ray workers: the MLflow store, the pipeline id, the S3 endpoint and region,
    the CPU kernels.

    Workers get no path of the driver's machine: what they read comes through the store.
    Credentials are not forwarded (the runtime environment is visible in Ray's dashboard):
    every node brings its own, as S3 clients expect.
    """
    return {
        PIPELINE_ID_ENV: pipeline_id,
        "MLFLOW_TRACKING_URI": tracking_uri(params),
        TRAIN_START_TIMEOUT_ENV: str(params.train.placement_timeout_s),
        # Ray Train's print patch sends a worker's print() to its logger and, since Ray has
        # already wrapped the worker's stdout, to stdout as well: every line came out twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **{name: os.environ[name] for name in S3_SETTINGS_ENV if os.environ.get(name)},
        # The driver's kernels in every worker, on every node: a worker that picked its own
        # would train or sample with other bits than the driver's checks assume.
        **kernel_env(params),
    }


def init_ray(params: Params, pipeline_id: str) -> bool:
    """Connect to $RAY_ADDRESS or params.ray.address; else, under `dvc repro` / `dvc exp run`,
    to the local cluster of that DVC invocation (`pipelines.repro_cluster`, started by its first
    stage that needs Ray); else start a local cluster for this process.

    Workers get the repository root, the absolute tracking URI and the pipeline id through the
    runtime environment. Inside a submitted job the job's own env_vars take precedence (Ray
    refuses to merge two values for one variable), so only the missing ones are added.
    False when this process was connected already (by its caller, e.g. a test's cluster).
    """
    import ray

    if ray.is_initialized():
        return False
    job_runtime_env = ray_job_runtime_env()
    job_env = job_runtime_env.get("env_vars") or {}
    env_vars = {k: v for k, v in worker_env(params, pipeline_id).items() if k not in job_env}
    runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars else {}
    if (
        params.reproducibility.gpu_deterministic
        and "worker_process_setup_hook" not in job_runtime_env
    ):
        runtime_env["worker_process_setup_hook"] = GPU_SETUP_HOOK
    address = os.environ.get("RAY_ADDRESS") or params.ray.address
    if address:
        if "py_modules" not in job_runtime_env:
            # Workers on other machines run this driver's code, not whatever version their image
            # holds: the packages travel with the job (Ray caches them by content).
            runtime_env["py_modules"] = [package_dir("ddpm"), package_dir("pipelines")]
            runtime_env["excludes"] = ["__pycache__"]
        print(f"[ray] connecting to {redact_uri(address)}", flush=True)
        ray.init(
            address=address,
            runtime_env=runtime_env or None,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    elif not connect_to_repro_cluster(params, runtime_env):
        num_cpus = local_num_cpus(params)
        print(f"[ray] starting a local cluster with {num_cpus} CPUs", flush=True)
        start_head(num_cpus, params.ray.num_gpus, runtime_env, log_to_driver=True)
    return True


def local_num_cpus(params: Params) -> int:
    return params.ray.num_cpus or os.cpu_count() or 1


def connect_to_repro_cluster(params: Params, runtime_env: dict[str, Any]) -> bool:
    """Join the local cluster of the `dvc repro` / `dvc exp run` this stage runs under, starting
    it when this is the invocation's first stage with Ray work; False outside DVC (or when that
    cluster has other resources than params ask)."""
    import ray

    dvc_root = os.environ.get(DVC_ROOT_ENV)
    invocation = dvc_invocation() if dvc_root else None
    if invocation is None:
        return False
    num_cpus = local_num_cpus(params)
    found = address_for(Path(dvc_root), invocation, num_cpus, params.ray.num_gpus)
    if found is None:
        return False
    address, started = found
    # A cluster that ray.init starts demands this user's token (~/.ray/auth_token, made when
    # missing) unless $RAY_AUTH_MODE says otherwise, but a client sends it only when told to.
    # Ray's `ray start --address` decides with this function: $RAY_AUTH_MODE when set, else
    # token when the token file exists (it does: the holder's cluster made it).
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    quiet_token_notice()
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    how = f"started it with {num_cpus} CPUs" if started else "joining it"
    print(f"[ray] this dvc invocation's local cluster at {address}: {how}", flush=True)
    ray.init(
        address=address,
        runtime_env=local_runtime_env(runtime_env, address),
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    return True


def local_runtime_env(runtime_env: dict[str, Any], address: str) -> dict[str, Any]:
    """`runtime_env` for a job on a cluster of this one machine."""
    env_vars = {
        **runtime_env.get("env_vars", {}),
        # Ray Train's placement-group cleaner (an actor) asks the state API, i.e. the
        # dashboard, whether its controller still lives, and finds the cluster through address
        # "auto", which fails when another Ray instance runs on the same machine. Without it,
        # the worker groups of finished Tune trials keep their CPUs and later trials wait
        # forever. So workers get RAY_ADDRESS pointing at this cluster.
        "RAY_ADDRESS": address,
        # This cluster is this one machine: no node of it is drained while others go on,
        # so Ray Train's preemption watcher (an actor per run, whose start logs a core
        # worker error line) has nothing to watch. Clusters a stage connects to keep it.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    return {**runtime_env, "env_vars": env_vars}


def start_head(
    num_cpus: int, num_gpus: int | None, runtime_env: dict[str, Any], log_to_driver: bool
) -> str:
    """A Ray cluster on this machine, owned by this process (it ends when this process does);
    returns its GCS address. Its jobs' workers get `runtime_env`."""
    import ray

    # The local head runs its dashboard (on 127.0.0.1: the state API the placement-group
    # cleaner asks, `local_runtime_env`) and gets a GCS port chosen here.
    gcs_port, dashboard_port = _free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by Ray when it starts a head
    quiet_token_notice()
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            runtime_env=local_runtime_env(runtime_env, address),
            log_to_driver=log_to_driver,
            # The line above says what starts; Ray's INFO lines repeat it with a dashboard
            # URL nobody opens, and Tune's note each experiment state it writes.
            logging_level=logging.WARNING,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    return address


def quiet_token_notice() -> None:
    """Ray warns at every local start (and join) that it turned token auth on by default; a
    local cluster lives on this machine for one stage or one dvc invocation, and the warning was
    most of each stage's output."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def shutdown_ray() -> None:
    """Disconnect; a local cluster this process started ends with it (Ray would otherwise do it
    at interpreter exit, untimed)."""
    import ray

    ray.shutdown()


def package_dir(name: str) -> str:
    import importlib

    return str(Path(importlib.import_module(name).__file__).parent)


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def gpu_available() -> bool:
    """Whether the connected Ray cluster has at least one GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def require_resources(what: str, cpus: float, gpus: float = 0) -> None:
    """Fail before any work when the connected cluster can never hold `what` (which names the
    params keys that asked), instead of letting Ray wait for resources that never come."""
    import ray

    have = ray.cluster_resources()
    have_cpus, have_gpus = have.get("CPU", 0), have.get("GPU", 0)
    if cpus > have_cpus or gpus > have_gpus:
        raise ValueError(
            f"{what} needs {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray cluster has "
            f"{have_cpus:g} CPU(s) and {have_gpus:g} GPU(s) in all; lower those params or add "
            "nodes (ray.num_cpus / ray.num_gpus size a local cluster)"
        )


def is_loopback_uri(uri: str) -> bool:
    """Whether `uri`'s host is this machine only: localhost, 127.0.0.0/8, ::1 (or 0.0.0.0 / ::,
    which a client reads as its own machine). Names are not resolved: a host name that other
    machines resolve elsewhere is theirs to reach."""
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost") or host == "localhost.localdomain":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


def reach_problems(
    hosts: Collection[str], tracking: tuple[str, str], endpoints: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """What Ray workers on other machines could not reach, one line each; [] on one machine.

    `hosts` are the distinct addresses of the cluster's alive nodes (NodeManagerAddress);
    `tracking` is (where it was set, MLflow tracking URI); `endpoints` are the S3 endpoints the
    store uses, as (variable, URL). A SQLite or file store, or any loopback address, names only
    the driver's machine.
    """
    count = len(set(hosts))
    if count < 2:
        return []
    spans = f"the Ray cluster spans {count} machines"
    problems = []
    name, uri = tracking
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        problems.append(
            f"{name}: {spans} but the MLflow store {redact_uri(uri)} is a file on this one; run "
            "`mlflow server` and set mlflow.tracking_uri or $MLFLOW_TRACKING_URI to its http:// "
            "address"
        )
    elif is_loopback_uri(uri):
        problems.append(
            f"{name}: {spans} but the MLflow server {redact_uri(uri)} is a loopback address, "
            "which each worker reads as its own machine; give an address of the server that "
            "the other machines reach"
        )
    for variable, url in endpoints:
        if is_loopback_uri(url):
            problems.append(
                f"{variable}: {spans} but the S3 endpoint {redact_uri(url)} is a loopback "
                "address, which each worker reads as its own machine; give an address of the "
                "S3 server that the other machines reach"
            )
    return problems


# Where the store's S3 client finds its endpoint, first match wins (pipelines/store.py).
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def store_endpoints(params: Params) -> list[tuple[str, str]]:
    """The S3 endpoint the shared store's client uses (pipelines/store.py: $AWS_ENDPOINT_URL_S3,
    else $AWS_ENDPOINT_URL), as (variable, URL); [] for a store that is not on S3."""
    if not shared_store(params).root.startswith("s3://"):
        return []
    found = [(name, os.environ[name]) for name in S3_ENDPOINT_ENVS if os.environ.get(name)]
    return found[:1]


def check_reach(params: Params) -> None:
    """On a cluster of several machines, refuse what workers on other machines cannot reach.

    A SQLite or file MLflow store lives on the driver's disk, and a loopback MLflow or S3
    address (127.0.0.1, localhost, ::1) is each worker's own machine: any of them fails before
    any work, naming the key or variable (`reach_problems`). A local storage root is accepted as
    a mount every node shares (NFS), with a note saying so.
    """
    import ray

    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    problems = reach_problems(
        hosts, (tracking_source(params), tracking_uri(params)), store_endpoints(params)
    )
    if problems:
        raise ValueError("; ".join(problems))
    shared = shared_store(params)
    if len(hosts) > 1 and shared.is_local:
        print(
            f"[store] {shared.root} is a local folder on a cluster of {len(hosts)} machines: it "
            "must be the same shared mount (NFS) on every node, else use s3:// or gs://",
            flush=True,
        )
