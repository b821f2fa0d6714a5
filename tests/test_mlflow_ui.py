"""The MLflow UI, in headless Chromium, on the runs of two experiments of the real pipeline.

The session's tiny DAG (tests/tiny_dag.py) made two experiments in a throwaway repository, as
`dvc exp run -S train.warmup_steps=...` makes them: the first ran all six stages, the second
(another train.warmup_steps) reran tune, train, sample and evaluate, the stages `dvc status`
names for that change.

Then `mlflow server` serves the SQLite store on 127.0.0.1 and Chromium (Debian's, driven by
Playwright; scripts/install_browser.sh installs it, scripts/test.sh runs it when it is missing)
checks what a person would look at: the runs table with one run per stage, named
`<stage> · <experiment>`, with param and metric columns added; the compare view of the two train
runs showing their differing train.warmup_steps. Screenshots go to pytest's tmp folder and, when
$DDPM_TEST_ARTIFACTS is set, to that folder too.
"""

from __future__ import annotations

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
import torch
from test_ray_job import free_ports, stop_process_group
from tiny_dag import AFTER_WARMUP_CHANGE, EXPERIMENTS, FIRST, SECOND, git, run_names

from ddpm.training import load_ema_model
from pipelines import provenance, tracking

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# No GPU, no sandbox (root in a container), and nothing that reaches out to the network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
MODEL_NAME = "ddpm-ddpm"  # ddpm-<mlflow.experiment>


@pytest.fixture(scope="module")
def runs(dag):
    """(experiment, {run name: run}) of the stages' runs (Tune's trials are nested under its)."""
    mlflow.set_tracking_uri(dag.tracking_uri)
    return dag.experiment(), dag.stage_runs()


def test_runs_are_named_and_tagged_by_experiment(dag, runs):
    experiment, by_name = runs
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert experiment.artifact_location == (dag.root / "mlruns").as_uri()  # not the test's cwd
    assert sorted(by_name) == sorted(run_names())
    for name, run in by_name.items():
        stage, exp = name.split(" · ")
        tags = run.data.tags
        assert tags["stage"] == stage and tags["dvc_exp_name"] == exp
        assert tags["pipeline_id"] == f"dag-{exp}"
        assert run.data.params["train.warmup_steps"] == str(EXPERIMENTS[exp])
        assert run.info.status == "FINISHED"
    # The first experiment ran at the commit; the second changed params.yaml, as `-S` does.
    assert by_name[f"train · {FIRST}"].data.tags["git_dirty"] == "false"
    assert by_name[f"train · {SECOND}"].data.tags["git_dirty"] == "true"
    for exp in EXPERIMENTS:
        loss = by_name[f"train · {exp}"].data.metrics["final_loss"]
        assert 0.0 < loss < 5.0  # L_simple of a barely trained model: near 1


def test_each_train_run_registers_a_model_version_that_loads(dag, runs):
    _, by_name = runs
    first, second = (by_name[f"train · {exp}"] for exp in EXPERIMENTS)
    client = mlflow.MlflowClient()
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert sorted(versions) == [1, 2]
    assert versions[1].run_id == first.info.run_id
    assert versions[2].run_id == second.info.run_id
    # The version's source is the logged model, which carries the train run's key metric.
    logged = mlflow.get_logged_model(versions[2].source.removeprefix("models:/"))
    assert logged.source_run_id == second.info.run_id
    assert {m.key: m.value for m in logged.metrics}["final_loss"] == pytest.approx(
        second.data.metrics["final_loss"]
    )

    x = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    # The second experiment's model, the last written.
    pipeline_model, diffusion, _ = load_ema_model(dag.root / "models/ema.pt")
    t = torch.tensor([0, 17, diffusion.num_timesteps - 1])
    # A pyfunc model of safetensors + JSON (no pickle); its raw model is the U-Net.
    latest = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/2").get_raw_model()
    with torch.no_grad():
        assert torch.equal(latest(x, t), pipeline_model(x, t))
        # Version 1 is the other experiment's model, trained with another warm-up.
        earlier = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1").get_raw_model()
        assert not torch.equal(earlier(x, t), pipeline_model(x, t))
    # pyfunc serves it too: x is the input, t an int param for the whole batch.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/2").predict(
        x.numpy(), params={"t": 17}
    )
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(served), pipeline_model(x, torch.tensor(17)))


def test_git_dirty_ignores_what_dvc_declares_as_outputs(dag_copy):
    """A DVC project commits its small metrics and plots; DVC deletes them before rerunning a
    stage, which must not make the run look as if it ran uncommitted code or params."""
    repo = dag_copy
    git(repo, "add", "-A")  # .gitignore keeps data, models, store, mlflow.db out
    git(repo, "commit", "-q", "-m", "results")
    assert provenance.git_info(repo)["git_dirty"] == "false"
    (repo / "metrics/train.json").unlink()  # as DVC does before the train stage runs
    (repo / "plots/loss.csv").write_text("step,loss\n")
    assert provenance.git_info(repo)["git_dirty"] == "false"
    with (repo / "dvc.yaml").open("a") as handle:  # a real change
        handle.write("\n")
    assert provenance.git_info(repo)["git_dirty"] == "true"


@pytest.fixture(scope="module")
def server(dag, runs, tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1, serving the repository's store."""
    repo = dag.root
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("mlflow-server") / "mlflow-server.log"
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
    page.get_by_role("row").filter(has_text=f"prepare · {FIRST}").wait_for()
    rows = page.get_by_role("row").filter(has_text=" · ")
    names = sorted(rows.get_by_role("link", name=" · ").all_inner_texts())
    assert names == sorted(by_name)
    # The count has Tune's trials too (two per search), whose rows fold under their tune run's.
    every = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert len(every) == len(by_name) + 2 * len(EXPERIMENTS)
    assert page.get_by_text(f"{len(every)} matching runs").is_visible()

    # Params and a key metric, added as a user adds them; ag-grid names its columns by source.
    columns = {
        "train.warmup_steps": "params.`train.warmup_steps`",
        "train.lr": "params.`train.lr`",
        "final_loss": "metrics.`final_loss`",
    }
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

    own_lr = by_name[f"prepare · {FIRST}"].data.params["train.lr"]  # params.yaml's
    for exp, warmup in EXPERIMENTS.items():
        for stage in AFTER_WARMUP_CHANGE:  # every stage's run holds the resolved params...
            assert cell(f"{stage} · {exp}", columns["train.warmup_steps"]) == str(warmup)
            # ...Tune's lr included where it replaced params.yaml's: after the search.
            lr = by_name[f"{stage} · {exp}"].data.params["train.lr"]
            assert cell(f"{stage} · {exp}", columns["train.lr"]) == lr
            assert (lr == own_lr) == (stage == "tune"), f"{stage} · {exp}"
        loss = by_name[f"train · {exp}"].data.metrics["final_loss"]
        assert float(cell(f"train · {exp}", columns["final_loss"])) == pytest.approx(loss, abs=1e-3)
        assert cell(f"sample · {exp}", columns["final_loss"]) == "-"  # sample logs no loss
    assert screenshot(page, "mlflow-runs-table.png", tmp_path).stat().st_size > 20_000


def test_compare_view_shows_the_experiments_differing_warmup(server, runs, page, tmp_path):
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
    warmup = param_row("train.warmup_steps").get_by_role("cell").all_inner_texts()
    assert warmup == [str(v) for v in EXPERIMENTS.values()]  # the runs in selection order
    assert screenshot(page, "mlflow-compare-train-warmup.png", tmp_path).stat().st_size > 20_000
