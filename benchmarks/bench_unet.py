"""Size and speed of the U-Net configs on this machine (a script, not a test).

    .venv/bin/python benchmarks/bench_unet.py [--configs cifar10 small] [--iters 5]

Prints per config: parameters; forward GFLOPs per image from torch's FlopCounterMode, which
counts a multiply-add as 2 FLOPs (split into convolutions, attention matmuls and dense layers);
training img/s for forward + backward + Adam step on an L_simple-shaped loss; and sampling img/s
for one denoising step (a forward pass under no_grad), all at the same batch size.

The "about 12.1 GFLOPs" often quoted for the CIFAR-10 net is its convolutions alone (at 2 FLOPs
per multiply-add); the attention matmuls add about 0.34 more, which this script shows separately.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm.nn import build_unet

# name -> (image_size, in_channels, batch): cifar10 as in the paper, small on MNIST-sized digits.
BENCHES = {"cifar10": (32, 3, 8), "small": (28, 1, 64), "tiny": (28, 1, 64)}


def forward_flops(model: torch.nn.Module, size: int, channels: int) -> dict[str, float]:
    """FLOPs of one image's forward pass, by aten op."""
    x = torch.zeros(1, channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500]))
    return {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}


def images_per_second(step, batch: int, warmup: int, iters: int, max_seconds: float) -> float:
    """Throughput over up to `iters` timed steps, stopping early once `max_seconds` have passed."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    done = 0
    while done < iters and (done == 0 or time.perf_counter() - start < max_seconds):
        step()
        done += 1
    return batch * done / (time.perf_counter() - start)


def bench(name: str, warmup: int, iters: int, max_seconds: float) -> None:
    size, channels, batch = BENCHES[name]
    model = build_unet(name, image_size=size, in_channels=channels, seed=0)
    flops = forward_flops(model.eval(), size, channels)
    total = sum(flops.values())
    by_kind = ", ".join(f"{op.removeprefix('aten.')} {n / 1e9:.3f}" for op, n in flops.items())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g)
    noise = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        (model(x, t) - noise).square().mean().backward()
        opt.step()

    def sample_step():
        with torch.no_grad():
            model(x, t)

    model.train()
    train_ips = images_per_second(train_step, batch, warmup, iters, max_seconds)
    model.eval()
    sample_ips = images_per_second(sample_step, batch, warmup, iters, max_seconds)

    print(f"== {name}: {size}x{size}x{channels}, batch {batch}, config {model.config_dict()}")
    print(f"  parameters            {model.num_parameters():,}")
    print(f"  forward GFLOPs/image  {total / 1e9:.3f}  ({by_kind})")
    # A backward pass costs about twice the forward one, hence 3x forward FLOPs per train image.
    print(f"  train img/s           {train_ips:.2f}  (~{3 * total * train_ips / 1e9:.1f} GFLOP/s)")
    print(f"  sample img/s per step {sample_ips:.2f}  (~{total * sample_ips / 1e9:.1f} GFLOP/s)")


def load_average() -> str:
    # Other processes on a shared machine slow every figure; the load average says how much.
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["cifar10", "small"], choices=BENCHES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=15.0, help="per timed measurement")
    # On a CPU shared with other jobs, one thread can beat two: OpenMP workers spin-wait for a
    # core that another process holds.
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.warmup < 0 or args.iters < 1:
        parser.error(f"need --warmup >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs")
    print(f"load average before: {load_average()}")
    for name in args.configs:
        bench(name, args.warmup, args.iters, args.max_seconds)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
