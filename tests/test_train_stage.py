"""The train stage on a local Ray cluster: two DDP workers, checkpoints, resume after a stop.

The session's tiny DAG (tests/tiny_dag.py: 16 px digits, tiny U-Net, T = 100, 4 steps, Tune's
lr) trained with two Ray Train workers in other processes and working directories; its last
train run is checked as it is, and is the reference of the runs that stop, lose a checkpoint or
the whole stage, each in a copy of the DAG's repository. (A killed worker is restored within the
same run on a cluster of separate hosts: tests/test_multi_host.py.)
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

import mlflow
import pytest
import torch
from tiny_dag import FIRST, SECOND, change_params, copy_repo, stage_environment

from ddpm.training import Trainer, load_checkpoint, load_ema_model, state_digest
from pipelines import project, provenance, tracking
from pipelines import train as train_stage
from pipelines.worker import step_of

pytestmark = pytest.mark.slow


def run_train(root: Path, stop_after: int | None = None, storage: str | None = None, **train):
    """The stage's `run` inside its MLflow run, with Tune's choice laid over params as its
    command lays it, after these train keys (and storage.root, when given) are written to
    params.yaml."""
    change_params(root, train=train, **({"storage": {"root": storage}} if storage else {}))
    params = project.tuned_params(project.load_params(), "train")
    with tracking.mlflow_run("train", params, provenance.provenance_tags("train")) as run:
        summary = train_stage.run(params, stop_after=stop_after)
    return params, summary, run.info.run_id


@pytest.fixture(scope="module")
def straight(dag):
    """The DAG's last train run (4 uninterrupted steps): params, summary (its metrics and run
    info) and MLflow run id; checked on its own, and the reference for the resume tests."""
    summary = {
        **dag.read_json("metrics/details/train.json"),
        **dag.read_json("run_info/train.json"),
    }
    return dag.params("train"), summary, dag.run("train").info.run_id


@pytest.fixture(scope="module")
def twelve_steps(dag, tmp_path_factory) -> Path:
    """The checkpoint of an uninterrupted 12-step run (in a copy of its own): the reference of
    the runs that lose a worker or the whole stage."""
    root = copy_repo(dag.root, tmp_path_factory.mktemp("twelve") / "repo")
    with stage_environment(root, "test-twelve-steps"):
        # Its own store: the DAG's holds the 4-step run of the same key, which it would resume.
        _, summary, _ = run_train(root, steps=12, storage="store_12")
    assert summary["steps"] == 12 and summary["resumed_from_step"] == 0
    return Path(summary["checkpoint"]) / "checkpoint.pt"


def test_two_workers_train_one_model(dag, straight):
    repo = dag.root
    params, summary, run_id = straight
    assert summary["steps"] == 4 and summary["num_workers"] == 2
    assert summary["resumed_from_step"] == 0

    folder = Path(summary["checkpoint"])
    digests = {p.name: p.read_text().strip() for p in folder.glob("replica-*.sha256")}
    assert sorted(digests) == ["replica-0.sha256", "replica-1.sha256"]
    # Each rank saw its own half of every batch, yet both hold the same weights bit for bit...
    assert digests["replica-0.sha256"] == digests["replica-1.sha256"]
    state = load_checkpoint(folder / "checkpoint.pt")
    assert state_digest(state["model"]) == digests["replica-0.sha256"]
    # ...and those weights moved away from the seeded initialisation.
    init = Trainer.from_config(
        params.model_config(), params.diffusion, params.train_config(), seed=params.seed
    )
    assert state_digest(init.model.state_dict()) != digests["replica-0.sha256"]

    # The declared outputs, where dvc.yaml says, from the final checkpoint.
    model, diffusion, meta = load_ema_model(repo / "models/ema.pt")
    assert meta["step"] == 4 and diffusion.num_timesteps == 100
    for a, b in zip(model.state_dict().values(), state["ema"].values(), strict=True):
        assert torch.equal(a, b)
    with (repo / "plots/loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # The picture DVC shows offline is drawn from those rows.
    assert (repo / "plots/loss.png").read_bytes().startswith(b"\x89PNG")
    from PIL import Image

    # The forward-noising table: 4 images down, 8 timesteps across, each cell ~0.85 inch.
    with Image.open(repo / "plots/forward_noising.png") as strip:
        assert (strip.width, strip.height) == (round(100 * (0.85 * 8 + 0.4)), round(100 * 4.1))
    # The zero-initialised output layer predicts eps = 0 at first: L_simple starts near 1.
    assert 0.7 < float(rows[0]["loss"]) < 1.3
    saved = dag.read_json("metrics/details/train.json")
    assert saved["steps"] == 4
    # Only results in the metrics files (dvc.lock records their hash); how the run went is
    # beside. The headline is the final loss.
    assert set(saved) == set(train_stage.TRAIN_METRICS)
    # train.log_every is 1 here: the final loss is the last step's, with no standard error.
    assert saved["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-4)
    assert saved["final_loss_stderr"] is None
    assert dag.read_json("metrics/train.json") == {"loss": saved["final_loss"]}
    info = dag.read_json("run_info/train.json")
    assert info["wall_seconds"] > 0
    assert Path(info["checkpoint"]) == repo / "store/ray" / info["run_name"] / "step-00000004"
    assert info["replicas_identical"] == 2 and info["num_workers"] == 2

    # Rank 0 logged one loss per step into the stage's MLflow run, plus the artifacts.
    client = mlflow.MlflowClient(dag.tracking_uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [round(m.value, 5) for m in sorted(history, key=lambda m: m.step)] == [
        round(float(r["loss"]), 5) for r in rows
    ]
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "grad_norm"))
    assert client.get_metric_history(run_id, "images_per_second")
    assert client.get_run(run_id).data.tags["ray_run_name"] == info["run_name"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert "model/ema.pt" in artifacts
    assert {a.path for a in client.list_artifacts(run_id, "train")} >= {
        "train/forward_noising.png",
        "train/loss.csv",
        "train/loss.png",
    }


def test_lr_warms_up_to_the_tuned_lr(dag):
    """lr per step, as rank 0 logged it: the experiment's Tune choice, reached linearly over
    train.warmup_steps (2 in the first experiment, none in the second), then constant."""
    client = mlflow.MlflowClient(dag.tracking_uri)
    for exp, warm in ((FIRST, [0.5, 1, 1, 1]), (SECOND, [1, 1, 1, 1])):
        lr = dag.run("tune", exp).data.metrics["best_lr"]
        assert lr != dag.params().train.lr  # Tune's choice, not params.yaml's
        lrs = sorted(
            client.get_metric_history(dag.run("train", exp).info.run_id, "lr"), key=lambda m: m.step
        )
        assert [m.step for m in lrs] == [1, 2, 3, 4]
        assert [m.value for m in lrs] == pytest.approx([w * lr for w in warm]), exp


def test_registered_model_loads_without_unpickling(dag, straight, monkeypatch):
    """The run's registered version is safetensors + JSON: no file of it is a pickle, and
    MLflow's own loader rebuilds the network with every unpickler disabled; it computes what
    models/ema.pt's network computes."""
    import pickle

    params, _, run_id = straight
    mlflow.set_tracking_uri(dag.tracking_uri)
    client = mlflow.MlflowClient()
    name = train_stage.registered_model_name(params)
    [version] = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    uri = f"models:/{name}/{version.version}"
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "data/ema/weights.safetensors" in files and "data/ema/config.json" in files
    for path in files:
        assert not path.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin")), path
        head = (folder / path).read_bytes()[:2]
        assert head != b"PK" and not head.startswith(b"\x80"), f"{path} looks like a pickle"
    assert "loader_module: pipelines.train" in (folder / "MLmodel").read_text()
    assert version.tags[train_stage.MODEL_DIGEST_TAG]

    reference, diffusion, _ = load_ema_model(dag.root / "models/ema.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("the logged model was unpickled")

    for module, attribute in (
        (torch, "load"),
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
    ):
        monkeypatch.setattr(module, attribute, refuse)
    loaded = mlflow.pyfunc.load_model(uri)
    monkeypatch.undo()

    x = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, diffusion.num_timesteps - 1])
    with torch.no_grad():
        assert torch.equal(loaded.get_raw_model()(x, t), reference(x, t))
        expected = reference(x, torch.tensor(17))
    served = loaded.predict(x.numpy(), params={"t": 17})
    assert torch.equal(torch.from_numpy(served), expected)


def test_stopped_run_resumes_from_its_checkpoint(dag_copy, straight):
    repo = dag_copy
    # Same params in another store: the same run key, none of its checkpoints.
    _, stopped, _ = run_train(repo, stop_after=2, storage="store_resume")
    assert stopped["steps"] == 2
    assert stopped["run_name"] == straight[1]["run_name"]
    assert Path(stopped["checkpoint"]).parent.parent == repo / "store_resume" / "ray"
    assert not list((repo / "store_resume/ray").glob("*/step-00000004"))
    first_half = load_checkpoint(Path(stopped["checkpoint"]) / "checkpoint.pt")
    assert first_half["step"] == 2

    _, resumed, resumed_id = run_train(repo)  # storage.root stays store_resume
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    full = load_checkpoint(Path(resumed["checkpoint"]) / "checkpoint.pt")
    history = full["loss_history"].tolist()
    assert history[:2] == first_half["loss_history"].tolist()

    # The resumed run made the very same updates as the uninterrupted one.
    reference = load_checkpoint(Path(straight[1]["checkpoint"]) / "checkpoint.pt")
    assert reference["loss_history"].tolist() == history
    assert state_digest(reference["model"]) == state_digest(full["model"])
    assert state_digest(reference["ema"]) == state_digest(full["ema"])

    # Rerunning a finished run (say its outputs were deleted) exports its last checkpoint
    # without training again.
    (repo / "models/ema.pt").unlink()
    _, again, _ = run_train(repo)
    assert again["resumed_from_step"] == 4 and again["wall_seconds"] == 0.0
    assert load_ema_model(repo / "models/ema.pt")[2]["step"] == 4
    # The resumed run registered its weights (the copy's MLflow store started empty); the
    # rerun exported the same weights: no new registered version.
    params = project.load_params()
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    versions = client.search_model_versions(f"name = '{train_stage.registered_model_name(params)}'")
    assert [v.run_id for v in versions] == [resumed_id]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(dag_copy, straight, capsys):
    """A copy of the finished run whose newest checkpoint file is cut in half: the first rerun
    warns naming the file (Ray's own record of it included), resumes from the previous
    checkpoint and ends with the uninterrupted run's weights."""
    import shutil

    repo = dag_copy
    name = straight[1]["run_name"]
    shutil.copytree(repo / "store/ray" / name, repo / "store_truncated/ray" / name)
    newest = repo / "store_truncated/ray" / name / "step-00000004" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert (newest.parents[1] / train_stage.RAY_SNAPSHOT).is_file()

    started = time.monotonic()
    _, rerun, _ = run_train(repo, storage="store_truncated")
    seconds = time.monotonic() - started
    said = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nrerun past a truncated checkpoint: {seconds:.1f} s")
    assert f"skipping unreadable checkpoint {newest}" in said
    assert "Ray's checkpoint record names unusable checkpoints" in said and str(newest) in said
    assert rerun["resumed_from_step"] == 2 and rerun["steps"] == 4
    full = load_checkpoint(Path(rerun["checkpoint"]) / "checkpoint.pt")
    reference = load_checkpoint(Path(straight[1]["checkpoint"]) / "checkpoint.pt")
    assert full["loss_history"].tolist() == reference["loss_history"].tolist()
    assert state_digest(full["ema"]) == state_digest(reference["ema"])


def readable(path: Path) -> bool:
    try:
        load_checkpoint(path)
    except Exception:  # torch raises several types for a truncated file
        return False
    return True


def test_killed_stage_resumes_on_the_rerun(dag_copy, twelve_steps):
    """SIGKILL of the whole stage after its second checkpoint: the driver process, the local Ray
    cluster it started and its workers. The rerun resumes from the checkpoint, ends with the
    uninterrupted run's weights, and marks the killed stage's MLflow run KILLED."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    repo = dag_copy
    storage = repo / "store_sigkill"
    # The params the killed stage reads (run_train rewrites params.yaml the same way).
    change_params(repo, train={"steps": 12, "checkpoint_every": 2}, storage={"root": storage.name})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    family: set[psutil.Process] = set()
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and stage.poll() is None:
            with contextlib.suppress(psutil.Error):
                family |= {psutil.Process(stage.pid), *psutil.Process(stage.pid).children(True)}
            # Step 4's folder appears only once step 2's upload has finished (each report
            # persists its checkpoint before training goes on); killing as soon as step 2's
            # file appears could cut it mid-copy, and the rerun rightly starts from 0.
            if list(storage.glob("ray/*/step-00000004")):
                break
            time.sleep(0.05)
    finally:
        # The driver first: a Ray process killed before it would let the driver see its cluster
        # die and close its MLflow run FAILED in the moment before its own kill came.
        stage.send_signal(signal.SIGKILL)
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        # The stage is reaped through Popen (for its exit status), the rest through psutil.
        returncode = stage.wait(timeout=60)
        psutil.wait_procs([p for p in family if p.pid != stage.pid], timeout=30)
    assert returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    killed_at = max(
        step_of(str(p.parent))
        for p in storage.glob("ray/*/step-*/checkpoint.pt")
        if readable(p)  # the newest may have been cut short by the kill
    )
    assert 2 <= killed_at < 12

    started = time.monotonic()
    _, resumed, _ = run_train(repo, steps=12, storage=storage.name, checkpoint_every=2)
    print(f"rerun after SIGKILL at step {killed_at}: {time.monotonic() - started:.1f} s")
    assert resumed["resumed_from_step"] >= killed_at and resumed["steps"] == 12
    full = load_checkpoint(Path(resumed["checkpoint"]) / "checkpoint.pt")
    straight = load_checkpoint(twelve_steps)
    assert full["loss_history"].tolist() == straight["loss_history"].tolist()
    assert state_digest(full["ema"]) == state_digest(straight["ema"])
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    killed = [r for r in runs if r.data.tags.get("pid") == str(stage.pid)]
    assert [r.info.status for r in killed] == ["KILLED"]
