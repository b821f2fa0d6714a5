"""The fast training path (ddpm.training.FastPath): what "auto" picks on each device, and that
every switch computes what the plain fp32 path computes, within the precision it trades.

Tests marked `gpu` run on every device present (the `device` fixture) and form the CUDA subset
that benchmarks/device_check.py runs first on a GPU machine (`pytest -m gpu`); here they run on
the CPU, and their CUDA cases skip.
"""

import copy
import math

import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, ModelConfig, TrainConfig, Trainer
from ddpm.sampling import SamplerConfig, draw_images, fast_network
from ddpm.training import FastPath, Hook, fit


def _trainer(device="cpu", **switches) -> Trainer:
    return Trainer.from_config(
        ModelConfig("tiny", 16, 1),
        DiffusionConfig(num_timesteps=100),
        TrainConfig(batch_size=8, warmup_steps=0, lr=1e-3, **switches),
        seed=0,
        device=device,
    )


def _batch(n=8) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_auto_is_the_plain_path_on_the_cpu_and_the_fast_one_on_cuda():
    assert FastPath.resolve(TrainConfig(), "cpu") == FastPath(False, False, False, False, False)
    cuda = FastPath.resolve(TrainConfig(), "cuda")
    assert cuda.channels_last and cuda.compile and cuda.fused_adam and cuda.tf32
    # bf16 where the GPU has it (a machine without CUDA reports none).
    assert cuda.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # Every switch can be forced either way, except what the device cannot do.
    forced = TrainConfig(precision="fp32", channels_last=False, compile=False, tf32=False)
    assert FastPath.resolve(forced, "cuda") == FastPath(False, False, False, True, False)
    assert FastPath.resolve(TrainConfig(channels_last=True, precision="bf16"), "cpu").bf16
    with pytest.raises(ValueError, match="train.fused_adam: true needs a CUDA device"):
        FastPath.resolve(TrainConfig(fused_adam=True), "cpu")
    with pytest.raises(ValueError, match="channels_last: must be true, false or null"):
        TrainConfig(channels_last="yes")
    with pytest.raises(ValueError, match="precision: got 'fp16'; allowed: 'fp32', 'bf16', 'auto'"):
        TrainConfig(precision="fp16")


@pytest.mark.gpu
def test_bf16_step_stays_within_bf16_precision_of_fp32(device):
    # The zero-initialised output conv makes the first loss exactly E[eps^2] in any precision;
    # the gradient flows back through every bf16 activation, so compare that, then 3 updates.
    fp32, bf16 = _trainer(device, precision="fp32"), _trainer(device, precision="bf16")
    assert bf16.fast.bf16 and not fp32.fast.bf16
    x = _batch()
    a, b = fp32.train_step(x), bf16.train_step(x)
    assert b["grad_norm"] != a["grad_norm"]  # the network really ran in bf16...
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.05)  # ...to ~3 digits
    for _ in range(2):
        a, b = fp32.train_step(x), bf16.train_step(x)
    assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    # Adam moves every weight by ~lr per step, so 3 steps differ by well under 3 * lr.
    drift = max(
        (p - q).abs().max().item()
        for p, q in zip(fp32.model.parameters(), bf16.model.parameters(), strict=True)
    )
    assert 0 < drift < 3e-3


@pytest.mark.gpu
def test_channels_last_step_equals_the_contiguous_one(device):
    plain, fast = _trainer(device, channels_last=False), _trainer(device, channels_last=True)
    assert fast.fast.channels_last and not plain.fast.channels_last
    # A 3x3 convolution with several input channels (where the two layouts differ).
    conv = next(p for p in fast.model.parameters() if p.ndim == 4 and min(p.shape[1:]) > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = _batch()
    for _ in range(3):
        a, b = plain.train_step(x), fast.train_step(x)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    for p, q in zip(plain.ema.model.parameters(), fast.ema.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling on the CPU takes minutes")
def test_compiled_step_equals_the_eager_one():
    eager, compiled = _trainer("cuda", compile=False), _trainer("cuda", compile=True)
    x = _batch()
    for _ in range(3):
        a, b = eager.train_step(x), compiled.train_step(x)
        # Inductor fuses and reorders fp32 reductions (and uses TF32 under auto): ~1e-3.
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
def test_a_training_step_never_waits_for_the_gpu():
    trainer = _trainer("cuda")
    x = _batch().pin_memory()
    trainer.update(x)  # the first step may compile and allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = trainer.update(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(out["loss"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device")
def test_one_gpu_ray_train_run_over_nccl(tmp_path):
    """The pipeline's way to train (Ray Train, DDP through prepare_model) on one GPU with the
    NCCL backend and the fast path's defaults."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop() -> None:
        trainer = Trainer.from_config(
            ModelConfig("tiny", 16, 1),
            DiffusionConfig(num_timesteps=100),
            TrainConfig(batch_size=8, warmup_steps=0),
            seed=0,
            device=ray.train.torch.get_device(),
            wrap=ray.train.torch.prepare_model,
        )
        for _ in range(3):
            out = trainer.train_step(_batch())
        ray.train.report(
            {
                "loss": out["loss"],
                "on_cuda": int(trainer.device.type == "cuda"),
                "nccl": int(torch.distributed.get_backend() == "nccl"),
                "bf16": int(trainer.fast.bf16),
            }
        )

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        result = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
            torch_config=TorchConfig(backend="nccl"),
            run_config=RunConfig(name="nccl", storage_path=str(tmp_path)),
        ).fit()
    finally:
        ray.shutdown()
    assert result.metrics["on_cuda"] == 1 and result.metrics["nccl"] == 1
    assert result.metrics["bf16"] == int(torch.cuda.is_bf16_supported())
    assert 0.1 < result.metrics["loss"] < 3.0


class _StrictFromFirstCall(torch.nn.Module):
    """The wrapped network, turning CUDA's sync check to "error" at its first call: what runs
    after that, the sampling loop, fails on any host sync; the set-up before it may sync."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        torch.cuda.set_sync_debug_mode("error")
        return self.inner(x, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_a_sampling_loop_never_waits_for_the_gpu(generator_device, method):
    """No step of the loop waits for the GPU, also with the pipeline's CPU generator (its
    noise goes over from pinned memory)."""
    from ddpm.sampling import sample

    model = _StrictFromFirstCall(_trainer("cuda").ema.model)
    generator = torch.Generator(device=generator_device).manual_seed(0)
    eta = 1.0 if method == "ddim" else 0.0
    try:
        x = sample(
            DiffusionConfig(num_timesteps=100).build(),
            model,
            (4, 1, 16, 16),
            method=method,
            num_steps=5,
            eta=eta,
            generator=generator,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.device.type == "cuda" and bool(torch.isfinite(x).all())


def test_fit_finds_a_non_finite_gradient_at_its_step_within_the_window():
    """fit reads losses and norms once per window; a NaN in the middle of one is still named
    with its own step, and no hook sees the window."""
    trainer = _trainer()
    good = _batch()
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    seen = []
    with pytest.raises(FloatingPointError, match="non-finite gradient norm nan at step 3 "):
        fit(
            trainer,
            iter([good, good, good, bad, good, good]),
            steps=6,
            log_every=6,
            hooks=[Hook(lambda t, w: seen.append(w.step))],
        )
    assert seen == [] and trainer.step == 6
    # train_step reads at once: the same error names the step it just took.
    with pytest.raises(FloatingPointError, match="at step 0 "):
        _trainer().train_step(bad)


def test_fit_reports_the_time_it_waited_for_batches():
    import time

    def slow(batch):
        while True:
            time.sleep(0.05)
            yield batch

    windows = []
    fit(
        _trainer(),
        slow(_batch()),
        steps=4,
        log_every=2,
        hooks=[Hook(lambda t, w: windows.append(w))],
    )
    assert [w.step for w in windows] == [2, 4]
    for w in windows:
        # Two 50 ms waits per window, inside the window's wall time.
        assert 0.1 <= w.data_seconds < w.seconds


@pytest.mark.gpu
def test_sampling_network_switches_draw_the_same_images_within_their_precision(device):
    """ddpm.sampling.fast_network, what the sample stage calls with sample.precision /
    channels_last / compile: the same images from the same noise, to the rounding of each."""
    model = _trainer(device).model
    with torch.no_grad():  # an untrained U-Net's output conv is zero: give it something to say
        gen = torch.Generator().manual_seed(2)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen).to(device))
    model.eval()
    diffusion = DiffusionConfig(num_timesteps=100).build().copy_to(device)

    def draw(network) -> np.ndarray:
        return draw_images(
            diffusion,
            network,
            16,
            (1, 16, 16),
            SamplerConfig(num_steps=10),
            batch_size=16,
            generator=torch.Generator().manual_seed(0),
            device=device,
        ).astype(np.int64)

    plain = draw(model)
    layout = draw(fast_network(copy.deepcopy(model), channels_last=True))
    bf16 = draw(fast_network(copy.deepcopy(model), bf16=True))
    assert plain.std() > 10  # images, not a constant
    # Another memory layout is the same arithmetic up to summation order: one level at most.
    assert np.abs(layout - plain).max() <= 1
    # bf16 changes pixels (the switch is on), by little on average.
    error = np.abs(bf16 - plain)
    assert error.max() > 0 and error.mean() < 1.0  # measured on the CPU: 0.21, max 3
    if device.type == "cuda":  # compiling on a CPU takes minutes (device_check --compile-on-cpu)
        compiled = fast_network(copy.deepcopy(model), bf16=True, channels_last=True, compile=True)
        assert np.abs(draw(compiled) - plain).mean() < 2.0
