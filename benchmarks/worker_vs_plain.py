"""The training step inside the train stage's Ray Train worker against a plain process, side by
side (a script, not a test).

    .venv/bin/python benchmarks/worker_vs_plain.py [--rounds 5] [--steps 100]

Both run params.yaml's network, batch and thread count (train.cpus_per_worker) on the same
random batch, the same kernels (reproducibility.cpu_kernels) and the same timed loop; the worker
is a one-worker TorchTrainer with the stage's own backend (pipelines.worker.torch_config) and
resources, on a local cluster of the stage's size. The two alternate round by round so that load
from other work hits both alike; the script prints every round, the per-round ratio and the
median ratio, and what each side saw of its threads and environment (OMP/MKL variables, CPU
affinity), the usual suspects when a worker is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")


def timed_steps(steps: int) -> dict:
    """Images per second of `steps` training steps after 3 warm-up ones, and what the process
    saw of its threads."""
    import torch

    from ddpm.training import Trainer
    from pipelines.params import load_params_file

    params = load_params_file(REPO / "params.yaml")
    torch.set_num_threads(params.train.cpus_per_worker)
    trainer = Trainer.from_config(params.model_config(), params.diffusion, params.train_config())
    shape = (params.train.batch_size, params.channels, params.image_size, params.image_size)
    batch = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for _ in range(3):
        trainer.train_step(batch)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    return {
        "images_per_s": steps * shape[0] / (time.perf_counter() - started),
        "threads": torch.get_num_threads(),
        "affinity": len(os.sched_getaffinity(0)),
        "env": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }


def plain(steps: int, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--plain", str(steps)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_worker(steps: int) -> dict:
    """The same loop in a one-worker TorchTrainer, as the train stage starts it."""
    import tempfile

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.params import load_params_file
    from pipelines.worker import torch_config

    params = load_params_file(REPO / "params.yaml")

    def loop(config: dict) -> None:
        # Train V2 keeps the metrics of reports that carry a checkpoint: an empty one.
        with tempfile.TemporaryDirectory() as empty:
            ray.train.report(
                {"result": json.dumps(timed_steps(config["steps"]))},
                checkpoint=ray.train.Checkpoint.from_directory(empty),
            )

    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(
            loop,
            train_loop_config={"steps": steps},
            torch_config=torch_config(),
            scaling_config=ScalingConfig(
                num_workers=1, resources_per_worker={"CPU": params.train.cpus_per_worker}
            ),
            run_config=RunConfig(storage_path=storage, name="worker-vs-plain"),
        ).fit()
    return json.loads(result.metrics["result"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    # 100 steps (~14 s here): 20 measured the worker's first seconds, while the actors Ray Train
    # starts beside it (its controller's preemption watcher, dataset manager) still import.
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plain", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(timed_steps(args.plain)))
        return
    import ray

    from pipelines import cluster, kernels
    from pipelines.params import load_params_file

    params = load_params_file(REPO / "params.yaml")
    kernels.pin_this_process(params)
    cluster.init_ray(params, "worker-vs-plain")
    ratios = []
    try:
        for index in range(args.rounds):
            alone = plain(args.steps, kernels.kernel_env(params))
            worker = in_worker(args.steps)
            ratios.append(worker["images_per_s"] / alone["images_per_s"])
            print(
                f"round {index + 1}: plain {alone['images_per_s']:.1f} img/s, worker "
                f"{worker['images_per_s']:.1f} img/s, ratio {ratios[-1]:.3f}",
                flush=True,
            )
    finally:
        ray.shutdown()
    for name, seen in (("plain", alone), ("worker", worker)):
        print(f"{name}: {seen['threads']} threads, {seen['affinity']} CPUs, {seen['env']}")
    print(f"median worker / plain over {args.rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
