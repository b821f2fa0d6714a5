"""MLflow: the tracking URI every process of a stage logs to, one run per stage with its params
and provenance, the key metrics that compare runs, and outages that must not fail a stage."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from pipelines.credentials import credentials_to_environment, redact_uri
from pipelines.params import Params
from pipelines.project import absolute, repo_root
from pipelines.provenance import experiment_label

# The experiment's kind, as MLflow 3 records it: "custom_model_development" is model training,
# whose UI page is the runs table (MLflow 3.0 to 3.x UIs open an experiment on its kind's page;
# without the tag they guess in the browser). The 3.17 UI instead takes the kind from its
# "GenAI / Model training" switch, GenAI unless the link says otherwise, so the stages also print
# a link to the runs table with `?workflowType=machine_learning` (runs_table_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# The numbers that say how good a run is, under one name in every run that has them (train's
# run, Tune's trials, evaluate's run), so one MLflow chart compares them across experiments.
KEY_METRICS = {
    "final_loss": "L_simple, mean of the last train.log_every steps",
    "test_bpd": "test NLL in bits/dim: the bound of Eq. 5 over all T terms (evaluate stage)",
    "classifier_fd": "Fréchet distance of the samples to the train split, classifier features",
}


def tracking_uri(params: Params) -> str:
    """Absolute MLflow tracking URI: params, else $MLFLOW_TRACKING_URI, else the repo's SQLite file.

    Relative SQLite or file paths are resolved against the repository root, because Ray workers
    run in other working directories and would otherwise write to a different store.
    """
    uri = (
        params.mlflow.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            return f"sqlite:///{absolute(path)}"
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:") :].removeprefix("//")
        return absolute(path).as_uri()
    if "://" not in uri:
        return str(absolute(uri))
    return credentials_to_environment(uri)


def tracking_source(params: Params) -> str:
    """Where the tracking URI comes from, as a params key or a variable."""
    if params.mlflow.tracking_uri:
        return "mlflow.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "mlflow.tracking_uri (null: the SQLite file in the repository)"


def log_key_metrics(values: Mapping[str, float | None], model_id: str | None = None) -> None:
    """Log KEY_METRICS (a None value is left out); with `model_id` they are also the metrics of
    that logged model, which the Model Registry shows beside its versions."""
    import mlflow

    unknown = set(values) - set(KEY_METRICS)
    if unknown:
        raise ValueError(f"not key metrics: {sorted(unknown)}; known: {sorted(KEY_METRICS)}")
    chosen = {k: float(v) for k, v in values.items() if v is not None}
    mlflow.log_metrics(chosen, model_id=model_id)


def _set_experiment(name: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A SQLite store's artifacts would go to ./mlruns of whatever directory the stage runs
        # in (a Ray job's temporary copy, deleted afterwards): keep them beside the repository.
        local = mlflow.get_tracking_uri().startswith("sqlite:")
        location = (repo_root() / "mlruns").as_uri() if local else None
        try:
            client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            pass  # Two processes (e.g. parallel Tune trials) raced to create it; the loser uses it.
    elif EXPERIMENT_KIND_TAG not in experiment.tags:
        # Made before this tag was set (or by hand); a kind someone chose in the UI is kept.
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)


# Where README's `mlflow ui` command serves a SQLite or file store.
LOCAL_UI = "http://127.0.0.1:5000"


def run_url(tracking: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of one run: on the tracking server, or for a local store where
    README's `mlflow ui` serves it."""
    server = tracking.startswith(("http://", "https://"))
    base = tracking.rstrip("/") if server else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def runs_table_url(tracking: str, experiment_id: str) -> str | None:
    """The MLflow UI's runs table of an experiment, when the tracking URI is a server."""
    if not tracking.startswith(("http://", "https://")):
        return None
    return (
        f"{tracking.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )


# One request, answered at once by a server that is up; a server that is down is left to the
# stage's own MLflow calls (and their messages).
CREDENTIALS_TIMEOUT_S = 10


def check_mlflow_credentials(uri: str) -> None:
    """Before any work: an http(s) tracking server with authentication on (MLflow's basic-auth
    app) accepts this process's credentials. One request (search one experiment) with the
    credentials MLflow itself would send ($MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD,
    a token, or user:password in the URI); a 401 or 403 raises one line naming where they come
    from, never the password. A server that does not answer is not judged here."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "POST",
            json={"max_results": 1},
            max_retries=0,
            backoff_factor=0,
            timeout=CREDENTIALS_TIMEOUT_S,
            raise_on_status=False,
        )
    except Exception:
        return
    if response.status_code not in (401, 403):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if bool(user) != bool(password):
        given = (
            f"needs both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; "
            f"{'MLFLOW_TRACKING_PASSWORD' if user else 'MLFLOW_TRACKING_USERNAME'} is not set"
        )
    elif user:
        given = "refused the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        given = "refused the token in MLFLOW_TRACKING_TOKEN"
    elif urllib.parse.urlsplit(uri).password is not None:
        given = "refused the user:password in the tracking URI"
    else:
        given = (
            "needs credentials and got none: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    raise ValueError(f"MLflow server {redact_uri(uri)} {given} ({response.status_code})")


@contextlib.contextmanager
def mlflow_run(
    stage: str,
    params: Params,
    tags: Mapping[str, str],
    *,
    nested: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    uri: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage (or a Tune trial) with `params` and provenance `tags` logged.

    `params` are the values the stage runs with (after Tune's overlay where it applies); `tags`
    come from `pipelines.provenance.provenance_tags`, computed once by the stage's driver, which
    has the repository: a Tune trial on another node receives them, with the driver's tracking
    `uri`. The run is named `<stage> · <experiment>` (`experiment_label`) unless `run_name` is
    given. `parent_run_id` nests a run started in another process under the stage's run.
    """
    import mlflow

    uri = uri or tracking_uri(params)
    if redact_uri(uri) != uri:
        # MLflow prints its own "View run at <uri>..." links when a run ends, password and all;
        # the stage prints them itself, without it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    _set_experiment(params.mlflow.experiment)
    host = socket.gethostname()
    close_stale_runs(params.mlflow.experiment, stage, host)
    tags = {**tags, "host": host, "pid": str(os.getpid())}
    run = mlflow.start_run(
        run_name=run_name or f"{stage} · {experiment_label(tags)}",
        nested=nested,
        parent_run_id=parent_run_id,
        tags=tags,
    )
    status = "FINISHED"
    try:
        log_params(params)
        if parent_run_id is None:  # a Tune trial's run is listed under its stage's
            announce(stage, uri, run, table=not nested)
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        # An MLflow outage at the very end must not fail a stage whose outputs are written.
        with tolerate_mlflow_outage(stage, f"closing run {run.info.run_id} as {status}"):
            mlflow.end_run(status)


def log_params(params: Params) -> None:
    """Every params value, in the active run, as dotted keys; a URI's credentials
    (mlflow.tracking_uri: https://user:password@host) stay out of the run."""
    import mlflow

    items = [(k, redact_uri(v) if isinstance(v, str) else v) for k, v in params.flat().items()]
    for start in range(0, len(items), 100):  # MLflow's per-request limit
        mlflow.log_params(dict(items[start : start + 100]))


def announce(stage: str, uri: str, run: Any, table: bool) -> None:
    """Print where the stage's run is: its page, and with `table` the experiment's runs table."""
    link = redact_uri(run_url(uri, run.info.experiment_id, run.info.run_id))
    served = "" if uri.startswith(("http://", "https://")) else " (run `mlflow ui`: README)"
    print(
        f"[{stage}] MLflow run {run.info.run_id} in {redact_uri(uri)}: {link}{served}", flush=True
    )
    url = runs_table_url(uri, run.info.experiment_id)
    if url and table:
        print(f"[{stage}] runs table: {redact_uri(url)}", flush=True)


@contextlib.contextmanager
def tolerate_mlflow_outage(stage: str, what: str) -> Iterator[None]:
    """Run MLflow calls that must not fail the stage; an error is reported once, clearly."""
    try:
        yield
    except Exception as err:
        print(
            f"[{stage}] MLflow unreachable while {what} ({type(err).__name__}: "
            f"{redact_uri(str(err))}); the stage's outputs are written, the run may lack these "
            "records",
            flush=True,
        )


def close_stale_runs(experiment_name: str, stage: str, host: str) -> None:
    """Mark KILLED the RUNNING runs of `stage` started on this host by a process that is gone
    (a stage killed with SIGKILL never closes its run)."""
    import mlflow
    import psutil

    experiment = mlflow.get_experiment_by_name(experiment_name)
    client = mlflow.MlflowClient()
    stale = client.search_runs(
        [experiment.experiment_id],
        f"attributes.status = 'RUNNING' and tags.stage = '{stage}' and tags.host = '{host}'",
    )
    for old in stale:
        pid = old.data.tags.get("pid", "")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_terminated(old.info.run_id, "KILLED")
            print(f"[{stage}] MLflow run {old.info.run_id} of dead process {pid}: KILLED")
