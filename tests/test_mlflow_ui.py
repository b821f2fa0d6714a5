"""The MLflow UI, in headless Chromium, on the runs of two experiments of the real pipeline.

Two experiments of a tiny DAG in a throwaway repository, as `dvc exp run -S train.lr=...` makes
them: the first runs all six stages, the second (another train.lr) reruns train, sample and
evaluate, the stages `dvc status` names for a train.lr change. Each stage's own `run` runs inside
`mlflow_run` in this process, with `DVC_EXP_NAME` and the pipeline id set as DVC sets them for
its stage commands, on one local Ray cluster for the module. (Measured on the 2-core box: the
same two experiments through `dvc exp run` took 340 s + 135 s, mostly each stage process
importing torch, Ray and MLflow and joining the cluster; in one process they take a fraction.)

Then `mlflow server` serves the SQLite store on 127.0.0.1 and Chromium (Debian's, driven by
Playwright; scripts/install_browser.sh installs it) checks what a person would look at: the runs
table with one run per stage, named `<stage> · <experiment>`, with a param and a metric column
added; the compare view of the two train runs showing their differing train.lr. Screenshots go
to pytest's tmp folder and, when $DDPM_TEST_ARTIFACTS is set, to that folder too.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray
import torch
import yaml
from test_ray_job import free_ports, stop_process_group
from test_stages import git

from ddpm.training import load_ema_model
from pipelines import cluster, project, provenance, tracking
from pipelines.params import load_params_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# No GPU, no sandbox (root in a container), and nothing that reaches out to the network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
STAGES = ["prepare", "classifier", "tune", "train", "sample", "evaluate"]
# What `dvc exp run -S train.lr=...` reruns after the first experiment.
AFTER_LR_CHANGE = ["train", "sample", "evaluate"]
EXPERIMENTS = {"lr-a": 1.0e-3, "lr-b": 2.0e-3}
MODEL_NAME = "ddpm-ddpm"  # ddpm-<mlflow.experiment>
TINY = {
    "seed": 0,
    "data": {"image_size": 16, "max_images": 128},
    "model": {"config": "tiny", "overrides": {}},
    "diffusion": {"num_timesteps": 50},
    "classifier": {"epochs": 1, "batch_size": 64},
    "tune": {"enabled": False},  # so train.lr is what train uses
    "train": {
        "steps": 4,
        "batch_size": 8,
        "num_workers": 1,
        "warmup_steps": 0,
        "checkpoint_every": 4,
        "log_every": 1,
    },
    "sample": {
        "num_images": 16,
        "batch_size": 16,
        "shard_size": 16,
        "num_steps": 3,
        "grid_size": 2,
        "num_workers": 1,
        "trajectory_frames": 2,
    },
    "evaluate": {
        "nll_images": 2,
        "nll_batch_size": 2,
        "mc_images": 16,
        "baseline_images": 16,
        "batch_size": 64,
        "fid": {"enabled": False},
    },
    "ray": {"num_cpus": 2},
}


def write_params(root: Path, lr: float) -> None:
    tree = load_params_file(REPO / "params.yaml").merged(TINY).to_dict()
    tree["train"]["lr"] = lr
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The repository after both experiments; its mlflow.db holds their runs."""
    root = tmp_path_factory.mktemp("ui") / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    first, second = EXPERIMENTS
    write_params(root, EXPERIMENTS[first])
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(project.REPO_ROOT_ENV, str(root))
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", provenance.DVC_EXP_NAME_ENV):
            mp.delenv(name, raising=False)
        cluster.init_ray(
            project.load_params(), provenance.pipeline_id()
        )  # every stage below finds it initialised
        started = time.monotonic()
        try:
            for exp, stages in ((first, STAGES), (second, AFTER_LR_CHANGE)):
                write_params(root, EXPERIMENTS[exp])  # what `-S train.lr=...` does
                mp.setenv(provenance.DVC_EXP_NAME_ENV, exp)
                mp.setenv(provenance.PIPELINE_ID_ENV, f"ui-{exp}")
                params = project.load_params()
                for stage in stages:
                    module = importlib.import_module(f"pipelines.{stage}")
                    with tracking.mlflow_run(stage, params, provenance.provenance_tags(stage)):
                        module.run(params)
        finally:
            ray.shutdown()
        print(f"two experiments' stages: {time.monotonic() - started:.0f} s")
    yield root


@pytest.fixture(scope="module")
def runs(repo):
    """(experiment id, {run name: run}) of the top-level runs."""
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("ddpm")
    found = mlflow.search_runs([experiment.experiment_id], output_format="list")
    return experiment, {r.info.run_name: r for r in found}


def test_runs_are_named_and_tagged_by_experiment(repo, runs):
    experiment, by_name = runs
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert experiment.artifact_location == (repo / "mlruns").as_uri()  # not the test's cwd
    expected = [f"{s} · lr-a" for s in STAGES] + [f"{s} · lr-b" for s in AFTER_LR_CHANGE]
    assert sorted(by_name) == sorted(expected)
    for name, run in by_name.items():
        stage, exp = name.split(" · ")
        tags = run.data.tags
        assert tags["stage"] == stage and tags["dvc_exp_name"] == exp
        assert tags["pipeline_id"] == f"ui-{exp}"
        assert run.data.params["train.lr"] == str(EXPERIMENTS[exp])
        assert run.info.status == "FINISHED"
    # The first experiment ran at the commit; the second changed params.yaml, as `-S` does.
    assert by_name["train · lr-a"].data.tags["git_dirty"] == "false"
    assert by_name["train · lr-b"].data.tags["git_dirty"] == "true"
    for exp in EXPERIMENTS:
        loss = by_name[f"train · {exp}"].data.metrics["final_loss"]
        assert 0.0 < loss < 5.0  # L_simple of a barely trained model: near 1


def test_each_train_run_registers_a_model_version_that_loads(repo, runs):
    _, by_name = runs
    client = mlflow.MlflowClient()
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert sorted(versions) == [1, 2]
    assert versions[1].run_id == by_name["train · lr-a"].info.run_id
    assert versions[2].run_id == by_name["train · lr-b"].info.run_id
    # The version's source is the logged model, which carries the train run's key metric.
    logged = mlflow.get_logged_model(versions[2].source.removeprefix("models:/"))
    assert logged.source_run_id == by_name["train · lr-b"].info.run_id
    assert {m.key: m.value for m in logged.metrics}["final_loss"] == pytest.approx(
        by_name["train · lr-b"].data.metrics["final_loss"]
    )

    x = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 49])
    # A pyfunc model of safetensors + JSON (no pickle); its raw model is the U-Net.
    latest = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/2").get_raw_model()
    pipeline_model, _, _ = load_ema_model(repo / "models/ema.pt")  # lr-b's, the last written
    with torch.no_grad():
        assert torch.equal(latest(x, t), pipeline_model(x, t))
        # Version 1 is the other experiment's model, trained at another lr.
        earlier = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1").get_raw_model()
        assert not torch.equal(earlier(x, t), pipeline_model(x, t))
    # pyfunc serves it too: x is the input, t an int param for the whole batch.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/2").predict(
        x.numpy(), params={"t": 17}
    )
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(served), pipeline_model(x, torch.tensor(17)))


def test_git_dirty_ignores_what_dvc_declares_as_outputs(repo):
    """A DVC project commits its small metrics and plots; DVC deletes them before rerunning a
    stage, which must not make the run look as if it ran uncommitted code or params."""
    git(repo, "add", "-A")  # .gitignore keeps data, models, store, mlflow.db out
    git(repo, "commit", "-q", "-m", "results")
    assert provenance.git_info(repo)["git_dirty"] == "false"
    train_json = repo / "metrics/train.json"
    saved = train_json.read_bytes()
    try:
        train_json.unlink()  # as DVC does before the train stage runs
        (repo / "plots/loss.csv").write_text("step,loss\n")
        assert provenance.git_info(repo)["git_dirty"] == "false"
        with (repo / "dvc.yaml").open("a") as handle:  # a real change
            handle.write("\n")
        assert provenance.git_info(repo)["git_dirty"] == "true"
    finally:
        git(repo, "checkout", "-q", "--", ".")
    assert train_json.read_bytes() == saved


@pytest.fixture(scope="module")
def server(repo, runs):
    """`mlflow server` on a free port of 127.0.0.1, serving the repository's store."""
    (port,) = free_ports(1)
    log = repo.parent / "mlflow-server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{repo}/mlflow.db",
    ]  # fmt: skip
    with log.open("w") as out:
        # Its own session, so teardown signals exactly its process group.
        proc = subprocess.Popen(
            command, cwd=repo, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # its start-up is slow on a busy 2-core box
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh (as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 2000, "height": 900})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    folder = os.environ.get("DDPM_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)
    return path


def test_runs_table_lists_a_run_per_stage_with_param_and_metric_columns(
    server, runs, page, tmp_path
):
    experiment, by_name = runs
    url = tracking.runs_table_url(server, experiment.experiment_id)
    assert url is not None
    # The experiment's own link, with the switch the stages' printed link sets, lands on runs.
    page.goto(url.replace("/runs?", "?"))
    page.wait_for_url("**/runs?**")
    page.get_by_role("row").filter(has_text="prepare · lr-a").wait_for()
    rows = page.get_by_role("row").filter(has_text=" · ")
    names = sorted(rows.get_by_role("link", name=" · ").all_inner_texts())
    assert names == sorted(by_name)
    assert page.get_by_text(f"{len(by_name)} matching runs").is_visible()

    # A param and a key metric, added as a user adds them; ag-grid names its columns by source.
    columns = {"train.lr": "params.`train.lr`", "final_loss": "metrics.`final_loss`"}
    for column, col_id in columns.items():
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill(column)
        # The selector is a tree of checkable nodes, each reading as its column's name.
        node = page.locator(".du-bois-light-tree-treenode").filter(
            has_text=re.compile(rf"^{re.escape(column)}$")
        )
        node.locator(".du-bois-light-tree-checkbox").click()
        page.keyboard.press("Escape")
        # ag-grid renders only the columns in view; new ones are added at the far right.
        page.locator(f'[role="columnheader"][col-id="{col_id}"]').scroll_into_view_if_needed()

    def cell(run_name: str, col_id: str) -> str:
        # ag-grid splits a row over its pinned and scrolled parts, which share the row-index.
        index = page.get_by_role("row").filter(has_text=run_name).first.get_attribute("row-index")
        return page.locator(f'[role="row"][row-index="{index}"] [col-id="{col_id}"]').inner_text()

    for exp, lr in EXPERIMENTS.items():
        for stage in AFTER_LR_CHANGE:  # every stage's run holds the resolved params
            assert cell(f"{stage} · {exp}", columns["train.lr"]) == str(lr)
        loss = by_name[f"train · {exp}"].data.metrics["final_loss"]
        assert float(cell(f"train · {exp}", columns["final_loss"])) == pytest.approx(loss, abs=1e-3)
        assert cell(f"sample · {exp}", columns["final_loss"]) == "-"  # sample logs no loss
    assert screenshot(page, "mlflow-runs-table.png", tmp_path).stat().st_size > 20_000


def test_compare_view_shows_the_experiments_differing_lr(server, runs, page, tmp_path):
    experiment, by_name = runs
    page.goto(tracking.runs_table_url(server, experiment.experiment_id))
    for exp in EXPERIMENTS:
        row = page.get_by_role("row").filter(has_text=f"train · {exp}")
        row.get_by_role("checkbox").first.check()  # the row's selection box
    page.get_by_role("button", name="Compare").click()
    page.wait_for_url("**/compare-runs?**")
    page.get_by_text("Comparing 2 Runs").wait_for()

    def param_row(name: str):
        return page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name))

    assert param_row("data.image_size").get_by_role("cell").all_inner_texts() == ["16", "16"]
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    param_row("data.image_size").wait_for(state="detached")  # equal in both: hidden now
    lr = param_row("train.lr").get_by_role("cell").all_inner_texts()
    assert lr == [str(EXPERIMENTS[exp]) for exp in EXPERIMENTS]  # the runs in selection order
    assert screenshot(page, "mlflow-compare-train-lr.png", tmp_path).stat().st_size > 20_000
