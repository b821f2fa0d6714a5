"""The whole DAG on a cluster whose every node is its own host, set up as docs/CLUSTER.md says.

Four hosts (tests/hosts.py: Linux network, mount and UTS namespaces on a private subnet): a
head at .1 with 0 CPUs, the S3 server (moto) and the MLflow server listening on its address
only; two 1-CPU workers at .2 and .3; a client at .4. Each has its own hostname, which its
Debian-style /etc/hosts resolves to 127.0.1.1, its own /tmp, /dev/shm and HOME; none sees this
checkout, and only the head holds the pipeline's repository (/home/you/ddpm, as in the guide).

docs/CLUSTER.md's two-machine blocks run as written, with the test's token, keys and (only if
the machine already uses 10.0.0.0/24) addresses put in: the token, the environment file, the
`ray start` of the head and of the worker (on both workers), and the client's wait for the
head's job agent and `ray job submit` of the whole `dvc repro`.

Checked: every stage ran; train's two DDP workers ran on the two worker hosts and each bound
Gloo to its own eth0; Tune trials and sampling tasks used both workers; the store and the
MLflow artifacts are in S3 and MLflow holds one run per stage. Then the faults of
docs/CLUSTER.md's "When something fails", each on its own copy of the train stage.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hosts import Host, namespaces_available, topology
from s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, endpoint_env
from tiny_dag import tiny_overlay

from ddpm.data import load_manifest
from ddpm.metrics import load_classifier
from ddpm.training import load_ema_model
from pipelines.params import load_params_file
from pipelines.run_info import PHASES

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs/CLUSTER.md"
BUCKET = "your-bucket"  # the guide's name, so its environment file needs no edit
REPO_ON_HEAD = "/home/you/ddpm"  # the guide's repository path on the head
S3_PORT, MLFLOW_PORT, DASHBOARD_PORT = 9000, 5000, 8265
# Several 1-CPU worker hosts; the head schedules nothing. A small object store per node, as
# each host would have on a small machine (Ray otherwise sizes it from the whole box's memory).
HEAD_RESOURCES = '{"CPU": 0, "object_store_memory": 200000000}'
WORKER_RESOURCES = '{"CPU": 1, "object_store_memory": 200000000}'
# Long enough that a fault lands between two checkpoints, with room to spare.
TRAIN_STEPS, CHECKPOINT_EVERY = 40, 10
# The MLflow server's account (its basic-auth app), as docker/'s server takes it.
MLFLOW_USER, MLFLOW_PASSWORD = "ddpm", secrets.token_hex(12)

_CANNOT_BUILD_HOSTS = namespaces_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_CANNOT_BUILD_HOSTS is not None, reason=str(_CANNOT_BUILD_HOSTS)),
]

STAGES = ["prepare", "classifier", "tune", "train", "sample", "evaluate"]
# The tests' tiny pipeline (tests/tiny_params.yaml), with the sizes this test's checks name: 256
# digits per split, Tune's lrs up to 1e-3, 16 samples in two shards (one per worker host).
TINY = tiny_overlay(
    data={"max_images": 256},
    tune={"lr_max": 1.0e-3},
    sample={"num_images": 16, "shard_size": 8},
)
PARAMS = {
    **TINY,
    "train": {
        **TINY["train"],
        "steps": TRAIN_STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "log_every": 5,
    },
    "storage": {"root": f"s3://{BUCKET}/ddpm"},
}


def guide_block(heading: str, index: int = 0) -> str:
    """The index-th bash block under the guide's heading (up to the next heading)."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(heading)
    following = re.search(r"^#{2,3} ", text[start + len(heading) :], flags=re.M)
    section = text[start : start + len(heading) + following.start()] if following else text[start:]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return blocks[index]


def per_host(block: str) -> dict[str, str]:
    """A block whose parts start with a `# <host>...:` comment line, split by host."""
    parts: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        label = re.match(r"# (\w+)[,:]", line)
        if label:
            current = label.group(1)
            parts[current] = []
        elif current is not None:
            parts[current].append(line)
    return {name: "\n".join(lines).strip() for name, lines in parts.items()}


@dataclass
class Cluster:
    hosts: dict[str, Host]
    head: Host
    workers: list[Host]
    client: Host
    token: str
    env_file: str
    logs: Path
    first_run: str  # what the client's `ray job submit` printed

    @property
    def repo(self) -> Path:
        return self.head.home / "ddpm"

    def on_address(self, command: str) -> str:
        """A guide command with the test subnet's addresses in place of 10.0.0.x."""
        prefix = self.head.address.rsplit(".", 1)[0]
        return command.replace("10.0.0.", f"{prefix}.")

    def client_env(self) -> dict[str, str]:
        """What the client sets to reach Ray (the job CLI, the state API) and MLflow."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
        }

    def submit(self, entrypoint: str, log: Path, wait: bool = True, env_vars: dict | None = None):
        """`ray job submit` from the client host (the repository named as the guide does, plus
        `env_vars` for the job)."""
        runtime = json.dumps({"env_vars": {"DDPM_REPO_ROOT": REPO_ON_HEAD, **(env_vars or {})}})
        command = (
            f"ray job submit --address http://{self.head.address}:{DASHBOARD_PORT} "
            f"--runtime-env-json {shlex.quote(runtime)} -- bash -c {shlex.quote(entrypoint)}"
        )
        if wait:
            done = self.client.run(command, env=self.client_env(), check=False)
            log.write_text(done.stdout + done.stderr)
            return done
        return self.client.popen(command, log, env=self.client_env())

    def python_on_client(self, code: str, env: dict[str, str] | None = None) -> object:
        """Run `code` with the client's Python; it prints one JSON value, returned here."""
        done = self.client.run(
            f"python -c {shlex.quote(code)}", env={**self.client_env(), **(env or {})}
        )
        return json.loads(done.stdout.strip().splitlines()[-1])


def poll_on(
    host: Host,
    setup: str,
    condition: str,
    what: str,
    timeout_s: float = 180,
    env: dict[str, str] | None = None,
    interval_s: float = 0.5,
) -> None:
    """Run Python `setup` inside `host`, then evaluate `condition` every `interval_s` until it
    holds; fails naming `what` after `timeout_s`."""
    code = (
        f"import time\n{setup}\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        f"while not ({condition}):\n"
        f"    if time.monotonic() > deadline: raise SystemExit({f'timed out: {what}'!r})\n"
        f"    time.sleep({interval_s})\n"
    )
    host.run(f"python -c {shlex.quote(code)}", env=env, timeout=timeout_s + 60)


def wait_for_http(host: Host, url: str, timeout_s: float = 180) -> None:
    """Poll `url` from inside `host` until any HTTP answer."""
    setup = (
        "import urllib.error, urllib.request\n"
        "def answers():\n"
        "    try:\n"
        f"        urllib.request.urlopen({url!r}, timeout=2)\n"
        "    except urllib.error.HTTPError:\n"
        "        pass\n"
        "    except OSError:\n"
        "        return False\n"
        "    return True"
    )
    poll_on(host, setup, "answers()", f"{url} answering", timeout_s)


def s3_env(head: Host) -> dict[str, str]:
    return endpoint_env(f"http://{head.address}:{S3_PORT}")


def start_services(head: Host, logs: Path) -> None:
    """moto's S3 server and an MLflow server (SQLite runs, artifacts in S3), on the head's
    address only."""
    head.popen(f"python -m moto.server -H {head.address} -p {S3_PORT}", logs / "moto.log")
    wait_for_http(head, f"http://{head.address}:{S3_PORT}/moto-api/")
    create = (
        f"import boto3; boto3.client('s3', endpoint_url='http://{head.address}:{S3_PORT}')"
        f".create_bucket(Bucket='{BUCKET}')"
    )
    head.run(f"python -c {shlex.quote(create)}", env=s3_env(head))
    # docker/'s MLflow image runs this entrypoint: basic auth, its account from the environment.
    shutil.copy(REPO / "docker/mlflow-auth-entrypoint", head.home / "mlflow-auth-entrypoint")
    server = {
        "MLFLOW_HOST": head.address,
        "MLFLOW_PORT": str(MLFLOW_PORT),
        "MLFLOW_BACKEND_STORE_URI": "sqlite:////home/you/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_AUTH_CONFIG_PATH": "/home/you/mlflow-auth/basic_auth.ini",
    }
    head.popen(
        "sh ~/mlflow-auth-entrypoint --workers 1",
        logs / "mlflow.log",
        env={**s3_env(head), **server},
    )
    wait_for_http(head, f"http://{head.address}:{MLFLOW_PORT}/health")


def make_repository(head: Host) -> None:
    """The tiny pipeline as a git + DVC repository on the head's disk: the code, and the
    benchmarks the guide's commands run."""
    root = head.home / "ddpm"
    root.mkdir()
    for name in ("ddpm", "pipelines", "benchmarks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    full = load_params_file(REPO / "params.yaml").merged(PARAMS).to_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    head.run("cd ddpm && git init -q -b main && dvc init -q")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    head.run("cd ddpm && git add -A && git commit -q -m 'tiny pipeline'", env=GIT_IDENTITY)


def wait_for_nodes(cluster: Cluster, count: int, timeout_s: float = 180) -> None:
    head = cluster.head
    setup = (
        "from ray.util.state import list_nodes\n"
        f"url = 'http://{head.address}:{DASHBOARD_PORT}'\n"
        "def alive():\n"
        "    return sum(n.state == 'ALIVE' for n in list_nodes(address=url))"
    )
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}  # the state API asks
    poll_on(head, setup, f"alive() >= {count}", f"{count} Ray nodes", timeout_s, token, 1.0)


def start_ray(cluster: Cluster, worker: Host | None = None) -> None:
    """The guide's `ray start` blocks: the head's (unless `worker` is given), then the worker's
    on every worker host (or on `worker` only), each with its own address."""
    parts = per_host(guide_block("### 5. The Ray head and worker"))
    assert set(parts) == {"gpu1", "gpu2"}, parts
    if worker is None:
        cluster.head.run(
            f"cd {REPO_ON_HEAD} && {cluster.on_address(parts['gpu1'])}",
            env={"RAY_OVERRIDE_RESOURCES": HEAD_RESOURCES},
        )
    for host in cluster.workers:
        if worker is not None and host is not worker:
            continue
        command = cluster.on_address(parts["gpu2"]).replace(
            f"--node-ip-address={cluster.workers[0].address}", f"--node-ip-address={host.address}"
        )
        assert f"--node-ip-address={host.address}" in command
        host.run(command, env={"RAY_OVERRIDE_RESOURCES": WORKER_RESOURCES})
    wait_for_nodes(cluster, 1 + len(cluster.workers))


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def on_head(cluster: Cluster, command: str, folder: str = REPO_ON_HEAD, **kwargs) -> str:
    """`command` on the head, in `folder`, with ~/ddpm.env loaded (the guide's way to run
    `dvc` there); returns its output."""
    done = cluster.head.run(
        f"set -a; . ~/ddpm.env; set +a; cd {folder} && {command}", env=GIT_IDENTITY, **kwargs
    )
    return done.stdout + done.stderr


def doc_commands(section: str) -> list[str]:
    """The command lines of the first bash block under docs/PIPELINE.md's `## <section>`,
    without their comments."""
    text = (REPO / "docs/PIPELINE.md").read_text()
    body = text[text.index(f"## {section}") :]
    block = re.findall(r"```bash\n(.*?)```", body, flags=re.S)[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    disk = tmp_path_factory.mktemp("hosts")
    logs = tmp_path_factory.mktemp("host-logs")
    with topology(["head", "worker1", "worker2", "client"], disk) as hosts:
        head, client = hosts["head"], hosts["client"]
        workers = [hosts["worker1"], hosts["worker2"]]
        start_services(head, logs)
        make_repository(head)

        # The guide's token block on the head; its output is the value for every other host.
        token = head.run(guide_block("### 3. The token")).stdout.strip()
        assert re.fullmatch(r"\S{32,}", token), token
        env_file = guide_block("### 2. One environment file per node")
        env_file = env_file.replace("<the token, step 3>", token)
        env_file = env_file.replace("<key>", ACCESS_KEY_ID).replace("<secret>", SECRET_ACCESS_KEY)
        env_file = env_file.replace("<mlflow user, step 4>", MLFLOW_USER)
        env_file = env_file.replace("<mlflow password, step 4>", MLFLOW_PASSWORD)
        assert "<" not in env_file, env_file
        running = Cluster(hosts, head, workers, client, token, "", logs, "")
        running.env_file = running.on_address(env_file)
        for host in (head, *workers):
            (host.home / "ddpm.env").write_text(running.env_file + "\n")
            (host.home / "ddpm.env").chmod(0o600)
        start_ray(running)

        # The guide's client block: wait for the job agent, then the whole DAG as one job.
        block = running.on_address(guide_block("### 7. Run", index=1))
        block = block.replace("<token>", token)
        started = time.monotonic()
        done = client.run(f"set -e\n{block}", check=False)
        running.first_run = done.stdout + done.stderr
        (logs / "first-run.log").write_text(running.first_run)
        print(f"multi-host dvc repro: {time.monotonic() - started:.0f} s")
        assert done.returncode == 0, running.first_run[-8000:]
        # What DVC projects commit after a run: the lock file and the small metrics and plots.
        on_head(running, "git add -A && git commit -q -m 'first run'")
        yield running


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_hosts_are_separate_and_resolve_their_names_to_loopback(cluster):
    """What makes DDP fail without the interface choice: every hostname is 127.0.1.1."""
    for host in cluster.hosts.values():
        seen = host.run("hostname; getent hosts $(hostname); ls /work 2>/dev/null | wc -l").stdout
        name, resolved, _ = seen.split("\n", 2)
        assert name == host.name and resolved.split()[0] == "127.0.1.1"
    for host in (*cluster.workers, cluster.client):
        assert host.run(f"test -e {REPO_ON_HEAD} || test -e {REPO}/ddpm", check=False).returncode
    assert cluster.head.run(f"test -f {REPO_ON_HEAD}/dvc.yaml").returncode == 0


def test_every_stage_ran_as_one_job_from_the_client(cluster):
    assert ran(cluster.first_run) == STAGES
    assert "succeeded" in cluster.first_run
    report = json.loads((cluster.repo / "metrics/details/evaluate.json").read_text())
    assert report["samples"]["test_nll_bpd"] > 0
    with (cluster.repo / "plots/loss.csv").open() as handle:
        assert sum(1 for _ in handle) == TRAIN_STEPS + 1  # header + one row per step


def test_ddp_workers_ran_on_both_worker_hosts_each_on_its_own_interface(cluster):
    for worker in cluster.workers:
        line = f"[ddp] node {worker.address}: GLOO_SOCKET_IFNAME=eth0, NCCL_SOCKET_IFNAME=eth0"
        assert line in cluster.first_run
    placement = cluster.python_on_client(
        "import json\n"
        "from ray.util.state import list_actors, list_nodes, list_tasks\n"
        f"url = 'http://{cluster.head.address}:{DASHBOARD_PORT}'\n"
        "ip = {n.node_id: n.node_ip for n in list_nodes(address=url)}\n"
        "def where(name, kind=list_actors, key='class_name'):\n"
        "    found = kind(address=url, filters=[(key, '=', name)], detail=True, limit=10000)\n"
        "    return sorted(ip[x.node_id] for x in found)\n"
        "print(json.dumps({'train': where('RayTrainWorker'), 'trials': where('ImplicitFunc'),\n"
        "    'shards': where('generate_shards', list_tasks, 'func_or_class_name')}))\n"
    )
    addresses = sorted(w.address for w in cluster.workers)
    assert placement["train"] == addresses  # one group of two DDP workers, one per host
    assert set(placement["trials"]) == set(addresses)
    assert sorted(set(placement["shards"])) == addresses


def test_store_and_mlflow_are_on_the_head_and_hold_every_stage(cluster):
    s3 = cluster.python_on_client(
        "import boto3, json\n"
        f"c = boto3.client('s3', endpoint_url='http://{cluster.head.address}:{S3_PORT}')\n"
        "keys = [o['Key'] for p in c.get_paginator('list_objects_v2').paginate("
        f"Bucket='{BUCKET}') for o in p.get('Contents', [])]\n"
        "print(json.dumps(keys))\n",
        env=s3_env(cluster.head),
    )
    assert any(k.startswith("ddpm/data/") and k.endswith("/_COMPLETE") for k in s3)
    step = f"step-{TRAIN_STEPS:08d}"
    assert any(re.fullmatch(rf"ddpm/ray/train-\w+/{step}/checkpoint\.pt", k) for k in s3)
    assert any(k.startswith("mlflow/") and k.endswith("/artifacts/model/ema.pt") for k in s3)
    stages = cluster.python_on_client(
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('http://{cluster.head.address}:{MLFLOW_PORT}')\n"
        "runs = mlflow.search_runs(experiment_names=['ddpm'], output_format='list')\n"
        "print(json.dumps(sorted(r.data.tags.get('stage', '') for r in runs\n"
        "    if 'mlflow.parentRunId' not in r.data.tags and r.info.status == 'FINISHED')))\n"
    )
    assert sorted(stages) == sorted(STAGES)


def test_nothing_listens_beyond_the_head_address(cluster):
    listening = cluster.head.run("cat /proc/net/tcp").stdout
    wanted = {S3_PORT, MLFLOW_PORT}
    for line in listening.splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) in wanted:  # LISTEN
            octets = [str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)]
            assert ".".join(octets) == cluster.head.address


def test_outputs_parse(cluster):
    root = cluster.repo
    for split in ("train", "test"):
        assert load_manifest(root / "data/prepared" / split)["count"] == 256
    assert load_classifier(root / "models/classifier.pt").metadata["num_train"] == 256
    best = yaml.safe_load((root / "tune/best.yaml").read_text())
    assert best["diffusion"]["schedule"] in ("linear", "cosine")
    assert 1.0e-4 <= best["train"]["lr"] <= 1.0e-3
    model, diffusion, meta = load_ema_model(root / "models/ema.pt")
    assert meta["step"] == TRAIN_STEPS and diffusion.num_timesteps == 100
    assert meta["config"]["diffusion"]["schedule"] == best["diffusion"]["schedule"]
    assert load_manifest(root / "samples")["count"] == 16
    assert (root / "samples/grid.png").stat().st_size > 0
    with (root / "plots/bpd_per_timestep.csv").open() as handle:
        assert sum(1 for _ in handle) == 100 + 1
    for name in ("classifier", "tune", "train", "evaluate"):
        json.loads((root / "metrics" / f"{name}.json").read_text())
        json.loads((root / "metrics/details" / f"{name}.json").read_text())
    # The prepare stage's counts are its report only.
    assert json.loads((root / "metrics/details/data.json").read_text())["train_count"] == 256
    assert not (root / "metrics/data.json").exists()


def test_documented_repro_block_runs_and_its_plots_render_offline(cluster):
    """docs/PIPELINE.md's first block, verbatim, on the head after the first run: nothing to
    redo, the metrics table, plots as PNG files beside the page (no Vega from a CDN), and the
    first run's time by stage and phase."""
    commands = doc_commands("`dvc repro`: the whole experiment")
    assert commands == [
        "dvc repro",
        "dvc repro",
        "dvc metrics show",
        "dvc plots show",
        "python benchmarks/stage_breakdown.py",
    ]
    status = on_head(cluster, "dvc status --json")
    outputs = [on_head(cluster, command) for command in commands]
    assert [ran(out) for out in outputs[:2]] == [[], []], status
    assert "metrics/evaluate.json" in outputs[2] and "bpd_mc_stderr" in outputs[2]
    assert max(len(line) for line in outputs[2].splitlines()) <= 200, outputs[2]
    page = (cluster.repo / "dvc_plots/index.html").read_text()
    images = re.findall(r'src="(static/[^"]+\.png)"', page)
    assert len(images) == 8 and "https://" not in page
    assert all(
        (cluster.repo / "dvc_plots" / image).read_bytes().startswith(b"\x89PNG") for image in images
    )
    # One row per stage and one for the DAG: the stage processes' phases, compute among them.
    rows = [row.split() for row in outputs[4].splitlines()]
    assert [row[0] for row in rows] == ["stage", *STAGES, "all"], outputs[4]
    compute = 1 + PHASES.index("compute")
    assert all(float(row[compute]) > 0 for row in rows[1:]), outputs[4]


def mlflow_runs(cluster: Cluster) -> list[dict]:
    """Every run of the `ddpm` experiment: its id, tags and status."""
    return cluster.python_on_client(
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('http://{cluster.head.address}:{MLFLOW_PORT}')\n"
        "runs = mlflow.search_runs(experiment_names=['ddpm'], output_format='list')\n"
        "print(json.dumps([{'id': r.info.run_id, 'status': r.info.status, 'tags': r.data.tags}\n"
        "    for r in runs]))\n"
    )


def test_mlflow_has_one_run_per_stage_sharing_the_pipeline_id(cluster):
    commit = on_head(cluster, "git rev-parse HEAD~1").strip()  # HEAD records the first run
    runs = mlflow_runs(cluster)
    top = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    first = {r["tags"]["stage"]: r for r in top if r["tags"].get("stage")}
    assert set(first) == set(STAGES)
    assert all(r["status"] == "FINISHED" for r in first.values())
    ids = {r["tags"]["pipeline_id"] for r in first.values()}
    assert len(ids) == 1 and ids.pop().startswith("dvc-")
    assert all(r["tags"]["git_commit"] == commit for r in first.values())
    assert all(len(r["tags"]["dvc_stage_hash"]) == 32 for r in first.values())
    tune_id = first["tune"]["id"]
    trials = [r for r in runs if r["tags"].get("mlflow.parentRunId") == tune_id]
    assert len(trials) >= 2  # tune.num_samples, nested under the tune run


def s3_digests(cluster: Cluster, prefix: str) -> dict[str, str]:
    """sha256 of every object under `prefix` in the bucket (read from the client host)."""
    return cluster.python_on_client(
        "import boto3, hashlib, json\n"
        f"c = boto3.client('s3', endpoint_url='http://{cluster.head.address}:{S3_PORT}')\n"
        "out = {}\n"
        f"for page in c.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}', "
        f"Prefix='{prefix}'):\n"
        "    for o in page.get('Contents', []):\n"
        f"        body = c.get_object(Bucket='{BUCKET}', Key=o['Key'])['Body'].read()\n"
        "        out[o['Key']] = hashlib.sha256(body).hexdigest()\n"
        "print(json.dumps(out))\n",
        env=s3_env(cluster.head),
    )


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_store_and_mlflow_artifacts_are_in_s3_on_the_head(cluster):
    store = s3_digests(cluster, "ddpm/")
    data = [k for k in store if k.startswith("ddpm/data/") and k.endswith("/_COMPLETE")]
    assert len(data) == 1
    step = f"step-{TRAIN_STEPS:08d}"
    assert any(re.fullmatch(rf"ddpm/ray/train-\w+/{step}/checkpoint\.pt", k) for k in store)
    assert any(k.startswith("ddpm/ray/tune/") for k in store)
    ema = sha256_of(cluster.repo / "models/ema.pt")
    assert [k for k in store if k.startswith("ddpm/blobs/") and store[k] == ema]
    for local in sorted((cluster.repo / "samples").glob("shard-*.parquet")):
        (key,) = [k for k in store if k.startswith("ddpm/samples/") and k.endswith(local.name)]
        assert store[key] == sha256_of(local)
    artifacts = s3_digests(cluster, "mlflow/")
    assert [k for k in artifacts if k.endswith("/artifacts/model/ema.pt") and artifacts[k] == ema]
    assert any(k.endswith("/artifacts/samples/grid.png") for k in artifacts)


def test_outputs_travel_through_a_dvc_remote_on_s3(cluster):
    """The outputs go to a DVC remote in the bucket; a clone pulls them with only what git
    carries (the endpoint in .dvc/config, the keys in the environment) and has nothing to redo;
    then docs/PIPELINE.md's tagged-experiment commands, verbatim."""
    endpoint = f"http://{cluster.head.address}:{S3_PORT}"
    on_head(
        cluster,
        f"dvc remote add --force -d store s3://{BUCKET}/dvc && "
        f"dvc remote modify store endpointurl {endpoint} && git add .dvc/config && "
        "git commit -q -m 'DVC remote on S3' && dvc push",
    )
    home = "/home/you"
    on_head(cluster, "git clone -q ddpm ddpm-clone", folder=home)
    clone = f"{home}/ddpm-clone"
    without_endpoint = "env -u AWS_ENDPOINT_URL"
    on_head(cluster, f"{without_endpoint} dvc pull", folder=clone)
    status = on_head(cluster, f"{without_endpoint} dvc status", folder=clone)
    assert "Data and pipelines are up to date." in status
    for name in ("models/ema.pt", "models/classifier.pt", "samples/grid.png", "dvc.lock"):
        ours = cluster.head.home / "ddpm-clone" / name
        assert ours.read_bytes() == (cluster.repo / name).read_bytes()
    again = on_head(cluster, "dvc repro", folder=clone)
    assert ran(again) == [] and "Data and pipelines are up to date." in again

    first, *later = doc_commands("Reproduce a tagged experiment")
    assert first == "git tag v1.0 && dvc push"
    on_head(cluster, first)
    on_head(cluster, "git clone -q ddpm tagged-clone", folder=home)
    outputs = {
        command: on_head(cluster, command, folder=f"{home}/tagged-clone") for command in later
    }
    assert ran(outputs["dvc repro"]) == []
    assert "Data and pipelines are up to date." in outputs["dvc repro"]
    assert "Change" not in outputs["dvc metrics diff main"]  # DVC prints a table of changes only
    # Every key of every metrics file the same, none within noise or different.
    assert re.search(r"(\d+) keys: \1 same", outputs["python -m pipelines.compare main"])
    for name in ("models/ema.pt", "samples/grid.png", "metrics/details/evaluate.json", "dvc.lock"):
        ours = cluster.head.home / "tagged-clone" / name
        assert ours.read_bytes() == (cluster.repo / name).read_bytes()


def test_second_repro_does_nothing_and_a_train_param_reruns_train_onwards(cluster):
    assert ran(on_head(cluster, "dvc repro")) == []
    params_file = cluster.repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["steps"] = TRAIN_STEPS + 2
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # `dvc status` names only the stage whose own inputs changed; a dry repro forced
        # downstream lists every stage that reads its outputs, without running any.
        assert set(json.loads(on_head(cluster, "dvc status --json"))) == {"train"}
        dry = on_head(cluster, "dvc repro --dry --force-downstream")
        assert ran(dry) == ["train", "sample", "evaluate"]
    finally:
        params_file.write_text(original)


def test_a_fresh_clone_reproduces_every_output_bit_for_bit(cluster):
    """The guide's other way to run: `dvc repro` on the head with ~/ddpm.env loaded, here `-f`
    in a new clone with nothing of the first run (no DVC cache, no pulled outputs, its own
    store prefix): the same dvc.lock, metrics, weights and samples."""
    home = "/home/you"
    on_head(cluster, "git clone -q ddpm fresh-clone", folder=home)
    fresh = cluster.head.home / "fresh-clone"
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    # storage.root is no stage's parameter: where the scratch lives changes no result.
    params["storage"]["root"] = f"s3://{BUCKET}/store-fresh"
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    out = on_head(cluster, "dvc repro -f", folder=f"{home}/fresh-clone")
    print(f"fresh clone dvc repro -f on the head: {time.monotonic() - started:.0f} s")
    assert ran(out) == STAGES
    root = cluster.repo
    compared = ["dvc.lock", "models/ema.pt", "models/classifier.pt", "tune/best.yaml"]
    compared += [str(p.relative_to(root)) for p in sorted((root / "metrics").rglob("*.json"))]
    compared += [str(p.relative_to(root)) for p in sorted((root / "samples").glob("*.parquet"))]
    different = [n for n in compared if (fresh / n).read_bytes() != (root / n).read_bytes()]
    assert not different, f"not reproduced bit for bit: {different}"
    diff = on_head(cluster, "dvc metrics diff HEAD", folder=f"{home}/fresh-clone")
    assert "Change" not in diff, diff

    train_runs = [
        r
        for r in mlflow_runs(cluster)
        if r["tags"].get("stage") == "train" and "mlflow.parentRunId" not in r["tags"]
    ]
    assert len(train_runs) == 2
    assert len({r["tags"]["pipeline_id"] for r in train_runs}) == 2  # one id per repro


def test_a_wrong_mlflow_password_stops_a_stage_before_any_work(cluster):
    log = cluster.logs / "wrong-password.log"
    wrong = {"MLFLOW_TRACKING_PASSWORD": "wrong-password"}
    done = cluster.submit(f"cd {REPO_ON_HEAD} && python -m pipelines.train", log, env_vars=wrong)
    out = log.read_text()
    assert done.returncode != 0
    expected = (
        f"[train] MLflow server http://{cluster.head.address}:{MLFLOW_PORT} refused the "
        "credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (401)"
    )
    assert expected in out, out[-4000:]
    assert "Traceback" not in out and "[ray] connecting" not in out
    assert MLFLOW_PASSWORD not in out


# ---------------------------------------------------------------------------------------------
# Faults, each on its own copy of the train stage: same params as the DAG's train (so the same
# run name and, uninterrupted, the same EMA weights), its own store prefix and output folders.


def fault_stage(cluster: Cluster, name: str, train: dict | None = None) -> str:
    """Write the fault's params file into the head's repository; returns the job entrypoint
    that runs the train stage on it."""
    overlay = {
        "storage": {"root": f"s3://{BUCKET}/fault-{name}"},
        "train": {"out_dir": f"faults/{name}/models", **(train or {})},
        "evaluate": {"out_dir": f"faults/{name}/metrics", "plots_dir": f"faults/{name}/plots"},
    }
    params = load_params_file(cluster.repo / "params.yaml").merged(overlay).to_dict()
    (cluster.repo / f"fault-{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return f"cd {REPO_ON_HEAD} && python -m pipelines.train --params fault-{name}.yaml"


def wait_for_checkpoint(cluster: Cluster, name: str, step: int, timeout_s: float = 600) -> None:
    """Return once the fault run's checkpoint at `step` is whole in S3 (polled from the client;
    Ray uploads a report's checkpoint before training goes on)."""
    setup = (
        "import boto3, re\n"
        f"c = boto3.client('s3', endpoint_url='http://{cluster.head.address}:{S3_PORT}')\n"
        f"pattern = re.compile(r'fault-{name}/ray/train-\\w+/step-{step:08d}/checkpoint\\.pt')\n"
        "def stored():\n"
        f"    pages = c.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}', "
        f"Prefix='fault-{name}/ray/')\n"
        "    return any(pattern.fullmatch(o['Key']) for p in pages for o in p.get('Contents', []))"
    )
    what = f"checkpoint {step} of fault-{name}"
    poll_on(cluster.client, setup, "stored()", what, timeout_s, s3_env(cluster.head), 0.2)


def finish(job, log: Path, timeout_s: float = 900) -> tuple[int, str]:
    job.wait(timeout=timeout_s)
    return job.returncode, log.read_text()


def same_weights_as_the_dag(cluster: Cluster, name: str) -> bool:
    ours = cluster.repo / f"faults/{name}/models/ema.pt"
    return ours.read_bytes() == (cluster.repo / "models/ema.pt").read_bytes()


def test_a_killed_train_worker_restores_from_its_checkpoint_bit_for_bit(cluster):
    """SIGKILL one DDP worker process on worker2 mid-train: Ray Train restarts the group from
    the last checkpoint in S3 within the same stage run, and the EMA weights and the loss of
    every step equal the uninterrupted DAG run's (the suite's one killed-worker test)."""
    log = cluster.logs / "fault-kill.log"
    started = time.monotonic()
    job = cluster.submit(fault_stage(cluster, "kill", {"max_failures": 1}), log, wait=False)
    wait_for_checkpoint(cluster, "kill", CHECKPOINT_EVERY)
    victim = cluster.workers[1]
    (pid,) = [p for p, cmd in victim.processes().items() if "RayTrainWorker" in cmd]
    os.kill(pid, signal.SIGKILL)
    code, out = finish(job, log)
    print(f"killed worker -> stage done in {time.monotonic() - started:.0f} s")
    assert code == 0, out[-6000:]
    resumed = re.findall(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed[-1]) >= CHECKPOINT_EVERY, out[-6000:]
    assert same_weights_as_the_dag(cluster, "kill")
    losses = cluster.repo / "faults/kill/plots/loss.csv"
    assert losses.read_bytes() == (cluster.repo / "plots/loss.csv").read_bytes()


def test_mlflow_unreachable_from_the_workers_loses_no_metric(cluster):
    """Every packet from the worker hosts to MLflow's port dropped for the whole stage: training
    goes on, the workers say once that MLflow is unreachable, and the stage's run still gets
    the loss of every step (the driver, which reaches MLflow, logs the history kept in the
    final checkpoint)."""
    log = cluster.logs / "fault-mlflow.log"
    for worker in cluster.workers:
        worker.drop_outgoing_tcp(MLFLOW_PORT)
    try:
        started = time.monotonic()
        code, out = finish(*[cluster.submit(fault_stage(cluster, "mlflow"), log, False), log])
        print(
            f"MLflow cut off from the workers -> stage done in {time.monotonic() - started:.0f} s"
        )
    finally:
        for worker in cluster.workers:
            worker.allow_all_traffic()
    assert code == 0, out[-6000:]
    assert "MLflow is unreachable" in out
    assert same_weights_as_the_dag(cluster, "mlflow")
    losses = cluster.python_on_client(
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('http://{cluster.head.address}:{MLFLOW_PORT}')\n"
        "runs = mlflow.search_runs(experiment_names=['ddpm'], output_format='list',\n"
        "    filter_string=\"tags.stage = 'train'\")\n"
        "run = max(runs, key=lambda r: r.info.start_time)\n"
        "history = mlflow.MlflowClient().get_metric_history(run.info.run_id, 'loss')\n"
        "print(json.dumps(sorted({m.step for m in history})))\n"
    )
    assert losses == list(range(1, TRAIN_STEPS + 1))


def test_s3_unreachable_for_30_s_mid_train(cluster):
    """The S3 endpoint cut off from every other host for 30 s after the first checkpoint."""
    log = cluster.logs / "fault-s3.log"
    started = time.monotonic()
    job = cluster.submit(fault_stage(cluster, "s3", {"max_failures": 3}), log, wait=False)
    wait_for_checkpoint(cluster, "s3", CHECKPOINT_EVERY)
    cut = [*cluster.workers, cluster.client]
    for host in cut:
        host.drop_outgoing_tcp(S3_PORT)
    try:
        time.sleep(30)
    finally:
        for host in cut:
            host.allow_all_traffic()
    code, out = finish(job, log)
    print(f"S3 away for 30 s -> stage ended ({code}) in {time.monotonic() - started:.0f} s")
    assert code == 0, out[-6000:]
    assert same_weights_as_the_dag(cluster, "s3")


def test_a_worker_host_cut_off_fails_after_a_bounded_wait_and_the_rerun_resumes(cluster):
    """worker2's cable pulled mid-train: the stage fails after a bounded wait, naming what it
    waited for; with the cable back and the guide's worker command rerun, the same stage
    resumes from its checkpoint and ends with the uninterrupted run's weights."""
    log = cluster.logs / "fault-link.log"
    victim = cluster.workers[1]
    settings = {"max_failures": 1, "placement_timeout_s": 10}
    entrypoint = fault_stage(cluster, "link", settings)
    job = cluster.submit(entrypoint, log, wait=False)
    wait_for_checkpoint(cluster, "link", CHECKPOINT_EVERY)
    victim.set_link(False)
    cut = time.monotonic()
    try:
        code, out = finish(job, log, timeout_s=600)
        waited = time.monotonic() - cut
        print(f"worker host cut off -> stage ended ({code}) after {waited:.0f} s")
    finally:
        victim.set_link(True)
    assert code != 0 and not (cluster.repo / "faults/link/models/ema.pt").exists()
    assert "train.placement_timeout_s = 10 s" in out and "train.num_workers = 2" in out, out[-6000:]
    assert waited < 300

    # The head declared the host dead while it was away; its Ray processes end, and the guide's
    # worker command joins it again.
    victim.end_processes()
    start_ray(cluster, worker=victim)
    started = time.monotonic()
    again = cluster.submit(entrypoint, cluster.logs / "fault-link-rerun.log")
    print(f"rerun with the host back: {time.monotonic() - started:.0f} s")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-6000:]
    resumed = re.findall(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed[-1]) >= CHECKPOINT_EVERY
    assert same_weights_as_the_dag(cluster, "link")
