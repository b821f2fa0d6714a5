"""What portable CPU kernels cost (a script, not a test): the default network's training step
under native and under portable (AVX2-capped) kernels, side by side.

    .venv/bin/python benchmarks/kernels_cost.py [--rounds 3] [--steps 20]

Each measurement is a fresh process (both libraries choose their kernels once per process), the
two kinds alternate round by round so that load from other work hits both alike, and the median
of the rounds is printed with every round's figure. The network, batch and thread count are
params.yaml's train stage (model.overrides, train.batch_size, train.cpus_per_worker).
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
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def measure(steps: int) -> dict:
    """Images per second of `steps` training steps of the default network, after 3 warm-up."""
    import torch

    from ddpm.training import Trainer
    from pipelines.params import load_params_file

    params = load_params_file(REPO / "params.yaml")
    torch.set_num_threads(params.train.cpus_per_worker)
    trainer = Trainer.from_config(params.model_config(), params.diffusion, params.train_config())
    shape = (params.train.batch_size, params.channels, params.image_size, params.image_size)
    batch = torch.rand(shape) * 2 - 1
    for _ in range(3):
        trainer.train_step(batch)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    seconds = time.perf_counter() - started
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "images_per_s": steps * shape[0] / seconds,
    }


def run_one(kind: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE}
    if kind == "portable":
        env.update(PORTABLE)
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(steps)],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    figures: dict[str, list[float]] = {"native": [], "portable": []}
    capability = {}
    for _ in range(args.rounds):
        for kind in figures:
            result = run_one(kind, args.steps)
            figures[kind].append(result["images_per_s"])
            capability[kind] = result["capability"]
    for kind, values in figures.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{kind:9s} ({capability[kind]}): median {statistics.median(values):.1f} img/s "
            f"(rounds: {rounds})"
        )
    ratio = statistics.median(figures["portable"]) / statistics.median(figures["native"])
    print(f"portable / native: {ratio:.3f}")


if __name__ == "__main__":
    main()
