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
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hosts import Host, namespaces_available, topology
from s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
from test_pipeline_e2e import STAGES, TINY

from pipelines.params import load_params_file

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs/CLUSTER.md"
BUCKET = "your-bucket"  # the guide's name, so its environment file needs no edit
REPO_ON_HEAD = "/home/you/ddpm"  # the guide's repository path on the head
S3_PORT, MLFLOW_PORT, DASHBOARD_PORT = 9000, 5000, 8265
# Several 1-CPU worker hosts; the head schedules nothing. A small object store per node, as
# each host would have on a small machine (Ray otherwise sizes it from the whole box's memory).
HEAD_RESOURCES = '{"CPU": 0, "object_store_memory": 200000000}'
WORKER_RESOURCES = '{"CPU": 1, "object_store_memory": 200000000}'
TRAIN_STEPS = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available())),
]

PARAMS = {
    **TINY,
    "train": {**TINY["train"], "steps": TRAIN_STEPS, "checkpoint_every": 3, "log_every": 1},
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
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def submit(self, entrypoint: str, log: Path, wait: bool = True):
        """`ray job submit` from the client host (the repository named as the guide does)."""
        runtime = json.dumps({"env_vars": {"DDPM_REPO_ROOT": REPO_ON_HEAD}})
        command = (
            f"ray job submit --address http://{self.head.address}:{DASHBOARD_PORT} "
            f"--runtime-env-json {shlex.quote(runtime)} -- {entrypoint}"
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


def wait_for_http(host: Host, url: str, timeout_s: float = 180) -> None:
    """Poll `url` from inside `host` until any HTTP answer (bounded)."""
    code = (
        "import time, urllib.request, urllib.error\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        "while True:\n"
        "    try:\n"
        f"        urllib.request.urlopen({url!r}, timeout=2); break\n"
        "    except urllib.error.HTTPError: break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline: raise SystemExit('no answer')\n"
        "        time.sleep(0.5)\n"
    )
    host.run(f"python -c {shlex.quote(code)}", timeout=timeout_s + 30)


def s3_env(head: Host) -> dict[str, str]:
    url = f"http://{head.address}:{S3_PORT}"
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


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
    head.popen(
        f"mlflow server --host {head.address} --port {MLFLOW_PORT} --workers 1 "
        f"--backend-store-uri sqlite:////home/you/mlflow.db "
        f"--artifacts-destination s3://{BUCKET}/mlflow",
        logs / "mlflow.log",
        env=s3_env(head),
    )
    wait_for_http(head, f"http://{head.address}:{MLFLOW_PORT}/health")


def make_repository(head: Host) -> None:
    """The tiny pipeline as a git + DVC repository on the head's disk."""
    root = head.home / "ddpm"
    root.mkdir()
    for name in ("ddpm", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    full = load_params_file(REPO / "params.yaml").merged(PARAMS).to_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    git = "git -c user.name=t -c user.email=t@t"
    head.run(
        f"cd ddpm && git init -q -b main && dvc init -q && git add -A && "
        f"{git} commit -q -m 'tiny pipeline'"
    )


def wait_for_nodes(cluster_head: Host, count: int, timeout_s: float = 180) -> None:
    code = (
        "import time, ray\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        "from ray.util.state import list_nodes\n"
        "while True:\n"
        f"    alive = [n for n in list_nodes(address='http://{cluster_head.address}:"
        f"{DASHBOARD_PORT}') if n.state == 'ALIVE']\n"
        f"    if len(alive) >= {count}: break\n"
        "    if time.monotonic() > deadline: raise SystemExit(f'{len(alive)} nodes')\n"
        "    time.sleep(1)\n"
    )
    cluster_head.run(
        f"set -a; . ~/ddpm.env; set +a; python -c {shlex.quote(code)}", timeout=timeout_s + 60
    )


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
    wait_for_nodes(cluster.head, 1 + len(cluster.workers))


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
    report = json.loads((cluster.repo / "metrics/evaluate.json").read_text())
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
