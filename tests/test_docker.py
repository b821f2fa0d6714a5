"""docker/ and docs/CLUSTER.md agree with each other and with the pipeline; no Docker needed.

The compose file, the Dockerfiles, the KubeRay manifest and the cluster guide are read as YAML and
text and checked for what breaks a deployment without an error at build time: a CUDA build in the
CPU image, a port open beyond the host, a worker that silently depends on the driver's disk, a
secret with a literal value, a variable the code reads that no container sets, a `ray start` flag
this Ray does not have, two nodes that disagree on the head's port, an MLflow server open to anyone.
The MLflow image's entrypoint runs for real: with a fake `mlflow` (the ini it writes) and with this
environment's MLflow (a client with the right password gets in, a wrong one gets HTTP 401).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from s3_server import MLFLOW_AUTH_ENTRYPOINT, mlflow_auth_server, mlflow_client_env

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yaml"
RAYJOB = DOCKER / "kuberay" / "rayjob.yaml"
CLUSTER_DOC = REPO / "docs" / "CLUSTER.md"
BIN = Path(sys.executable).parent

HEAD, WORKER, GPU_WORKER = "ray-head", "ray-worker", "ray-gpu-worker"
RAY_NODES = (HEAD, WORKER, GPU_WORKER)
RAY_PORT = "6379"
DASHBOARD_PORT = "8265"

# What the pipeline's design has containers provide (on top of what the code scan finds).
RAY_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
S3_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)
DRIVER_VARIABLES = (
    *RAY_VARIABLES,
    *S3_VARIABLES,
    "MLFLOW_TRACKING_URI",
    "DDPM_STORAGE",
    "DDPM_REPO_ROOT",
)
# Every variable a user may have to set somewhere; the cluster guide explains each.
DOCUMENTED_VARIABLES = (*DRIVER_VARIABLES, "DDPM_PIPELINE_ID", "MLFLOW_S3_ENDPOINT_URL")

# Variables the code reads that the head container deliberately leaves unset, and why.
NOT_SET_IN_CONTAINERS = {
    "DDPM_PIPELINE_ID": "optional; a fixed value would give every `dvc repro` on the head one id",
    "DDPM_CACHE": "the node cache defaults to ~/.cache/ddpm/store, in the image user's home",
    "AWS_ENDPOINT_URL_S3": "an alternative to AWS_ENDPOINT_URL, which the containers set",
    "AWS_REGION": "an alternative to AWS_DEFAULT_REGION, which the containers set",
    "RAY_JOB_CONFIG_JSON_ENV_VAR": "Ray's job manager sets it in a submitted job's driver",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "a Ray Train knob the stage sets for itself",
    "DVC_EXP_NAME": "`dvc exp run` sets it for each stage of an experiment",
    "DVC_ROOT": "DVC sets it for each stage command",
    "GLOO_SOCKET_IFNAME": "unset, each DDP worker uses the interface of its Ray node's IP",
    "NCCL_SOCKET_IFNAME": "unset, each DDP worker uses the interface of its Ray node's IP",
    "DDPM_TRACEBACK": "a debugging switch: 1 adds the traceback to a one-line error",
    "MLFLOW_TRACKING_TOKEN": "an alternative to the username and password the containers send",
    # Set by each stage from params' reproducibility section; a value in the container would
    # override params.yaml on every run.
    "ATEN_CPU_CAPABILITY": "each stage sets it from reproducibility.cpu_kernels",
    "ONEDNN_MAX_CPU_ISA": "each stage sets it from reproducibility.cpu_kernels",
    "MKL_ENABLE_INSTRUCTIONS": "each stage sets it from reproducibility.cpu_kernels",
    "OPENBLAS_CORETYPE": "each stage sets it from reproducibility.cpu_kernels",
    "CUBLAS_WORKSPACE_CONFIG": "each stage sets it from reproducibility.gpu_deterministic",
}

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ROOT_USER|ACCESS_KEY")

# The MLflow server's basic auth: what its container needs, what its clients send.
AUTH_ENTRYPOINT = "/opt/mlflow/mlflow-auth-entrypoint"
AUTH_SERVER_VARIABLES = (
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_AUTH_CONFIG_PATH",
)
CLIENT_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# ---------------------------------------------------------------------------------------------
# Readers


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of compose's two forms it uses."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_of(spec: dict[str, Any]) -> str:
    command = spec.get("command") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined and
    comments (including those inside a continued instruction, as Docker drops them) left out."""
    found: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        found.append((keyword.upper(), " ".join(rest.split())))
        current = ""
    return found


def build_args(path: Path) -> dict[str, str]:
    """The defaults of a Dockerfile's ARGs (`ARG NAME=value`)."""
    return dict(
        rest.split("=", 1) for key, rest in instructions(path) if key == "ARG" and "=" in rest
    )


def runs(path: Path) -> list[str]:
    return [rest for key, rest in instructions(path) if key == "RUN"]


def image_name(reference: str) -> str:
    """`registry/path/name:tag` -> `name`."""
    return reference.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def code_blocks(text: str) -> list[str]:
    """Fenced code blocks of a Markdown text, with shell line continuations joined."""
    blocks = re.findall(r"^\s*```[\w-]*\n(.*?)^\s*```", text, flags=re.S | re.M)
    return [re.sub(r"\\\n\s*", " ", block) for block in blocks]


def pyproject_pins() -> dict[str, str]:
    """`name==version` requirements of pyproject.toml (read as text: tomllib is Python 3.11+)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return dict(re.findall(r'^\s*"([A-Za-z][\w.-]*)==([^"]+)"', text, flags=re.M))


@cache
def ray_start_flags() -> frozenset[str]:
    """Every `--flag` that this environment's `ray start --help` lists."""
    done = subprocess.run(
        [str(BIN / "ray"), "start", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


def flags_in(arguments: str) -> list[str]:
    return re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", arguments)


def flag_value(arguments: str, flag: str) -> str | None:
    match = re.search(rf"(?<![\w-]){re.escape(flag)}[= ](\S+)", arguments)
    return match[1].strip("'\"") if match else None


# ---------------------------------------------------------------------------------------------
# Which environment variables the pipeline reads

_READ = re.compile(
    r"os\.(?:environ\.get|getenv)\(\s*([^,)\s]+)"  # os.environ.get(X, ...), os.getenv(X)
    r"|os\.environ\[\s*([^\]\s]+)\s*\](?!\s*=[^=])"  # os.environ[X], but not os.environ[X] = ...
)
_STRING = r"""["']([A-Z][A-Z0-9_]*)["']"""
_STRING_CONSTANT = re.compile(rf"^(\w+)\s*(?::[^=\n]+)?=\s*{_STRING}\s*$", re.M)
_TUPLE_CONSTANT = re.compile(r"^(\w+)\s*(?::[^=\n]+)?=\s*\(([^)]*)\)", re.M)
_UNPACKED = re.compile(r"^\s*(\w+)\s*,[\w\s,]*=\s*(\w+)\s*$", re.M)
_LOOP = re.compile(r"\bfor\s+(\w+)\s+in\s+(\w+)\b")

Constants = tuple[dict[str, str], dict[str, list[str]]]


def constants(source: str) -> Constants:
    """Module-level names bound to a variable name (`NAME_ENV = "X"`) or a tuple holding some."""
    strings = dict(_STRING_CONSTANT.findall(source))
    tuples = {name: re.findall(_STRING, body) for name, body in _TUPLE_CONSTANT.findall(source)}
    return strings, {name: names for name, names in tuples.items() if names}


def env_reads(source: str, known: Constants = ({}, {})) -> tuple[set[str], list[str]]:
    """Names of the variables `source` reads from os.environ, and the expressions it reads through
    that could not be resolved to a name. A name is found as a string literal; a constant of this
    module or of `known` (constants imported from elsewhere); the first item of a constant tuple
    unpacked into a variable (`key, default = _PAIR`); every item of one looped over
    (`for name in NAMES`)."""
    own_strings, own_tuples = constants(source)
    strings, tuples = {**known[0], **own_strings}, {**known[1], **own_tuples}
    aliases: dict[str, list[str]] = {}
    for pattern, take in ((_UNPACKED, slice(0, 1)), (_LOOP, slice(None))):
        for target, origin in pattern.findall(source):
            if tuples.get(origin):
                aliases[target] = tuples[origin][take]
    names: set[str] = set()
    unresolved: list[str] = []
    for match in _READ.finditer(source):
        expression = match[1] or match[2]
        literal = re.fullmatch(_STRING, expression)
        if literal:
            names.add(literal[1])
        elif expression in strings:
            names.add(strings[expression])
        elif expression in aliases:
            names.update(aliases[expression])
        else:
            unresolved.append(expression)
    return names, unresolved


def pipeline_env_reads() -> tuple[set[str], list[str]]:
    files = sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "ddpm").rglob("*.py"))
    sources = {path: path.read_text(encoding="utf-8") for path in files}
    known: Constants = ({}, {})
    for source in sources.values():
        strings, tuples = constants(source)
        known[0].update(strings)
        known[1].update(tuples)
    names: set[str] = set()
    unresolved: list[str] = []
    for path, source in sources.items():
        found, unknown = env_reads(source, known)
        names |= found
        unresolved += [f"{path.relative_to(REPO)}: {expr}" for expr in unknown]
    return names, unresolved


def test_env_scan_resolves_literals_constants_and_unpacked_tuples():
    source = "\n".join(
        [
            "import os",
            "from elsewhere import IMPORTED_ENV",
            'HOME_ENV = "DDPM_X"',
            '_PAIR = ("DDPM_Y", "600")',
            '_MANY = ("DDPM_M1", "DDPM_M2")',
            'a = os.environ.get("DDPM_A")',
            "b = os.getenv('DDPM_B', 'x')",
            'c = os.environ["DDPM_C"]',
            'os.environ["DDPM_WRITTEN"] = "1"',
            "d = os.environ.get(HOME_ENV) or os.environ.get(IMPORTED_ENV)",
            "e = {n: os.environ[n] for n in _MANY if os.environ.get(n)}",
            "def f():",
            "    key, default = _PAIR",
            "    return os.environ.get(key, default), os.environ.get(other)",
        ]
    )
    names, unresolved = env_reads(source, ({"IMPORTED_ENV": "DDPM_I"}, {}))
    assert names == {
        "DDPM_A",
        "DDPM_B",
        "DDPM_C",
        "DDPM_X",
        "DDPM_Y",
        "DDPM_I",
        "DDPM_M1",
        "DDPM_M2",
    }
    assert unresolved == ["other"]
    assert env_reads(source)[1] == ["IMPORTED_ENV", "other"]


def test_head_container_sets_every_variable_the_pipeline_reads():
    names, unresolved = pipeline_env_reads()
    assert not unresolved, (
        "environment reads this test cannot name (use a literal or a module-level constant): "
        f"{unresolved}"
    )
    # The scan works: it finds reads made through a literal and through a constant.
    assert {"MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DDPM_REPO_ROOT", "DDPM_STORAGE"} <= names
    head = env_of(service(HEAD))
    missing = sorted(
        name
        for name in (names | set(DRIVER_VARIABLES))
        if not head.get(name) and name not in NOT_SET_IN_CONTAINERS
    )
    assert not missing, f"read by the pipeline but not set on {HEAD}: {missing}"
    # One id for every repro on the head would merge unrelated runs in MLflow.
    assert "DDPM_PIPELINE_ID" not in head


# ---------------------------------------------------------------------------------------------
# Images


def test_every_build_points_at_an_existing_dockerfile():
    built = {}
    for name, spec in compose()["services"].items():
        build = spec.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (DOCKER / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        built[name] = dockerfile.relative_to(REPO).as_posix()
    assert built[HEAD] == built[WORKER] == "docker/Dockerfile.cpu"
    assert built[GPU_WORKER] == "docker/Dockerfile.gpu"
    assert built["mlflow"] == "docker/Dockerfile.mlflow"
    assert not (DOCKER / "Dockerfile.ray").exists()


def test_cpu_image_installs_the_pinned_cpu_torch_before_the_project():
    dockerfile = DOCKER / "Dockerfile.cpu"
    text = dockerfile.read_text(encoding="utf-8")
    (base,) = [rest for key, rest in instructions(dockerfile) if key == "FROM"]
    assert not re.search(r"cuda|nvidia|gpu", base, re.I), base
    steps = runs(dockerfile)
    (torch_step,) = [i for i, run in enumerate(steps) if "torch==" in run]
    torch_run = steps[torch_step]
    assert "--index-url https://download.pytorch.org/whl/cpu " in torch_run
    pins = pyproject_pins()
    assert pins["torch"] == "2.14.1"
    assert f"torch=={pins['torch']}" in torch_run.split()
    assert f"torchvision=={pins['torchvision']}" in torch_run.split()
    # Installed before the project, so pip finds the pin satisfied and never fetches the CUDA
    # build from PyPI; no other index that could serve a CUDA build anywhere in the file.
    # The project with its `pipeline` extra (Ray, MLflow, DVC): the image runs the DAG.
    project_step = next(
        i for i, run in enumerate(steps) if re.search(r'pip install "\.\[pipeline\]" ', run)
    )
    assert torch_step < project_step
    assert "--extra-index-url" not in text and "/whl/cu" not in text
    assert "NVIDIA_" not in text
    # The build itself refuses a CUDA torch or NVIDIA's libraries.
    assert any("torch.version.cuda is None" in run for run in steps)


def test_gpu_image_installs_the_pinned_cuda_torch():
    dockerfile = DOCKER / "Dockerfile.gpu"
    steps = runs(dockerfile)
    (torch_run,) = [run for run in steps if "torch==" in run]
    pins = pyproject_pins()
    assert f"torch=={pins['torch']}" in torch_run.split()
    assert f"torchvision=={pins['torchvision']}" in torch_run.split()
    index = build_args(dockerfile)["TORCH_INDEX_URL"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run


def test_node_images_share_base_python_and_pins():
    """Ray needs one Python minor version and one Ray across head, workers and drivers."""
    cpu, gpu, server = (DOCKER / f"Dockerfile.{kind}" for kind in ("cpu", "gpu", "mlflow"))
    bases = [[rest for key, rest in instructions(path) if key == "FROM"] for path in (cpu, gpu)]
    assert bases[0] == bases[1] == ["python:3.11-slim-bookworm"]
    ray_version = importlib.metadata.version("ray")
    assert build_args(cpu)["RAY_VERSION"] == build_args(gpu)["RAY_VERSION"] == ray_version
    mlflow_versions = {build_args(path)["MLFLOW_VERSION"] for path in (cpu, gpu, server)}
    assert mlflow_versions == {importlib.metadata.version("mlflow")}


@pytest.mark.parametrize("kind", ["cpu", "gpu", "mlflow"])
def test_images_run_as_a_non_root_user_and_bake_no_secret(kind):
    dockerfile = DOCKER / f"Dockerfile.{kind}"
    steps = instructions(dockerfile)
    keywords = [key for key, _ in steps]
    assert keywords[-1] == "CMD"
    users = [rest for key, rest in steps if key == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    for key, rest in steps:
        if key in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            assert not any(SECRET_NAME.search(n) for n in names), f"{dockerfile.name}: {key} {rest}"
    json.loads(dict(steps)["CMD"])  # exec form: signals reach the server, not a shell


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_node_images_take_the_host_users_ids_and_have_git(kind):
    dockerfile = DOCKER / f"Dockerfile.{kind}"
    args = build_args(dockerfile)
    assert args["USER_UID"] == "1000" and args["USER_GID"] == "1000"
    (create,) = [run for run in runs(dockerfile) if "useradd" in run]
    user = re.search(r"useradd ([^&]*)", create)[1].split()[-1]
    assert '--uid "${USER_UID}"' in create and '--gid "${USER_GID}"' in create
    assert [rest for key, rest in instructions(dockerfile) if key == "USER"] == [user]
    assert any(re.search(r"apt-get install [^&]*\bgit\b", run) for run in runs(dockerfile))
    assert any(re.search(r"apt-get install [^&]*\bwget\b", run) for run in runs(dockerfile))


@pytest.mark.parametrize("kind", ["cpu", "gpu", "mlflow"])
def test_build_context_holds_what_the_image_copies_and_no_outputs(kind):
    dockerfile = DOCKER / f"Dockerfile.{kind}"
    patterns = [
        line.strip()
        for line in (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the ignore file must start by excluding everything"
    included = {p[1:].split("/**")[0] for p in patterns if p.startswith("!")}
    for output in (".venv", "data", "models", "mlruns", "store", ".dvc", "ray_results", ".git"):
        assert not any(path == output or path.startswith(output + "/") for path in included)
    copied = {
        source
        for key, rest in instructions(dockerfile)
        if key == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]
        if not source.startswith("--")
    }
    assert copied and copied <= included, f"COPY of files the build context leaves out: {copied}"


# ---------------------------------------------------------------------------------------------
# The single-host stack


def test_published_ports_bind_loopback_only():
    published = {}
    for name, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
                published[str(port).split(":")[-1]] = name
    assert published == {"5000": "mlflow", DASHBOARD_PORT: HEAD, "9001": "minio"}


def test_secrets_come_from_required_variables():
    text = COMPOSE.read_text(encoding="utf-8")
    references = re.findall(r"\$\{(\w+)([^}]*)\}", text)
    secret_references = [(name, rest) for name, rest in references if SECRET_NAME.search(name)]
    assert {name for name, _ in secret_references} >= {
        "RAY_AUTH_TOKEN",
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    for name, rest in secret_references:
        assert rest.startswith(":?"), f"${{{name}{rest}}}: a secret must be required, no default"
    for name, spec in compose()["services"].items():
        for key, value in env_of(spec).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), f"{name}: {key} is a literal"
    backend = env_of(service("mlflow"))["MLFLOW_BACKEND_STORE_URI"]
    assert ":${POSTGRES_PASSWORD:?" in backend


def test_ray_nodes_share_the_head_address_and_token():
    for name in RAY_NODES:
        env = env_of(service(name))
        assert env["RAY_ADDRESS"] == f"{HEAD}:{RAY_PORT}", name
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        assert all(env.get(var) for var in S3_VARIABLES), f"{name} cannot reach the storage"
    head_command = command_of(service(HEAD))
    assert "--head" in head_command and flag_value(head_command, "--port") == RAY_PORT
    assert flag_value(head_command, "--dashboard-port") == DASHBOARD_PORT
    for name in (WORKER, GPU_WORKER):
        assert flag_value(command_of(service(name)), "--address") == f"{HEAD}:{RAY_PORT}"


def test_only_the_head_mounts_the_repository():
    def binds(spec: dict[str, Any]) -> list[tuple[Path, str]]:
        found = []
        for volume in spec.get("volumes", []):
            if isinstance(volume, dict):
                if volume.get("type") == "bind":
                    found.append(((DOCKER / volume["source"]).resolve(), volume["target"]))
            elif str(volume).startswith((".", "/", "~")):
                source, target = str(volume).split(":")[:2]
                found.append(((DOCKER / source).resolve(), target))
        return found

    head = service(HEAD)
    assert binds(head) == [(REPO, "/workspace")]
    assert head["working_dir"] == env_of(head)["DDPM_REPO_ROOT"] == "/workspace"
    for name in (WORKER, GPU_WORKER):
        assert binds(service(name)) == [], f"{name} must reach data through DDPM_STORAGE only"


def test_driver_reaches_mlflow_and_storage_of_the_stack():
    head, server = env_of(service(HEAD)), env_of(service("mlflow"))
    (mlflow_port,) = [p.split(":")[-1] for p in service("mlflow")["ports"]]
    assert head["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    assert head["DDPM_STORAGE"].startswith("s3://")
    assert head["AWS_ENDPOINT_URL"] == server["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    backend = server["MLFLOW_BACKEND_STORE_URI"]
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image does not have.
    assert backend.startswith("postgresql+psycopg2://")
    assert backend.rsplit("@", 1)[1] == "postgres:5432/mlflow"
    assert server["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow" in server["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    dockerfile = DOCKER / "Dockerfile.mlflow"
    (install,) = [run for run in runs(dockerfile) if "pip install" in run]
    assert "psycopg2-binary" in install and "boto3" in install
    # The auth extra: Flask-WTF, without which the basic-auth app refuses to start.
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in install


# ---------------------------------------------------------------------------------------------
# MLflow's basic auth


def test_mlflow_image_runs_the_auth_entrypoint_on_the_published_port():
    dockerfile = DOCKER / "Dockerfile.mlflow"
    steps = instructions(dockerfile)
    assert json.loads(dict(steps)["CMD"]) == [AUTH_ENTRYPOINT]
    copies = [rest.split() for key, rest in steps if key == "COPY"]
    assert ["--chmod=0755", "docker/mlflow-auth-entrypoint", AUTH_ENTRYPOINT] in copies
    env = " ".join(rest for key, rest in steps if key == "ENV")
    (published,) = service("mlflow")["ports"]
    assert "MLFLOW_HOST=0.0.0.0" in env.split()
    assert f"MLFLOW_PORT={published.rsplit(':', 1)[1]}" in env.split()
    config = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", env)[1]
    assert config.startswith("/home/mlflow/"), "the image user's own, writable home"
    script = MLFLOW_AUTH_ENTRYPOINT.read_text(encoding="utf-8")
    assert script.startswith("#!/bin/sh\n")
    assert 'exec mlflow server --app-name basic-auth --serve-artifacts "$@"' in script
    assert os.access(MLFLOW_AUTH_ENTRYPOINT, os.X_OK)
    # The compose service runs what the image runs.
    spec = service("mlflow")
    assert "command" not in spec and "entrypoint" not in spec
    assert "/health" in " ".join(spec["healthcheck"]["test"])  # the one route open without auth


def test_mlflow_server_and_every_ray_node_share_the_env_files_account():
    server = env_of(service("mlflow"))

    def required(variable: str) -> str:
        return f"${{{variable}:?run docker/new-env.sh first (docs/CLUSTER.md)}}"

    assert server["MLFLOW_AUTH_ADMIN_USERNAME"] == required("MLFLOW_TRACKING_USERNAME")
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] == required("MLFLOW_TRACKING_PASSWORD")
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"] == required("MLFLOW_FLASK_SERVER_SECRET_KEY")
    # Users live in PostgreSQL (its volume), not in a SQLite file the container loses.
    assert server["MLFLOW_AUTH_DATABASE_URI"] == server["MLFLOW_BACKEND_STORE_URI"]
    assert server["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://")
    # The image sets the config path; the entrypoint needs everything else from compose.
    assert set(AUTH_SERVER_VARIABLES) - {"MLFLOW_AUTH_CONFIG_PATH"} <= set(server)
    for name in RAY_NODES:
        env = env_of(service(name))
        for variable in CLIENT_CREDENTIALS:
            assert env.get(variable) == required(variable), f"{name}: {variable}"
    # Only clients get the account; the stores' services never see it.
    for name in ("postgres", "minio", "create-buckets"):
        assert not set(CLIENT_CREDENTIALS) & set(env_of(service(name))), name


def test_no_secret_literal_in_committed_docker_files():
    listed = subprocess.run(
        ["git", "ls-files", "-z", "docker"], cwd=REPO, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / name for name in listed.stdout.split("\0") if name]
    assert DOCKER / "mlflow-auth-entrypoint" in files
    assert DOCKER / ".env" not in files
    # NAME=value (shell, env files, Dockerfiles), NAME: value (YAML), name = value (ini).
    assignment = re.compile(
        r"""(?:^|[\s"'])([A-Za-z_]*(?:PASSWORD|SECRET|TOKEN)[A-Za-z_]*)\s*(?:=|:\s)\s*(.*)""",
        re.I,
    )
    checked = 0
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for name, value in assignment.findall(line):
                checked += 1
                value = value.strip().strip("\"'")
                # A reference (${VAR}, $(command), "$VAR"), a Kubernetes secretKeyRef, or nothing.
                assert not value or value.startswith(("$", "{", "[")), (
                    f"{path.relative_to(REPO)}:{number}: {name} has a literal value: {line}"
                )
    assert checked >= 10  # the pattern reads the files' assignments


def fake_mlflow(tmp_path: Path) -> tuple[Path, Path]:
    """A `mlflow` that records its argv, the mode of the ini it is pointed at and the
    MLFLOW_AUTH_* variables it still sees; returns (its bin folder, where it writes)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    fake = bin_dir / "mlflow"
    fake.write_text(
        "#!/bin/sh\n"
        f'out="{record}"\n'
        'printf "%s\\n" "$@" >"$out.argv"\n'
        'stat -c %a "$MLFLOW_AUTH_CONFIG_PATH" >"$out.mode"\n'
        'env | grep "^MLFLOW_AUTH_ADMIN_" >"$out.env" || true\n'
        'printf "%s" "$MLFLOW_FLASK_SERVER_SECRET_KEY" >"$out.secret"\n'
    )
    fake.chmod(0o755)
    return bin_dir, record


def entrypoint_env(tmp_path: Path, bin_dir: Path, **overrides: str | None) -> dict[str, str]:
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:pg%40pass@postgres:5432/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
        "MLFLOW_AUTH_ADMIN_USERNAME": "ddpm",
        # `%` (ConfigParser interpolation) and a backslash (dash's echo) must come through as is.
        "MLFLOW_AUTH_ADMIN_PASSWORD": "0123abcd%(x)s\\nEND",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-0123456789",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # `sh`, as the image's /bin/sh (Debian's dash) runs it.
    return subprocess.run(
        ["/bin/sh", str(MLFLOW_AUTH_ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_auth_entrypoint_writes_a_private_ini_from_the_environment(tmp_path):
    bin_dir, record = fake_mlflow(tmp_path)
    env = entrypoint_env(tmp_path, bin_dir)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    ini.parent.mkdir()
    ini.write_text("[mlflow]\nadmin_password = stale\n")
    ini.chmod(0o644)  # an earlier ini readable by all is replaced, not written through
    done = run_entrypoint(env, "--workers", "1")
    assert done.returncode == 0, done.stderr
    argv = record.with_suffix(".argv").read_text().splitlines()
    assert argv == ["server", "--app-name", "basic-auth", "--serve-artifacts", "--workers", "1"]
    # The ini was private when mlflow started, and still is.
    assert record.with_suffix(".mode").read_text().strip() == "600"
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    # Read as MLflow reads it (ConfigParser, interpolation on): the environment's values, exactly.
    config = configparser.ConfigParser()
    config.read(ini)
    auth = config["mlflow"]
    assert auth["admin_username"] == env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert auth["admin_password"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert auth["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]  # the default user store
    assert auth["default_permission"] == "READ"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    # The admin's credentials reach the server through the ini only; the CSRF key as is.
    assert record.with_suffix(".env").read_text() == ""
    assert record.with_suffix(".secret").read_text() == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # Nothing printed holds a secret.
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[secret] not in done.stdout + done.stderr
    assert "pg%40pass" not in done.stdout + done.stderr
    assert [p.name for p in ini.parent.iterdir()] == [ini.name]  # no temporary file left

    # Another user store and default permission, when given.
    env["MLFLOW_AUTH_DATABASE_URI"] = "postgresql+psycopg2://mlflow:x@postgres:5432/mlflow_auth"
    env["MLFLOW_AUTH_DEFAULT_PERMISSION"] = "NO_PERMISSIONS"
    assert run_entrypoint(env).returncode == 0
    config = configparser.ConfigParser()
    config.read(ini)
    assert config["mlflow"]["database_uri"] == env["MLFLOW_AUTH_DATABASE_URI"]
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert record.with_suffix(".argv").read_text().splitlines()[-1] == "--serve-artifacts"


@pytest.mark.parametrize(
    "overrides, named",
    [
        *[({name: None}, name) for name in AUTH_SERVER_VARIABLES],
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "0123abcd\ndefault_permission = MANAGE"}, "newline"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "0123456789abc "}, "blank"),
        ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"}, "MLFLOW_AUTH_DEFAULT_PERMISSION"),
    ],
)
def test_auth_entrypoint_refuses_a_missing_or_unsafe_setting(tmp_path, overrides, named):
    bin_dir, record = fake_mlflow(tmp_path)
    env = entrypoint_env(tmp_path, bin_dir, **overrides)
    done = run_entrypoint(env)
    assert done.returncode != 0
    assert named in done.stderr
    assert not record.with_suffix(".argv").exists(), "mlflow ran"
    password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    assert not password or password not in done.stdout + done.stderr


@pytest.mark.slow
def test_auth_server_admits_the_right_password_and_answers_401_to_a_wrong_one(
    tmp_path, monkeypatch
):
    """The entrypoint of the image with this environment's MLflow, as the multi-host test runs it:
    MLFLOW_TRACKING_USERNAME / _PASSWORD let a client in, a wrong password gets HTTP 401."""
    import secrets

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    username, password = "ddpm", secrets.token_hex(16)
    with mlflow_auth_server(tmp_path, username, password) as url:
        for name, value in mlflow_client_env(url, username, password).items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(tracking_uri=url)
        experiment_id = client.create_experiment("auth-right-password")
        assert client.get_experiment(experiment_id).name == "auth-right-password"

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password[::-1])
        with pytest.raises(MlflowException) as wrong:
            client.create_experiment("auth-wrong-password")
        assert wrong.value.get_http_status_code() == 401

        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException) as anonymous:
            client.search_experiments()
        assert anonymous.value.get_http_status_code() == 401

    (ini,) = tmp_path.glob("mlflow-auth/basic_auth.ini")
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    (log,) = tmp_path.glob("mlflow-server-*.log")
    text = log.read_text(errors="replace")
    assert "Created admin user 'ddpm'" in text and " 401 " in text
    assert password not in text


def test_bucket_service_creates_the_buckets_the_stack_uses():
    spec = importlib.util.spec_from_file_location("create_buckets", DOCKER / "create_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = env_of(service("create-buckets"))
    assert env["DDPM_STORAGE"] == env_of(service(HEAD))["DDPM_STORAGE"]
    destination = env_of(service("mlflow"))["MLFLOW_ARTIFACTS_DESTINATION"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == destination
    assert module.buckets(env) == ["ddpm", "mlflow"]
    same_bucket = {"DDPM_STORAGE": "s3://b/ddpm", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/mlflow"}
    assert module.buckets(same_bucket) == ["b"]
    assert module.buckets({"DDPM_STORAGE": "/mnt/nfs/store"}) == []


def test_services_wait_for_what_they_need():
    services = compose()["services"]
    for name, spec in services.items():
        for dependency, condition in (spec.get("depends_on") or {}).items():
            kind = condition["condition"]
            if kind == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"
            elif kind == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency
    needs = {name: set(spec.get("depends_on") or {}) for name, spec in services.items()}
    assert needs[HEAD] == {"mlflow", "create-buckets"}
    assert needs["mlflow"] == {"postgres", "create-buckets"}
    assert needs[WORKER] == needs[GPU_WORKER] == {HEAD}
    assert services[HEAD]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert all("healthcheck" in services[name] for name in RAY_NODES)


def test_gpu_worker_is_optional_and_reserves_nvidia_devices():
    spec = service(GPU_WORKER)
    assert spec["profiles"] == ["gpu"]
    (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert flag_value(command_of(spec), "--num-gpus")
    assert image_name(spec["image"]) == "ddpm-gpu"
    assert all("profiles" not in service(name) for name in (HEAD, WORKER))


def test_new_env_writes_every_required_variable(tmp_path):
    script = tmp_path / "new-env.sh"
    shutil.copy(DOCKER / "new-env.sh", script)
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / ".env"
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text(encoding="utf-8")))
    assert required and all(values.get(name) for name in required), (required, sorted(values))
    assert re.fullmatch(r"[0-9a-f]{64}", values["RAY_AUTH_TOKEN"])
    # MLflow's admin password (12 characters at least) and CSRF key, hex: nothing to escape.
    assert re.fullmatch(r"[0-9a-f]{48}", values["MLFLOW_TRACKING_PASSWORD"])
    assert re.fullmatch(r"[0-9a-f]{64}", values["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    assert values["MLFLOW_TRACKING_USERNAME"]
    assert values["DDPM_UID"] == str(os.getuid())
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    before = env_file.read_text()
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and env_file.read_text() == before
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_new_env_adds_what_an_older_env_file_lacks_and_keeps_the_rest(tmp_path):
    script = tmp_path / "new-env.sh"
    shutil.copy(DOCKER / "new-env.sh", script)
    env_file = tmp_path / ".env"
    # A .env from before MLflow's auth, its last line without a newline.
    old = "RAY_AUTH_TOKEN=aa\nPOSTGRES_PASSWORD=bb\nMINIO_ROOT_USER=ddpm\nMINIO_ROOT_PASSWORD=cc"
    env_file.write_text(old)
    env_file.chmod(0o600)
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = env_file.read_text()
    assert text.startswith(old + "\n")
    values = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert values["RAY_AUTH_TOKEN"] == "aa" and values["MINIO_ROOT_PASSWORD"] == "cc"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DDPM_UID", "DDPM_GID"):
        assert values.get(name), name
        assert name in done.stdout
    assert values["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr
    assert len(re.findall(r"^POSTGRES_PASSWORD=", text, re.M)) == 1


# ---------------------------------------------------------------------------------------------
# `ray start` everywhere: flags this Ray has, one port


def ray_start_commands() -> list[tuple[str, str, bool]]:
    """Every `ray start` command line as (where, command, runs in a container): the compose
    services, the images' CMDs and the code blocks of docs/CLUSTER.md."""
    commands = [
        (f"compose {name}", command_of(spec), True)
        for name, spec in compose()["services"].items()
        if "ray start" in command_of(spec)
    ]
    for kind in ("cpu", "gpu"):
        cmd = json.loads(dict(instructions(DOCKER / f"Dockerfile.{kind}"))["CMD"])
        commands.append((f"Dockerfile.{kind} CMD", " ".join(cmd), True))
    for number, block in enumerate(code_blocks(CLUSTER_DOC.read_text(encoding="utf-8"))):
        for line in block.splitlines():
            # A shell comment may name `ray start` without being one.
            if "ray start" in line and not line.lstrip().startswith("#"):
                command = line[line.index("ray start") :]
                commands.append((f"CLUSTER.md block {number}", command, "docker run" in line))
    return commands


def test_ray_start_commands_use_existing_flags_and_one_port():
    commands = ray_start_commands()
    in_doc = [(where, in_container) for where, _, in_container in commands if "CLUSTER" in where]
    assert len(in_doc) >= 5, "the guide shows head and worker commands, bare and in Docker"
    assert sum(in_container for _, in_container in in_doc) == 2
    known = ray_start_flags()
    assert "--address" in known and "--num-gpus" in known  # the help was read
    for where, command, in_container in commands:
        unknown = [flag for flag in flags_in(command) if flag not in known]
        assert not unknown, f"{where}: `ray start` has no {unknown}: {command}"
        if "--head" in command:
            assert flag_value(command, "--port") == RAY_PORT, f"{where}: {command}"
        else:
            address = flag_value(command, "--address")
            assert address and address.rsplit(":", 1)[1] == RAY_PORT, f"{where}: {command}"
        if in_container:
            # In a container `ray start` must block, or the container exits at once.
            assert "--block" in command, f"{where}: {command}"
        assert flag_value(command, "--dashboard-port") in (None, DASHBOARD_PORT), command
    doc = CLUSTER_DOC.read_text(encoding="utf-8")
    addresses = re.findall(r"RAY_ADDRESS=([^\s`'\",]+)", doc)
    assert addresses and all(value.rsplit(":", 1)[1] == RAY_PORT for value in addresses)
    urls = re.findall(r"ray job submit --address (\S+)", doc)
    assert urls and all(url.rsplit(":", 1)[1] == DASHBOARD_PORT for url in urls)


def test_docker_run_commands_in_the_guide_use_host_networking_and_gpus():
    lines = [
        line[line.index("docker run") :]
        for block in code_blocks(CLUSTER_DOC.read_text(encoding="utf-8"))
        for line in block.splitlines()
        if "docker run" in line and "ray start" in line
    ]
    assert len(lines) == 2
    for command in lines:
        image_part = command.split("ray start")[0]
        assert "--network host" in image_part and "--gpus all" in image_part, command
        assert image_part.split()[-1] == "ddpm-gpu", command


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_kuberay_rayjob_runs_the_pipeline_on_gpu_workers_with_secret_credentials():
    job = yaml.safe_load(RAYJOB.read_text(encoding="utf-8"))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "dvc repro" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    head = cluster["headGroupSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    gpu_image = image_name(service(GPU_WORKER)["image"])

    known = ray_start_flags()
    for group in (head, workers):
        assert all(f"--{key}" in known for key in group.get("rayStartParams") or {})

    (head_container,) = head["template"]["spec"]["containers"]
    (worker_container,) = workers["template"]["spec"]["containers"]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    for container in (head_container, worker_container, submitter):
        assert image_name(container["image"]) == gpu_image
    gpus = worker_container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and workers["replicas"] >= 1

    def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {item["name"]: item for item in container.get("env", [])}

    def from_secret(item: dict[str, Any]) -> bool:
        return "value" not in item and "secretKeyRef" in item.get("valueFrom", {})

    for container in (head_container, worker_container):
        variables = env(container)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert from_secret(variables[name]), f"{container['name']}: {name}"
        assert variables["RAY_AUTH_MODE"]["value"] == "token"
        assert variables["DDPM_STORAGE"]["value"].startswith(("s3://", "gs://", "/"))
        assert from_secret(variables["MLFLOW_TRACKING_URI"])
    assert from_secret(env(submitter)["RAY_AUTH_TOKEN"])
    assert env(submitter)["RAY_AUTH_MODE"]["value"] == "token"
    for container in (head_container, worker_container, submitter):
        for name, item in env(container).items():
            if SECRET_NAME.search(name):
                assert from_secret(item), f"{container['name']}: {name} has a literal value"

    # The repository exists on the head (the driver's place) only.
    mounts = {m["name"]: m["mountPath"] for m in head_container.get("volumeMounts", [])}
    repository = mounts.get("repository")
    assert repository == runtime_env["env_vars"]["DDPM_REPO_ROOT"] == "/workspace"
    assert f"cd {repository}" in spec["entrypoint"]
    (clone,) = head["template"]["spec"]["initContainers"]
    assert "git clone" in " ".join(clone["command"])
    worker_mounts = {m["mountPath"] for m in worker_container.get("volumeMounts", [])}
    assert repository not in worker_mounts


# ---------------------------------------------------------------------------------------------
# The guide


def test_cluster_guide_covers_every_variable_and_names_real_files():
    doc = CLUSTER_DOC.read_text(encoding="utf-8")
    missing = [name for name in DOCUMENTED_VARIABLES if f"`{name}" not in doc]
    assert not missing, f"docs/CLUSTER.md does not explain {missing}"
    for needed in (
        "ray get-auth-token --generate",
        "train.use_gpu",
        "train.num_workers",
        "sample.use_gpu",
        "train.max_failures",
    ):
        assert needed in doc, needed
    submit = [b for b in code_blocks(doc) if "ray job submit" in b and "DDPM_REPO_ROOT" in b]
    assert submit and all("RAY_AUTH_MODE=token" in block for block in submit)
    for path in sorted(set(re.findall(r"\b(docker/[\w./-]*\w)", doc)) - {"docker/.env"}):
        assert (REPO / path).exists(), f"docs/CLUSTER.md names {path}, which does not exist"
