"""The command line every stage shares: params checked before any work, then Ray, then the work
inside one MLflow run; bad input ends it with one line and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pipelines import cluster, kernels, provenance, tracking
from pipelines.credentials import redact_uri
from pipelines.params import Params
from pipelines.project import load_params, repo_root
from pipelines.run_info import StageClock, add_to_run_info


def stage_main(
    stage: str,
    run: Callable[..., Any],
    doc: str | None,
    argv: list[str] | None = None,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    preflight: Callable[[Params], None] | None = None,
    overlay: Callable[[Params, str], Params] | None = None,
    uses_ray: bool = True,
) -> None:
    """The command line of every stage: validate params, reach Ray, run inside one MLflow run.

    Params are loaded (and so validated), `overlay` lays what an earlier stage chose over them
    (Tune's best configuration: `pipelines.project.tuned_params`) and `preflight` checks the
    stage's inputs, all before Ray or MLflow start, so a bad value or a missing file fails before
    any work. The MLflow run records the params the stage runs with, after the overlay.
    `configure` adds stage-specific options; their values reach `run` as keywords. A stage that
    runs no Ray work (`uses_ray` false) starts no cluster.
    """
    clock = StageClock()
    parser = argparse.ArgumentParser(description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    if configure is not None:
        configure(parser)
    options = vars(parser.parse_args(argv))
    with refuse_bad_input(stage):
        params = load_params(options.pop("params"))
        # Before anything in this process runs a CPU kernel (preflight may load a checkpoint).
        cpu_kernels = kernels.pin_this_process(params)
        if overlay is not None:
            params = overlay(params, stage)
        if preflight is not None:
            preflight(params)
        tracking.check_mlflow_credentials(tracking.tracking_uri(params))
    tags = {**provenance.provenance_tags(stage), "cpu_kernels": cpu_kernels}
    clock.lap("params_and_checks")
    connected = uses_ray and cluster.init_ray(params, tags["pipeline_id"])
    if uses_ray:
        with refuse_bad_input(stage):
            cluster.check_reach(params)
        clock.lap("ray_start")
    with contextlib.ExitStack() as mlflow_stack:
        mlflow_stack.enter_context(tracking.mlflow_run(stage, params, tags))
        clock.lap("mlflow_start")
        run(params, **options)
        clock.lap("run")
    clock.lap("mlflow_end")
    if connected:
        cluster.shutdown_ray()
        clock.lap("ray_shutdown")
    finish(stage, clock)


def finish(stage: str, clock: StageClock) -> None:
    """Record where the stage's time went and say what it wrote."""
    seconds = clock.in_order()
    add_to_run_info(repo_root(), stage, {"seconds": seconds})
    phases = ", ".join(f"{name} {spent:.1f}" for name, spent in seconds.items())
    outputs = ", ".join(provenance.dvc_outputs(stage=stage)) or "(none declared in dvc.yaml)"
    print(f"[{stage}] done in {clock.total():.0f} s ({phases}); outputs: {outputs}", flush=True)


# Exit status of a stage that refused its params or inputs before any work.
BAD_INPUT_EXIT = 2


@contextlib.contextmanager
def refuse_bad_input(stage: str) -> Iterator[None]:
    """The checks a stage makes before any work (params, its inputs, what the cluster reaches):
    a ValueError or FileNotFoundError there ends the process with its message on stderr, which
    names the keys and the fix, and exit status 2, without a traceback (nothing ran that a
    traceback would explain). Failures during the work keep their tracebacks."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        message = redact_uri(str(err)) or type(err).__name__
        print(f"[{stage}] {message}", file=sys.stderr, flush=True)
        raise SystemExit(BAD_INPUT_EXIT) from None
