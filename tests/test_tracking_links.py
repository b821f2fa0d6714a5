"""The link each stage prints to its MLflow run."""

from pipelines import tracking


def test_a_local_store_links_to_where_readmes_mlflow_ui_serves_it():
    url = tracking.run_url("sqlite:////repo/mlflow.db", "3", "abc123")
    assert url == "http://127.0.0.1:5000/#/experiments/3/runs/abc123"


def test_a_server_links_to_itself_without_a_trailing_slash():
    url = tracking.run_url("https://mlflow.example:5000/", "7", "f00")
    assert url == "https://mlflow.example:5000/#/experiments/7/runs/f00"
