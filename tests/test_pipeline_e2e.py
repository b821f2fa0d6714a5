"""`dvc repro` of the whole DAG on a real multi-node Ray cluster with its store on a real S3 server.

The cluster (`ray.cluster_utils.Cluster`, token auth on): a head with 0 CPUs, where the job
driver runs, and two 1-CPU worker nodes, all started in an empty folder. The store
(storage.root) is a bucket on moto's S3 server, MLflow is a tracking server keeping artifacts in
the same S3, and the first run is submitted with `ray job submit`. Every Ray worker process
records any file it opens under the driver's repository (tests/worker_audit/sitecustomize.py).

Checks: every stage ran and its outputs parse; the two train workers ran on two nodes, Tune
trials and sampling tasks spread over both, and no worker read the repository; the store and
the MLflow artifacts are in S3; MLflow holds a run per stage sharing one pipeline id and the git
commit, with the Tune trials nested under the tune run; the outputs travel through a DVC remote
on S3 into a fresh clone, where `dvc repro` has nothing to do, and docs/PIPELINE.md's tag round
trip runs verbatim; a second `dvc repro` does nothing; changing one train param makes train,
sample and evaluate (only) out of date; `dvc repro -f` in a fresh clone with nothing of the first
run reproduces dvc.lock, metrics, weights and samples bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from s3_server import dvc_s3_roundtrip, mlflow_server, moto_s3
from test_ray_job import BIN, free_ports

from ddpm.data import load_manifest
from ddpm.metrics import load_classifier
from ddpm.training import load_ema_model
from pipelines import common
from pipelines.params import load_params_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "classifier", "tune", "train", "sample", "evaluate"]
BUCKET = "ddpm"
TINY = {
    "seed": 0,
    "data": {"image_size": 16, "max_images": 256},
    "model": {"config": "tiny"},
    "diffusion": {"num_timesteps": 100},
    "classifier": {"epochs": 2, "batch_size": 64},
    "tune": {
        "enabled": True,
        "num_samples": 2,
        "schedules": ["linear", "cosine"],
        "lr_min": 1.0e-4,
        "lr_max": 1.0e-3,
        "steps_per_trial": 4,
        "grace_period": 2,
        "eval_every": 2,
        "eval_images": 16,
        "max_concurrent": 2,
        "workers_per_trial": 1,
    },
    "train": {
        "steps": 6,
        "batch_size": 8,
        "num_workers": 2,
        "cpus_per_worker": 1,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "log_every": 1,
    },
    "sample": {
        "num_images": 16,
        "batch_size": 8,
        "shard_size": 8,
        "num_steps": 5,
        "grid_size": 4,
        "num_workers": 2,
        "trajectory_frames": 3,
    },
    "evaluate": {
        "nll_images": 4,
        "nll_batch_size": 2,
        "mc_images": 16,
        "baseline_images": 16,
        "batch_size": 64,
    },
    "storage": {"root": f"s3://{BUCKET}/store"},
}


def sh(root: Path, env: dict, *cmd: str, timeout: int = 900) -> str:
    done = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def doc_commands(section: str) -> list[str]:
    """The command lines of the first bash block under docs/PIPELINE.md's `## <section>`,
    without their comments."""
    text = (REPO / "docs/PIPELINE.md").read_text()
    body = text[text.index(f"## {section}") :]
    block = body[
        body.index("```bash") + len("```bash") : body.index("```", body.index("```bash") + 7)
    ]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return [line for line in lines if line]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        endpoint.create_bucket(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, s3):
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), s3, BUCKET) as uri:
        yield uri


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, tracking):
    """Head (0 CPUs, dashboard with the job server) + two 1-CPU nodes on 127.0.0.1.

    Its processes inherit this environment when they start: the S3 endpoint and keys (every node
    brings its own credentials), the MLflow URI, token auth, the audit hook; and they start in an
    empty working directory.
    """
    from ray.cluster_utils import Cluster

    # Every node and client reads the token from ~/.ray/auth_token, the file every other test's
    # cluster uses: Ray caches the token a process loaded first, so a token of this module's own
    # (RAY_AUTH_TOKEN) would lock later modules' local clusters out.
    if not (Path.home() / ".ray/auth_token").is_file():
        done = subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    root = tmp_path_factory.mktemp("e2e") / "repo"
    audit = tmp_path_factory.mktemp("audit")
    empty = tmp_path_factory.mktemp("node-cwd")
    # Unix socket paths must stay short: a session folder under pytest's tmp_path is too long.
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    (dash,) = free_ports(1)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3.env.items():
            mp.setenv(name, value)
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("PYTHONPATH", str(REPO / "tests/worker_audit"))
        mp.setenv("DDPM_AUDIT_ROOT", str(root))
        mp.setenv("DDPM_AUDIT_DIR", str(audit))
        mp.setenv("DDPM_CACHE", str(tmp_path_factory.mktemp("node-cache")))
        for name in ("RAY_ADDRESS", "DDPM_PIPELINE_ID", "DDPM_STORAGE", common.REPO_ROOT_ENV):
            mp.delenv(name, raising=False)
        mp.chdir(empty)
        nodes = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dash,
            },
        )
        try:
            workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
            nodes.wait_for_nodes()
            yield Running(
                nodes=nodes,
                root=root,
                address=nodes.address,
                dashboard=f"http://127.0.0.1:{dash}",
                worker_nodes=sorted(n.node_id for n in workers),
                audit=audit,
                empty=empty,
                env=dict(os.environ),
            )
        finally:
            nodes.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Running:
    nodes: Any  # ray.cluster_utils.Cluster
    root: Path
    address: str
    dashboard: str
    worker_nodes: list[str]
    audit: Path
    empty: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def repo(cluster):
    root = cluster.root
    root.mkdir()
    for name in ("ddpm", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    # dvc.yaml takes its paths from params.yaml, so the file spells out every key, as ours does.
    full = load_params_file(REPO / "params.yaml").merged(TINY).to_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    env = {**cluster.env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh(root, env, "git", "init", "-q", "-b", "main")
    sh(root, env, str(BIN / "dvc"), "init", "-q")
    sh(root, env, "git", "add", "-A")
    sh(root, env, "git", "commit", "-q", "-m", "tiny pipeline")
    # The whole DAG as one Ray job; the driver runs on the head, in the repository.
    runtime_env = json.dumps({"env_vars": {common.REPO_ROOT_ENV: str(root)}})
    first = sh(
        root,
        env,
        str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
        "--runtime-env-json", runtime_env,
        "--", "dvc", "--cd", str(root), "repro",
    )  # fmt: skip
    # What DVC projects commit: the lock file and the small metrics and plots.
    sh(root, env, "git", "add", "-A")
    sh(root, env, "git", "commit", "-q", "-m", "first run")
    yield root, {**env, "RAY_ADDRESS": cluster.address}, first


def test_repro_runs_every_stage_and_outputs_parse(repo):
    root, _, first = repo
    assert ran(first) == STAGES
    for split in ("train", "test"):
        assert load_manifest(root / "data/prepared" / split)["count"] == 256
    assert load_classifier(root / "models/classifier.pt").metadata["num_train"] == 256
    best = yaml.safe_load((root / "tune/best.yaml").read_text())
    assert best["diffusion"]["schedule"] in ("linear", "cosine")
    assert 1.0e-4 <= best["train"]["lr"] <= 1.0e-3
    model, diffusion, meta = load_ema_model(root / "models/ema.pt")
    assert meta["step"] == 6 and diffusion.num_timesteps == 100
    assert meta["config"]["diffusion"]["schedule"] == best["diffusion"]["schedule"]
    with (root / "plots/loss.csv").open() as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert load_manifest(root / "samples")["count"] == 16
    assert (root / "samples/grid.png").stat().st_size > 0
    with (root / "plots/bpd_per_timestep.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 100
    for name in ("data", "classifier", "tune", "train", "evaluate"):
        json.loads((root / "metrics" / f"{name}.json").read_text())
    report = json.loads((root / "metrics/evaluate.json").read_text())
    assert report["samples"]["test_nll_bpd"] > 0
    assert torch.isfinite(next(model.parameters())).all()


def test_documented_repro_block_runs_and_its_plots_render_offline(repo):
    """docs/PIPELINE.md's first block, verbatim, after the first run: nothing to redo, the
    metrics table, and plots as PNG files beside the page (no Vega from a CDN)."""
    root, env, _ = repo
    commands = doc_commands("`dvc repro`: the whole experiment")
    assert commands == ["dvc repro", "dvc repro", "dvc metrics show", "dvc plots show"]
    outputs = [sh(root, env, "bash", "-c", command) for command in commands]
    assert all(ran(out) == [] for out in outputs[:2])
    assert "metrics/evaluate.json" in outputs[2] and "samples.test_nll_bpd" in outputs[2]
    page = (root / "dvc_plots/index.html").read_text()
    images = re.findall(r'src="(static/[^"]+\.png)"', page)
    assert len(images) == 8 and "https://" not in page
    assert all((root / "dvc_plots" / image).read_bytes().startswith(b"\x89PNG") for image in images)


def test_mlflow_has_one_run_per_stage_sharing_the_pipeline_id(repo, tracking):
    root, env, _ = repo
    commit = sh(root, env, "git", "rev-parse", "HEAD~1").strip()  # HEAD records the first run
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    first = {r.data.tags["stage"]: r for r in top if r.data.tags["stage"]}
    assert set(first) == set(STAGES)
    ids = {r.data.tags["pipeline_id"] for r in first.values()}
    assert len(ids) == 1 and ids.pop().startswith("dvc-")
    assert all(r.data.tags["git_commit"] == commit for r in first.values())
    assert all(len(r.data.tags["dvc_stage_hash"]) == 32 for r in first.values())
    tune_id = first["tune"].info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_id]
    assert len(trials) >= 2  # tune.num_samples, nested under the tune run


def test_work_spread_over_both_nodes_and_no_worker_read_the_repository(repo, cluster):
    from ray.util.state import list_actors, list_tasks

    actors = list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        limit=10_000,
    )
    groups: dict[str, list[str]] = {}
    for actor in actors:
        groups.setdefault(actor.placement_group_id, []).append(actor.node_id)
    # The train stage's one Ray Train group holds its two DDP workers (train.num_workers).
    assert len(groups) == 1
    assert sorted(next(iter(groups.values()))) == cluster.worker_nodes
    # One-worker Tune trials (tune.workers_per_trial 1) train in Tune's own function actors
    # (reused across a rung's trials), which took both 1-CPU nodes.
    trials = list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "ImplicitFunc")],
        detail=True,
        limit=10_000,
    )
    assert {a.node_id for a in trials} == set(cluster.worker_nodes)
    actors = [*actors, *trials]
    shards = list_tasks(
        address=cluster.dashboard,
        filters=[("func_or_class_name", "=", "generate_shards")],
        detail=True,
        limit=10_000,
    )
    assert sorted(task.node_id for task in shards) == cluster.worker_nodes
    # Nothing ran on the head, which has no CPU.
    assert {a.node_id for a in actors} | {t.node_id for t in shards} <= set(cluster.worker_nodes)

    started = {p.stem: p.read_text() for p in cluster.audit.glob("*.started")}
    assert len(started) >= 6  # the audit hook ran in the workers of every stage
    assert set(started.values()) == {str(cluster.empty)} and not any(cluster.empty.iterdir())
    reads = {p.name: p.read_text() for p in cluster.audit.glob("*.read")}
    assert reads == {}, f"Ray workers read the driver's repository: {reads}"


def test_store_and_mlflow_artifacts_are_in_s3(repo, s3):
    root, _, _ = repo
    store = s3.objects(BUCKET, "store/")
    data = [k for k in store if k.startswith("store/data/") and k.endswith("/_COMPLETE")]
    assert len(data) == 1
    assert any(re.fullmatch(r"store/ray/train-\w+/step-00000006/checkpoint\.pt", k) for k in store)
    assert any(k.startswith("store/ray/tune/") for k in store)
    ema = (root / "models/ema.pt").read_bytes()
    assert [k for k in store if k.startswith("store/blobs/") and store[k] == ema]
    for local in sorted((root / "samples").glob("shard-*.parquet")):
        (key,) = [k for k in store if k.startswith("store/samples/") and k.endswith(local.name)]
        assert store[key] == local.read_bytes()
    artifacts = s3.objects(BUCKET, "mlflow/")
    assert [k for k in artifacts if k.endswith("/artifacts/model/ema.pt") and artifacts[k] == ema]
    assert any(k.endswith("/artifacts/samples/grid.png") for k in artifacts)


def test_outputs_travel_through_a_dvc_remote_on_s3(repo, s3):
    root, env, _ = repo
    result = dvc_s3_roundtrip(root, s3, BUCKET, env=env)
    assert "Data and pipelines are up to date." in result.status.stdout
    for name in ("models/ema.pt", "models/classifier.pt", "samples/grid.png", "dvc.lock"):
        assert (result.clone / name).read_bytes() == (root / name).read_bytes()
    clone_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    again = sh(result.clone, clone_env, str(BIN / "dvc"), "repro")
    assert ran(again) == [] and "Data and pipelines are up to date." in again

    # docs/PIPELINE.md's tagged-experiment commands, verbatim: the first in the repository that
    # ran, the others in a second clone that starts from nothing but git.
    first, *later = doc_commands("Reproduce a tagged experiment")
    assert first == "git tag v1.0 && dvc push"
    sh(root, env, "bash", "-c", first)
    elsewhere = root.with_name("tagged-clone")
    sh(root.parent, env, "git", "clone", "-q", str(root), str(elsewhere))
    outputs = {}
    for command in later:
        outputs[command] = sh(elsewhere, clone_env, "bash", "-c", command)
    assert ran(outputs["dvc repro"]) == []
    assert "Data and pipelines are up to date." in outputs["dvc repro"]
    assert "Change" not in outputs["dvc metrics diff main"]  # DVC prints a table of changes only
    for name in ("models/ema.pt", "samples/grid.png", "metrics/evaluate.json", "dvc.lock"):
        assert (elsewhere / name).read_bytes() == (root / name).read_bytes()


def test_second_repro_does_nothing_and_a_train_param_reruns_train_onwards(repo):
    root, env, _ = repo
    again = sh(root, env, str(BIN / "dvc"), "repro")
    assert ran(again) == []

    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["steps"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # `dvc status` names only the stage whose own inputs changed; a dry repro forced
        # downstream lists every stage that reads its outputs, without running any.
        status = json.loads(sh(root, env, str(BIN / "dvc"), "status", "--json"))
        assert set(status) == {"train"}
        dry = sh(root, env, str(BIN / "dvc"), "repro", "--dry", "--force-downstream")
        assert ran(dry) == ["train", "sample", "evaluate"]
    finally:
        (root / "params.yaml").write_text(original)


def test_a_fresh_clone_reproduces_every_output_bit_for_bit(repo, tracking):
    """`dvc repro -f` in a new clone, with nothing from the first run (no DVC cache, no pulled
    outputs, its own store prefix), gives the same dvc.lock, metrics, weights and samples."""
    root, env, _ = repo
    fresh = root.with_name("fresh-clone")
    sh(root.parent, env, "git", "clone", "-q", str(root), str(fresh))
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    # storage.root is no stage's parameter: where the scratch lives changes no result.
    params["storage"]["root"] = f"s3://{BUCKET}/store-fresh"
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(fresh, env, str(BIN / "dvc"), "repro", "-f")
    assert ran(out) == STAGES
    compared = ["dvc.lock", "models/ema.pt", "models/classifier.pt", "tune/best.yaml"]
    compared += [str(p.relative_to(root)) for p in sorted((root / "metrics").glob("*.json"))]
    compared += [str(p.relative_to(root)) for p in sorted((root / "samples").glob("*.parquet"))]
    different = [n for n in compared if (fresh / n).read_bytes() != (root / n).read_bytes()]
    assert not different, f"not reproduced bit for bit: {different}"
    diff = sh(fresh, env, str(BIN / "dvc"), "metrics", "diff", "HEAD")
    assert "Change" not in diff, diff

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    train_runs = [r for r in runs if r.data.tags.get("stage") == "train"]
    train_runs = [r for r in train_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(train_runs) == 2
    assert len({r.data.tags["pipeline_id"] for r in train_runs}) == 2  # one id per repro


def test_lost_node_fails_after_a_bounded_wait_and_the_rerun_resumes(repo, cluster, capsys):
    """Runs last: it removes a worker node. Train's two workers fill both nodes; one node is
    removed after the second checkpoint. The worker group cannot be placed again on the one CPU
    left: the stage fails after 3 tries of train.placement_timeout_s, naming the keys, instead
    of waiting forever. With a new node the same stage resumes from the last checkpoint."""
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    from pipelines import train as train_stage
    from pipelines.store import Store

    root, env, _ = repo
    overlay = {
        "tune": {"enabled": False},
        "train": {
            "steps": 40,
            "checkpoint_every": 2,
            "log_every": 2,
            "max_failures": 1,
            "placement_timeout_s": 10,
            "out_dir": "node_loss/models",
        },
        "evaluate": {"out_dir": "node_loss/metrics", "plots_dir": "node_loss/plots"},
    }
    params = load_params_file(root / "params.yaml").merged(overlay)
    store = Store(params.storage.root)
    outcome: dict[str, Any] = {}

    def run_stage() -> None:
        try:
            with common.mlflow_run("train", params):
                outcome["summary"] = train_stage.run(params)
        except Exception as err:  # the failure is what this test expects
            outcome["error"] = err
        outcome["ended"] = time.monotonic()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(common.REPO_ROOT_ENV, str(root))
        mp.setenv("RAY_ADDRESS", cluster.address)
        common.init_ray(params)
        try:
            driver_node = ray.get_runtime_context().get_node_id()
            stage = threading.Thread(target=run_stage, daemon=True)
            stage.start()
            deadline = time.monotonic() + 600
            victim = None
            while victim is None and time.monotonic() < deadline and stage.is_alive():
                names = [n for n in store.list_dirs("ray") if n.startswith("train-")]
                done = [n for n in names if store.exists(f"ray/{n}/step-00000002/checkpoint.pt")]
                workers = list_actors(
                    address=cluster.dashboard,
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                )
                nodes = {w.node_id for w in workers} - {driver_node}
                if done and nodes:
                    victim = next(n for n in cluster.nodes.worker_nodes if n.node_id in nodes)
                time.sleep(0.5)
            assert victim is not None, f"no checkpoint or worker to act on: {outcome}"
            cluster.nodes.remove_node(victim)
            removed = time.monotonic()
            stage.join(timeout=600)
            assert not stage.is_alive(), "the stage kept waiting for the lost node"
            error = str(outcome.get("error"))
            assert "train.placement_timeout_s = 10 s" in error and "train.num_workers = 2" in error
            # 1 restart + 3 tries of 10 s, with worker start-up and polling: far below forever.
            print(f"node lost -> stage failed clearly after {outcome['ended'] - removed:.0f} s")
            assert outcome["ended"] - removed < 240
            assert not (root / "node_loss/models/ema.pt").exists()  # no partial outputs

            cluster.nodes.add_node(num_cpus=1)
            started = time.monotonic()
            with common.mlflow_run("train", params):
                summary = train_stage.run(params)
            print(f"rerun with a new node: {time.monotonic() - started:.0f} s")
            assert summary["steps"] == 40 and summary["resumed_from_step"] >= 2
            assert (root / "node_loss/models/ema.pt").is_file()
        finally:
            ray.shutdown()
