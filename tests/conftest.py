"""Settings shared by every test."""

import os

# Ray 2.60's token authentication stays on in every test, as on a user's new cluster: each
# cluster and client uses ~/.ray/auth_token (created by the first cluster when missing).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# MLflow and DVC must never try to phone home from a test.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# One intra-op thread per process: the suite runs Ray workers beside the test process on two
# cores, and OpenMP threads spin-waiting for a busy core made single tests 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402  (the environment above must be set before anything imports torch)

# mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI into os.environ, and stage code sets
# the DDPM_* variables for its Ray workers; child processes of a later test (a `ray start` head, a
# `dvc repro`) would inherit them and log into another test's store.
# The tracking URI's user:password moves into MLFLOW_TRACKING_USERNAME / _PASSWORD likewise.
_LEAKY_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "DDPM_REPO_ROOT",
    "DDPM_PIPELINE_ID",
    "RAY_ADDRESS",
)


@pytest.fixture(autouse=True)
def _restore_process_environment():
    saved = {name: os.environ.get(name) for name in _LEAKY_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not _cuda_available(), reason="no CUDA device here"),
        ),
    ]
)
def device(request):
    """Each device the check must hold on: the CPU always, CUDA where there is one. Tests that
    take it and are marked `gpu` form benchmarks/device_check.py's subset (`pytest -m gpu`)."""
    import torch

    return torch.device(request.param)
