"""A real S3 endpoint for tests, with no network: moto's standalone server on 127.0.0.1.

Not a test module. Use the context manager::

    with moto_s3(tmp_path) as s3:
        s3.create_bucket("data")
        subprocess.run([...], env={**os.environ, **s3.env})

or, for one server per test module, ``moto_s3_fixture`` wrapped in a module fixture::

    s3 = pytest.fixture(scope="module")(moto_s3_fixture)

``mlflow_server`` runs a real MLflow tracking server (``auth=(user, password)``: behind MLflow's
basic-auth app, started by docker/mlflow-auth-entrypoint as in the stack's container);
``mlflow_auth_server_command`` gives the command line and environment of such a server, for a
test that starts it elsewhere (under ``ip netns exec``, on another address).

``dvc_s3_roundtrip`` pushes a DVC repository's outputs to an S3 remote on such a server and
pulls them into a fresh git clone, as a second machine would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# moto accepts any key pair; fixed dummies keep a real ~/.aws profile out of every test.
ACCESS_KEY_ID = "testing-access-key"
SECRET_ACCESS_KEY = "testing-secret-key"
REGION = "us-east-1"

# moto imports every AWS service backend on start: seconds on an idle machine, far more beside
# a busy test suite on two cores.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

# What docker/Dockerfile.mlflow runs: it writes the basic-auth app's ini from the environment,
# then execs `mlflow server --app-name basic-auth --serve-artifacts "$@"`.
MLFLOW_AUTH_ENTRYPOINT = Path(__file__).resolve().parents[1] / "docker" / "mlflow-auth-entrypoint"


@dataclass(frozen=True)
class S3Endpoint:
    url: str  # http://127.0.0.1:PORT
    log: Path  # the server's stdout and stderr
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str) -> str:
        # us-east-1 is the one region where CreateBucket takes no LocationConstraint.
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under prefix, key -> bytes (a test's view of what really landed)."""
        client = self.client()
        found: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                found[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return found


def endpoint_env(url: str) -> dict[str, str]:
    """What a child process (mlflow server, dvc, a stage) needs to reach the endpoint.

    AWS_ENDPOINT_URL is read by botocore/boto3 and pyarrow's S3 client; MLflow's S3 artifact
    store only honours its own MLFLOW_S3_ENDPOINT_URL. AWS_EC2_METADATA_DISABLED stops botocore
    probing 169.254.169.254 for credentials when a variable is missing.
    """
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is serving
    except OSError:
        return False


def wait_until_answers(
    url: str, process: subprocess.Popen, log: Path, what: str, timeout_s: float
) -> None:
    """Poll url until it answers; fail fast if process dies, and name its log either way."""
    deadline = time.monotonic() + timeout_s
    while not _answers(url):
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{what} exited with {process.returncode} before answering on {url}; "
                f"its log: {log}\n{tail}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} did not answer on {url} within {timeout_s:.0f} s; its log: {log}"
            )
        time.sleep(0.2)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and whatever it forked."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


def _start(command: list[str], log_path: Path, env: dict[str, str] | None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop_process_group reaches all
        )


@contextlib.contextmanager
def moto_s3(tmp_dir: Path, timeout_s: float = START_TIMEOUT_S) -> Iterator[S3Endpoint]:
    """Run moto's S3 server on a free loopback port until the block exits.

    Its state lives in memory only: buckets and objects vanish when it stops.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_dir / f"moto-{port}.log"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = _start(command, log_path, env=None)
    try:
        # /moto-api/ is moto's own dashboard: it answers without S3 credentials or a bucket.
        wait_until_answers(f"{url}/moto-api/", process, log_path, "moto server", timeout_s)
        yield S3Endpoint(url=url, log=log_path, env=endpoint_env(url))
    finally:
        stop_process_group(process)


def moto_s3_fixture(tmp_path_factory) -> Iterator[S3Endpoint]:
    """Generator for ``pytest.fixture(scope="module")``: one server for a module's tests."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


class MlflowServerCommand(NamedTuple):
    argv: list[str]
    env: dict[str, str]  # the whole environment to run argv in
    url: str  # http://HOST:PORT, its tracking URI


def mlflow_auth_server_command(
    folder: Path,
    username: str,
    password: str,
    *,
    host: str = "127.0.0.1",
    port: int,
    artifacts_destination: str | None = None,
    backend_store_uri: str | None = None,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
) -> MlflowServerCommand:
    """How to run an MLflow server with basic auth on host:port, as the stack's container does.

    It runs docker/mlflow-auth-entrypoint, which writes the auth ini (mode 600) at
    folder/mlflow-auth/basic_auth.ini and execs this environment's `mlflow server`. username and
    password become its admin account (created on the first start; 12 characters at least);
    clients send them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    (``mlflow_client_env``). Runs, users and (by default) artifacts stay in folder: SQLite at
    folder/mlflow.db unless backend_store_uri, artifacts in folder/artifacts unless
    artifacts_destination (an s3:// one needs the S3 variables in env). env (default os.environ)
    is the environment the server's variables are added to. Nothing is started: run argv with
    env (`ip netns exec NS` in front, say) and wait for url + "/health", the one route that
    answers without a password.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)  # this environment's `mlflow` first on PATH
    server_env = {
        **base,
        "PATH": os.pathsep.join([bin_dir, base.get("PATH", os.defpath)]),
        "MLFLOW_HOST": host,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination or str(folder / "artifacts"),
        "MLFLOW_AUTH_ADMIN_USERNAME": username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "mlflow-auth" / "basic_auth.ini"),
    }
    # The users share the runs' store, as in docker-compose.yaml; an outer setting must not move
    # them elsewhere.
    server_env.pop("MLFLOW_AUTH_DATABASE_URI", None)
    argv = ["/bin/sh", str(MLFLOW_AUTH_ENTRYPOINT), "--workers", str(workers)]
    return MlflowServerCommand(argv=argv, env=server_env, url=f"http://{host}:{port}")


def mlflow_client_env(url: str, username: str, password: str) -> dict[str, str]:
    """What an MLflow client (a stage, a Ray worker) sets to reach a server with basic auth."""
    return {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
    }


@contextlib.contextmanager
def mlflow_auth_server(
    tmp_dir: Path,
    username: str,
    password: str,
    *,
    host: str = "127.0.0.1",
    artifacts_destination: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
) -> Iterator[str]:
    """Run ``mlflow_auth_server_command``'s server on a free port until the block exits; yields
    its tracking URI. Its log is tmp_dir/mlflow-server-PORT.log."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = mlflow_auth_server_command(
        tmp_dir,
        username,
        password,
        host=host,
        port=port,
        artifacts_destination=artifacts_destination,
        env=env,
    )
    log_path = tmp_dir / f"mlflow-server-{port}.log"
    process = _start(command.argv, log_path, command.env)
    try:
        wait_until_answers(
            f"{command.url}/health", process, log_path, "mlflow server (basic auth)", timeout_s
        )
        yield command.url
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def mlflow_server(
    tmp_dir: Path,
    endpoint: S3Endpoint,
    bucket: str,
    prefix: str = "mlflow",
    timeout_s: float = 180.0,
    *,
    auth: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[str]:
    """An MLflow tracking server (sqlite store in tmp_dir) that keeps artifacts in
    s3://bucket/prefix; yields its tracking URI.

    With --artifacts-destination the server proxies artifacts (mlflow-artifacts:/ URIs), so
    only the server holds the S3 keys and endpoint; clients need nothing but the tracking URI.
    auth=(username, password): behind MLflow's basic-auth app (``mlflow_auth_server``), and
    clients need those too (``mlflow_client_env``). host: the address it listens on.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if auth is not None:
        with mlflow_auth_server(
            tmp_dir,
            *auth,
            host=host,
            artifacts_destination=f"s3://{bucket}/{prefix}",
            env={**os.environ, **endpoint.env},
            timeout_s=timeout_s,
        ) as url:
            yield url
        return
    port = free_port()
    log_path = tmp_dir / f"mlflow-server-{port}.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{bucket}/{prefix}",
    ]  # fmt: skip
    process = _start(command, log_path, env={**os.environ, **endpoint.env})
    try:
        url = f"http://{host}:{port}"
        wait_until_answers(f"{url}/health", process, log_path, "mlflow server", timeout_s)
        yield url
    finally:
        stop_process_group(process)


def _run(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode} in {cwd}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def dvc_command() -> list[str]:
    # The dvc beside this interpreter, not whatever an outer PATH finds first.
    return [sys.executable, "-m", "dvc"]


@dataclass(frozen=True)
class DvcRoundtrip:
    clone: Path
    remote_url: str
    push: subprocess.CompletedProcess
    pull: subprocess.CompletedProcess
    status: subprocess.CompletedProcess  # `dvc status` in the clone after the pull


def dvc_s3_roundtrip(
    repo: Path,
    endpoint: S3Endpoint,
    bucket: str,
    prefix: str = "dvc",
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> DvcRoundtrip:
    """Push repo's DVC-tracked outputs to s3://bucket/prefix and pull them into a git clone.

    repo must be a git repository whose dvc.lock is committed and whose outputs are in its
    cache (after `dvc repro`). The remote's config (endpoint URL, no credentials) is committed
    so the clone finds it; the keys travel only in the environment, as on a real machine. The
    clone's pull and status run without AWS_ENDPOINT_URL, so they prove the committed config
    alone finds the endpoint. The clone is a sibling folder named `<repo>-clone`.
    """
    repo = Path(repo)
    run_env = {**(env if env is not None else os.environ), **endpoint.env}
    remote_url = f"s3://{bucket}/{prefix}"
    dvc = dvc_command()
    _run([*dvc, "remote", "add", "--force", "-d", "store", remote_url], repo, run_env)
    # dvc-s3 also honours AWS_ENDPOINT_URL, but a clone on another machine gets only what git
    # carries: the endpoint goes in the committed config, the keys never do.
    _run([*dvc, "remote", "modify", "store", "endpointurl", endpoint.url], repo, run_env)
    _run(["git", "add", ".dvc/config"], repo, run_env)
    _run(["git", "commit", "-q", "-m", "DVC remote on S3"], repo, run_env)
    push = _run([*dvc, "push"], repo, run_env, timeout_s)

    clone = repo.with_name(repo.name + "-clone")
    _run(["git", "clone", "-q", str(repo), str(clone)], repo.parent, run_env)
    clone_env = {k: v for k, v in run_env.items() if k != "AWS_ENDPOINT_URL"}
    pull = _run([*dvc, "pull"], clone, clone_env, timeout_s)
    status = _run([*dvc, "status"], clone, clone_env, timeout_s)
    return DvcRoundtrip(clone=clone, remote_url=remote_url, push=push, pull=pull, status=status)
