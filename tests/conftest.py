"""Settings shared by every test, and the expensive work the end-to-end tests share: one Ray
cluster and one tiny DAG per session (tests/tiny_dag.py)."""

import os
import signal

# scripts/test.sh runs the multi-host tests as a background job, which a non-interactive shell
# starts with SIGINT ignored; restored, the script's Ctrl-C reaches them and their fixtures remove
# the namespaces and end their processes.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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

from pipelines.kernels import PORTABLE_KERNELS, is_x86  # noqa: E402

# params.yaml's CPU kernels (reproducibility.cpu_kernels: portable) in this process from its
# start: tests run stages in this process, and a stage refuses to pin kernels after torch has
# chosen others for its first tensor work (pipelines/kernels.py).
if is_x86():
    for _name, _value in PORTABLE_KERNELS.items():
        os.environ.setdefault(_name, _value)

import tiny_dag  # noqa: E402  (imports neither torch nor pipelines)


def pytest_collection_modifyitems(items):
    """The modules that use the session's Ray cluster run one after another, after the rest:
    the cluster (started for the first of them) then lives while they need it, not beside every
    other test (its idle workers and daemons take memory and CPU from them)."""
    sharing = {item.module for item in items if "ray_cluster" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) in sharing)


@pytest.fixture(autouse=True)
def _restore_process_environment():
    """What a test's stages, MLflow or Ray set in this process's environment ends with it."""
    with tiny_dag.restored_environment():
        yield


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


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """The tiny DAG's repository, committed and tagged, before any stage ran."""
    return tiny_dag.make_repo(tmp_path_factory.mktemp("dag") / "repo")


@pytest.fixture(scope="session")
def ray_cluster(tiny_repo):
    """The session's one local Ray cluster (ray.num_cpus of the tiny params), shut down at the
    end of the session whatever happened; every in-process stage of every test finds it up."""
    import ray

    try:
        tiny_dag.start_ray(tiny_repo)
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def dag(tiny_repo, ray_cluster):
    """Both experiments of the tiny DAG, run once per session (tests/tiny_dag.py)."""
    tiny_dag.run_experiments(tiny_repo)
    return tiny_dag.Dag(tiny_repo)


@pytest.fixture
def dag_copy(dag, tmp_path):
    """A copy of the tiny DAG's repository, which the stages of this test read and write."""
    root = tiny_dag.copy_repo(dag.root, tmp_path / "repo")
    with tiny_dag.stage_environment(root, "test-copy"):
        yield root
