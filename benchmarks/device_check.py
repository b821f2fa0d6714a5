"""Check and time the fast path in one call: on a GPU machine, the CUDA test subset and the
speed table; on a CPU, the same at small sizes (CI runs it so).

    .venv/bin/python benchmarks/device_check.py             # CUDA when present, else CPU mode
    .venv/bin/python benchmarks/device_check.py --cpu       # CPU mode on any machine
    .venv/bin/python benchmarks/device_check.py --skip-tests --max-seconds 10

It prints, in order:

1. `pytest -m gpu`: a bf16 and a compiled training step against fp32, scaled-dot-product
   attention against its explicit form, a training step without a host sync, a 1-GPU Ray Train
   run over NCCL, and the Gaussian oracle sampled on the device (each on every device present;
   the CUDA-only ones skip on a CPU);
2. one table for the paper's CIFAR-10 U-Net (35.7M parameters, 32x32x3): training img/s for each
   fast-path setting of `ddpm.Trainer` (the pipeline's own step: Adam, clipping, EMA) and for
   diffusers' UNet2DModel in the same layout through the same step, with achieved TFLOP/s (3x
   the forward FLOPs per image, torch's FlopCounterMode), MFU against the device's dense bf16
   peak, and peak memory; sampling image-steps/s (`ddpm.sample`, respaced ancestral, noise drawn
   on the device); FID Inception-v3 features img/s (random weights: the real ones cannot be
   downloaded here, and speed does not depend on them); the ratios to diffusers; the projected
   wall time of the paper's 800k x 128 training run and of 50,000 samples x 1,000 steps.

Exits 1 when the test subset fails. The GPU sizes fit one H100/H200 in about 6 minutes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_unet import forward_flops  # noqa: E402
from ddpm import DiffusionConfig, ModelConfig, TrainConfig, Trainer  # noqa: E402
from ddpm.sampling import fast_network, sample  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first
# name found in torch.cuda.get_device_name() counts.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
PAPER_STEPS, PAPER_BATCH = 800_000, 128
PAPER_SAMPLES, PAPER_T = 50_000, 1000
TARGETS = {"train_img_s": 8000.0, "sample_img_steps_s": 30000.0, "vs_diffusers": 1.3}


@dataclasses.dataclass(frozen=True)
class Sizes:
    train_batch: int
    sample_batches: tuple[int, ...]
    sample_steps: int
    inception_batch: int
    iters: int
    warmup: int


GPU_SIZES = Sizes(128, (256, 1024), 20, 250, iters=30, warmup=3)
# On 2 CPU cores one cifar10 training image takes ~0.2 s: batches that keep the run to about a
# minute (one sampling batch: the CPU mode checks that every row runs, not how speed scales).
CPU_SIZES = Sizes(8, (8,), 2, 8, iters=2, warmup=1)


@dataclasses.dataclass
class Row:
    what: str
    img_s: float
    tflops: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    ratio: str = ""
    note: str = ""


def bf16_peak(device_name: str) -> float | None:
    for name, peak in BF16_PEAK_TFLOPS.items():
        if name in device_name:
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None  # the CPU has no per-run peak that excludes the rest of this process


def throughput(
    step: Callable[[], object],
    units_per_call: int,
    device: torch.device,
    sizes: Sizes,
    max_seconds: float,
) -> tuple[float, float, float | None]:
    """(units/s over the timed calls, seconds of the warm-up calls, peak GiB). The warm-up
    calls include compilation; the timed ones stop early once `max_seconds` have passed."""
    started = time.perf_counter()
    for _ in range(sizes.warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    reset_peak(device)
    started = time.perf_counter()
    done = 0
    while done < sizes.iters and (done == 0 or time.perf_counter() - started < max_seconds):
        step()
        done += 1
    synchronize(device)
    return units_per_call * done / (time.perf_counter() - started), warmup_seconds, peak_gib(device)


def train_config(precision: str, channels_last: bool, compile_: bool, tf32: bool) -> TrainConfig:
    # The paper's optimisation (Adam 2e-4, clip 1, EMA 0.9999), warm-up off so every timed step
    # is a full-lr one; fused Adam wherever CUDA is (auto).
    return TrainConfig(
        batch_size=1,  # the Trainer takes whatever batch it is given; the field is the run's
        lr=2e-4,
        warmup_steps=0,
        ema_decay=0.9999,
        precision=precision,
        channels_last=channels_last,
        compile=compile_,
        tf32=tf32,
    )


def ours_step(device: torch.device, config: TrainConfig, batch: int) -> Callable[[], object]:
    trainer = Trainer.from_config(
        ModelConfig("cifar10", 32, 3), DiffusionConfig(), config, seed=0, device=device
    )
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    if device.type == "cuda":
        x = x.pin_memory()  # as the pipeline's loader hands batches over
    return lambda: trainer.update(x)


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel as an ε(x_t, t) network for `ddpm.sample`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        from ddpm.convert import diffusers_unet_config

        config = diffusers_unet_config(ModelConfig("cifar10", 32, 3).build(seed=0).config)
        self.net = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        self.to(device)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def diffusers_step(
    device: torch.device, bf16: bool, channels_last: bool, batch: int
) -> Callable[[], object]:
    """diffusers' UNet2DModel in google/ddpm-cifar10-32's layout, through the same step as
    ours (L_simple, Adam, clipping, EMA), so the ratio compares the networks."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = DiffusersEps(device).to(memory_format=fmt).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=device.type == "cuda" or None)
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = (torch.rand(batch, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=fmt)
    alpha_bar = DiffusionConfig().build().alphas_cumprod.to(device, torch.float32)

    def step() -> object:
        t = torch.randint(0, 1000, (batch,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model(x_t, t)
        loss = (eps.float() - noise).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)
        return loss

    return step


@dataclasses.dataclass(frozen=True)
class Mode:
    """One fast-path setting; `reference` names the diffusers row it is compared with."""

    name: str
    precision: str
    channels_last: bool | None
    compile: bool | None
    tf32: bool | None
    reference: str


def training_modes(cuda: bool, args: argparse.Namespace) -> list[Mode]:
    if not cuda and not args.all_modes:
        # What runs well on a CPU: bf16 has no native kernels here (measured 0.1 img/s against
        # 1.5 for fp32 on 2 cores) and compiling takes minutes; --all-modes times them anyway.
        return [
            Mode("ours fp32 (auto here)", "fp32", False, False, False, "diffusers fp32"),
            Mode("ours fp32 + channels_last", "fp32", True, False, False, "diffusers fp32 + cl"),
        ]
    modes = [
        Mode("ours fp32", "fp32", False, False, False, "diffusers fp32"),
        Mode("ours bf16", "bf16", False, False, cuda, "diffusers bf16"),
        Mode("ours bf16 + channels_last", "bf16", True, False, cuda, "diffusers bf16 + cl"),
        Mode("ours bf16 + cl + compile", "bf16", True, True, cuda, "diffusers bf16 + cl"),
    ]
    if cuda:
        modes[1:1] = [Mode("ours fp32 + TF32", "fp32", False, False, True, "diffusers fp32")]
        auto = Mode("ours auto (the default)", "auto", None, None, None, "diffusers bf16 + cl")
        modes.append(auto)
    if not (cuda or args.compile_on_cpu):
        modes = [m for m in modes if not m.compile]
    return modes


def training_rows(device: torch.device, sizes: Sizes, args: argparse.Namespace) -> list[Row]:
    cuda = device.type == "cuda"
    peak = bf16_peak(torch.cuda.get_device_name(device)) if cuda else None
    # FLOPs do not depend on the device: counted once on the CPU (bench_unet's counter).
    model = ModelConfig("cifar10", 32, 3).build(seed=0).eval()
    gflops = 3 * sum(forward_flops(model, 32, 3).values()) / 1e9
    modes = training_modes(cuda, args)
    rows: list[Row] = []
    for m in modes:
        config = train_config(m.precision, m.channels_last, m.compile, m.tf32)
        step = ours_step(device, config, sizes.train_batch)
        rows.append(timed_training_row(m.name, step, device, sizes, args, gflops, peak))
    references: dict[str, Row] = {}
    for name in dict.fromkeys(m.reference for m in modes):
        bf16, channels_last = "bf16" in name, name.endswith("+ cl")
        step = diffusers_step(device, bf16, channels_last, sizes.train_batch)
        references[name] = timed_training_row(name, step, device, sizes, args, gflops, peak)
    for m, row in zip(modes, rows, strict=True):
        reference = references[m.reference]
        row.ratio = f"{row.img_s / reference.img_s:.2f}x {reference.what}"
    return rows + list(references.values())


def timed_training_row(what, step, device, sizes, args, gflops, peak) -> Row:
    started = time.perf_counter()
    img_s, warmup_s, memory = throughput(step, sizes.train_batch, device, sizes, args.max_seconds)
    print(f"  {what}: {img_s:.1f} img/s ({time.perf_counter() - started:.0f} s)", flush=True)
    tflops = gflops * img_s / 1e3
    return Row(
        what,
        img_s,
        tflops=tflops,
        mfu=tflops / peak if peak else None,
        peak_gib=memory,
        note=f"warm-up {warmup_s:.0f} s" if warmup_s > 20 else "",
    )


def sampling_rows(device: torch.device, sizes: Sizes, args: argparse.Namespace) -> list[Row]:
    """Image-steps/s of `ddpm.sample` with our U-Net in each mode, then with diffusers' network
    in the same loop and mode (the ratio compares the networks)."""
    cuda = device.type == "cuda"
    diffusion = DiffusionConfig().build()
    # (label, bf16, channels_last, compile); bf16 only where it has kernels (see training_modes)
    modes = [("fp32", False, False, False), ("fp32 + channels_last", False, True, False)]
    if cuda or args.all_modes:
        modes.append(("bf16 + channels_last", True, True, False))
    if cuda or args.compile_on_cpu:
        modes.append(("bf16 + channels_last + compile", True, True, True))
    rows = []
    for batch in sizes.sample_batches:
        for label, bf16, channels_last, compile_ in modes:
            pair = []
            for whose in ("ours", "diffusers"):
                if whose == "ours":
                    model = ModelConfig("cifar10", 32, 3).build(seed=0).to(device)
                else:
                    model = DiffusersEps(device)
                # The sample stage's own switch (sample.precision / channels_last / compile):
                # the network in bf16, the sampler's arithmetic in fp32.
                network = fast_network(
                    model.eval(), bf16=bf16, channels_last=channels_last, compile=compile_
                )
                generator = torch.Generator(device=device).manual_seed(0)

                def draw(network=network, batch=batch, generator=generator) -> object:
                    return sample(
                        diffusion,
                        network,
                        (batch, 3, 32, 32),
                        num_steps=sizes.sample_steps,
                        generator=generator,
                        device=device,
                    )

                rate, warmup_s, memory = throughput(
                    draw, batch * sizes.sample_steps, device, sizes, args.max_seconds
                )
                note = f"warm-up {warmup_s:.0f} s" if warmup_s > 20 else ""
                what = f"{whose} sample {label}, batch {batch}"
                print(f"  {what}: {rate:.1f} image-steps/s", flush=True)
                pair.append(Row(what, rate, peak_gib=memory, note=note))
            pair[0].ratio = f"{pair[0].img_s / pair[1].img_s:.2f}x diffusers"
            rows += pair
    return rows


def inception_row(device: torch.device, sizes: Sizes, args: argparse.Namespace) -> Row:
    from ddpm.metrics.inception import FIDInceptionV3

    net = FIDInceptionV3().to(device).eval()
    images = torch.rand(sizes.inception_batch, 3, 32, 32, device=device) * 2 - 1

    def features() -> object:
        with torch.no_grad():
            return net(images)

    rate, _, memory = throughput(features, sizes.inception_batch, device, sizes, args.max_seconds)
    return Row(
        f"FID Inception-v3 features, batch {sizes.inception_batch} (fp32)",
        rate,
        peak_gib=memory,
        note="random weights: same speed",
    )


def fmt(value: float | None, spec: str) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else spec % value
    )


def print_table(title: str, unit: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    header = f"{'':48} {unit:>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}  vs diffusers / note"
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = "; ".join(x for x in (r.ratio, r.note) if x)
        mfu = fmt(None if r.mfu is None else 100 * r.mfu, "%.1f%%")
        print(
            f"{r.what:48} {fmt(r.img_s, '%.2f'):>12} {fmt(r.tflops, '%.2f'):>8} {mfu:>6} "
            f"{fmt(r.peak_gib, '%.2f'):>9}  {extra}"
        )


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def summary(device: torch.device, train: list[Row], sampling: list[Row]) -> None:
    ours = [r for r in train if r.what.startswith("ours") and not math.isnan(r.img_s)]
    best = max(ours, key=lambda r: r.img_s)
    diffusers = [r for r in train if r.what.startswith("diffusers")]
    best_sampling = max((r for r in sampling if r.what.startswith("ours")), key=lambda r: r.img_s)
    run_s = PAPER_STEPS * PAPER_BATCH / best.img_s
    print(f"\nfastest training: {best.what}, {best.img_s:.1f} img/s")
    for reference in diffusers:
        print(
            f"  {best.img_s / reference.img_s:.2f}x {reference.what} ({reference.img_s:.1f} img/s)"
        )
    print(
        f"paper's {PAPER_STEPS:,} x {PAPER_BATCH} run: {hours(run_s)} on one such device, "
        f"{hours(run_s / 8)} on 8 (linear scaling assumed, not measured)"
    )
    print(
        f"fastest sampling: {best_sampling.what}, {best_sampling.img_s:.0f} image-steps/s: "
        f"{PAPER_SAMPLES:,} samples x {PAPER_T:,} steps in "
        f"{hours(PAPER_SAMPLES * PAPER_T / best_sampling.img_s)}"
    )
    # Fastest against fastest: each side with whatever setting suits it best on this device.
    checks = [
        ("x diffusers per training step", best.img_s / max(r.img_s for r in diffusers)),
        (
            "x diffusers per sampling step",
            best_sampling.img_s / max(r.img_s for r in sampling if r.what.startswith("diffusers")),
        ),
    ]
    targets = [TARGETS["vs_diffusers"], TARGETS["vs_diffusers"]]
    if device.type == "cuda":
        checks += [("training img/s", best.img_s), ("sampling image-steps/s", best_sampling.img_s)]
        targets += [TARGETS["train_img_s"], TARGETS["sample_img_steps_s"]]
    for (name, value), target in zip(checks, targets, strict=True):
        verdict = "met" if value >= target else "NOT met"
        print(f"target {name} >= {target:g}: {value:.2f} ({verdict})")


def run_test_subset(timeout: float) -> int:
    print(f"$ {sys.executable} -m pytest -q -m gpu tests", flush=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"the gpu test subset ran past {timeout:.0f} s", flush=True)
        return 1
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists")
    parser.add_argument("--skip-tests", action="store_true", help="only the table")
    parser.add_argument("--max-seconds", type=float, default=None, help="per timed row")
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="time torch.compile on the CPU too (minutes)"
    )
    parser.add_argument(
        "--all-modes", action="store_true", help="bf16 rows on a CPU too (each takes minutes)"
    )
    parser.add_argument("--tests-timeout", type=float, default=300.0, help="seconds")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    sizes = GPU_SIZES if cuda else CPU_SIZES
    if args.max_seconds is None:
        args.max_seconds = 15.0 if cuda else 10.0
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    print(
        f"device: {name} ({'CUDA ' + torch.version.cuda if cuda else 'CPU mode'}); torch "
        f"{torch.__version__}; {torch.get_num_threads()} CPU threads of {os.cpu_count()}; "
        f"dense bf16 peak {fmt(bf16_peak(name) if cuda else None, '%.0f')} TFLOP/s",
        flush=True,
    )
    started = time.perf_counter()
    tests_failed = False
    if not args.skip_tests:
        tests_failed = run_test_subset(args.tests_timeout) != 0
        print(f"gpu test subset: {'FAILED' if tests_failed else 'passed'}", flush=True)

    train = training_rows(device, sizes, args)
    print_table(
        f"training, cifar10 U-Net, batch {sizes.train_batch} (Adam + clip + EMA per step)",
        "img/s",
        train,
    )
    sampling = sampling_rows(device, sizes, args)
    sampling.append(inception_row(device, sizes, args))
    print_table(
        f"sampling ({sizes.sample_steps} respaced ancestral steps per call) and FID features",
        "img(-step)/s",
        sampling,
    )
    summary(device, train, sampling[:-1])
    print(f"\ndevice check: {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
