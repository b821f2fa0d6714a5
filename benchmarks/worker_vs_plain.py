"""The training step inside the train stage's Ray Train worker against a plain process, side by
side (a script, not a test).

    .venv/bin/python benchmarks/worker_vs_plain.py [--rounds 5] [--pairs 10] [--chunk 10]

Both run params.yaml's network, batch and thread count (train.cpus_per_worker) on the same
random batch, with the same kernels (reproducibility.cpu_kernels) and the same timed loop; the
worker is a one-worker TorchTrainer with the stage's own backend (pipelines.worker.torch_config)
and resources, on a local cluster of the stage's size.

Each round starts a fresh plain process and a fresh worker, and the two take turns: the script
asks one for `--chunk` timed steps, then the other, in the order ABBA, `--pairs` times. Whole
runs of one side and then the other, as this script first did, put seconds between the two
measurements, and this machine's speed drifts by ±10% over seconds, which was most of the spread
between its rounds (0.82 to 1.17); turns of about a second see the same drift and the same
load. Fresh processes each round, because a process keeps its speed for its life but the next
one may differ by as much. Between turns the script reads every process's CPU seconds, so each
round also says what else ran while each side was timed (Ray's daemons, Ray Train's controller
actors); at the end, what each side saw of its threads, environment and niceness (Ray starts
its workers at niceness 15, `RAY_worker_niceness`; the plain process runs at the script's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")
# Bound on every wait: a side's start (a Ray worker imports torch on a busy 2-core box) and a turn.
WAIT_S = 600


def serve_turns(address: tuple[str, int], side: str) -> dict:
    """Connect to the script, then time as many training steps as each turn asks for, until told
    to stop; return what this process saw of its threads."""
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
    with socket.create_connection(address, timeout=WAIT_S) as connection:
        stream = connection.makefile("rw")
        stream.write(json.dumps({"side": side, "pid": os.getpid()}) + "\n")
        stream.flush()
        for line in stream:
            steps = json.loads(line)["steps"]
            if steps == 0:
                break
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(batch)
            stream.write(
                json.dumps({"images_per_s": steps * shape[0] / (time.perf_counter() - started)})
                + "\n"
            )
            stream.flush()
    return {
        "threads": torch.get_num_threads(),
        "affinity": len(os.sched_getaffinity(0)),
        "niceness": os.nice(0),
        "env": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }


def worker_fit(address: tuple[str, int]) -> dict:
    """`serve_turns` in a one-worker TorchTrainer, started as the train stage starts its own."""
    import tempfile

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.params import load_params_file
    from pipelines.worker import torch_config

    params = load_params_file(REPO / "params.yaml")

    def loop(config: dict) -> None:
        seen = serve_turns(tuple(config["address"]), "worker")
        # Train V2 keeps the metrics of reports that carry a checkpoint: an empty one.
        with tempfile.TemporaryDirectory() as empty:
            ray.train.report(
                {"result": json.dumps(seen)},
                checkpoint=ray.train.Checkpoint.from_directory(empty),
            )

    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(
            loop,
            train_loop_config={"address": list(address)},
            torch_config=torch_config(),
            scaling_config=ScalingConfig(
                num_workers=1, resources_per_worker={"CPU": params.train.cpus_per_worker}
            ),
            run_config=RunConfig(storage_path=storage, name="worker-vs-plain"),
        ).fit()
    return json.loads(result.metrics["result"])


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's label and CPU seconds so far."""
    import psutil

    seen = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            seen[proc.pid] = (process_label(proc.info), times.user + times.system)
    return seen


def process_label(info: dict) -> str:
    """Ray's processes by role (`ray::TrainController`, raylet, gcs_server, ...), others by name."""
    for word in info["cmdline"] or []:
        for role in ("ray::", "raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env"):
            if role in word:
                return Path(word).name.split(".")[0] if role != "ray::" else word.split(".")[0]
    return info["name"] or "?"


class Turns:
    """The script's side of the turns: both sides connected, it asks each for its turns and adds
    up, per side, the images per second and what other processes used meanwhile."""

    def __init__(self, listener: socket.socket) -> None:
        self.streams = {}
        self.pids = {}
        for _ in range(2):
            connection, _ = listener.accept()
            connection.settimeout(WAIT_S)
            stream = connection.makefile("rw")
            hello = json.loads(stream.readline())
            self.streams[hello["side"]], self.pids[hello["side"]] = stream, hello["pid"]

    def turn(self, side: str, steps: int, others: dict[str, float]) -> float:
        """One side's `steps` steps: its images per second; adds to `others` the CPU seconds every
        other process used meanwhile, by label."""
        before = cpu_seconds()
        stream = self.streams[side]
        stream.write(json.dumps({"steps": steps}) + "\n")
        stream.flush()
        speed = json.loads(stream.readline())["images_per_s"]
        for pid, (label, cpu) in cpu_seconds().items():
            if pid not in self.pids.values() and cpu > before.get(pid, (label, 0.0))[1]:
                others[label] = others.get(label, 0.0) + cpu - before.get(pid, (label, 0.0))[1]
        return speed

    def stop(self) -> None:
        for stream in self.streams.values():
            stream.write(json.dumps({"steps": 0}) + "\n")
            stream.flush()


def run_round(turns: Turns, pairs: int, chunk: int, batch: int) -> float:
    """`pairs` turns of each side, ABBA; prints both sides' speeds and what else ran meanwhile;
    returns worker / plain."""
    speeds: dict[str, list[float]] = {"plain": [], "worker": []}
    others: dict[str, dict[str, float]] = {"plain": {}, "worker": {}}
    for pair in range(pairs):
        for side in ("plain", "worker") if pair % 2 == 0 else ("worker", "plain"):
            speeds[side].append(turns.turn(side, chunk, others[side]))
    # Same steps per turn, so the harmonic mean is the speed over the round's total time.
    speed = {side: statistics.harmonic_mean(speeds[side]) for side in speeds}
    print(
        f"plain {speed['plain']:.1f} img/s, worker {speed['worker']:.1f} img/s, "
        f"ratio {speed['worker'] / speed['plain']:.3f}",
        flush=True,
    )
    for side in speeds:
        seconds = pairs * chunk * batch / speed[side]
        top = sorted(others[side].items(), key=lambda item: -item[1])[:5]
        listed = ", ".join(f"{label} {used / seconds:.3f}" for label, used in top)
        total = sum(others[side].values()) / seconds
        print(f"  while {side} ran, others used {total:.3f} CPU: {listed}", flush=True)
    return speed["worker"] / speed["plain"]


def one_round(params, pairs: int, chunk: int) -> tuple[float, dict[str, dict]]:
    """A fresh plain process and a fresh worker (a process's speed holds for its lifetime but
    differs from one process to the next), taking turns: worker / plain and what each saw."""
    from pipelines import kernels

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    address = listener.getsockname()[:2]
    plain = subprocess.Popen(
        [sys.executable, __file__, "--serve", f"{address[0]}:{address[1]}"],
        # The variable Ray gives the worker (its CPUs), so the threads' setting is one.
        env={
            **os.environ,
            **kernels.kernel_env(params),
            "OMP_NUM_THREADS": str(params.train.cpus_per_worker),
            "PYTHONPATH": str(REPO),
        },
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, dict] = {}
    fitting = threading.Thread(target=lambda: seen.update(worker=worker_fit(address)))
    try:
        fitting.start()
        turns = Turns(listener)
        try:
            ratio = run_round(turns, pairs, chunk, params.train.batch_size)
        finally:
            turns.stop()
        fitting.join(timeout=WAIT_S)
        seen["plain"] = json.loads(plain.communicate(timeout=WAIT_S)[0].strip().splitlines()[-1])
    finally:
        listener.close()
        if plain.poll() is None:
            plain.kill()
    return ratio, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=10, help="turns of each side per round")
    parser.add_argument("--chunk", type=int, default=10, help="training steps per turn")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        host, port = args.serve.rsplit(":", 1)
        print(json.dumps(serve_turns((host, int(port)), "plain")))
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
            print(f"round {index + 1}: ", end="", flush=True)
            ratio, seen = one_round(params, args.pairs, args.chunk)
            ratios.append(ratio)
    finally:
        ray.shutdown()
    for name, what in seen.items():
        print(
            f"{name}: {what['threads']} threads, {what['affinity']} CPUs, niceness "
            f"{what['niceness']}, {what['env']}"
        )
    rounds = ", ".join(f"{ratio:.3f}" for ratio in ratios)
    print(f"worker / plain by round: {rounds}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
