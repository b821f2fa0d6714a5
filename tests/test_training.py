"""The training core: Algorithm 1 learns, resume is exact; warm-up, clipping, EMA, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.diffusion import DiffusionConfig
from ddpm.errors import CheckpointError
from ddpm.nn import ModelConfig
from ddpm.training import (
    EMA,
    FastPath,
    Hook,
    TrainConfig,
    Trainer,
    Window,
    ema_decay_at,
    export_ema,
    fit,
    load_checkpoint,
    load_ema_model,
    lr_at,
    save_checkpoint,
)

TINY16 = ModelConfig("tiny", image_size=16, in_channels=1)
LINEAR1000 = DiffusionConfig("linear", 1000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, torch's spinning OpenMP workers are ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits (0..16), upsampled to 16x16 and scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype("float32")).unsqueeze(1)
    images = images / 8.0 - 1.0
    return F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(-1, 1)


def _trainer(config: TrainConfig, model_config=TINY16, diffusion_config=LINEAR1000) -> Trainer:
    return Trainer.from_config(model_config, diffusion_config, config)


def _batches(data: torch.Tensor, batch: int, start_step: int):
    """In-memory batches as a pure function of the step: epoch e is a permutation seeded by e."""
    per_epoch = len(data) // batch
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        yield data[order[index * batch : (index + 1) * batch]]
        step += 1


def _run(trainer: Trainer, data: torch.Tensor, steps: int, batch: int, **kwargs) -> list[float]:
    """`steps` more updates through the library loop; their losses."""
    start = trainer.step
    fit(trainer, _batches(data, batch, start), steps=start + steps, log_every=10, **kwargs)
    return trainer.loss_history[start:]


def _nn_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Mean RMS-per-pixel distance from each sample to its nearest data image."""
    dist = torch.cdist(samples.flatten(1), data.flatten(1)) / math.sqrt(samples[0].numel())
    return dist.min(dim=1).values.mean().item()


def test_training_learns_digits(digits):
    """120 CPU steps cut L_simple well below its start; samples move toward the data."""
    from ddpm.sampling import sample

    config = TrainConfig(lr=2e-3, warmup_steps=20, ema_decay=0.99, ema_warmup=True)
    trainer = _trainer(config)
    untrained = copy.deepcopy(trainer.ema.model)
    losses = _run(trainer, digits, steps=120, batch=32)

    # The zero-initialised output conv predicts eps = 0 at first, so L_simple starts near
    # E[eps^2] = 1; a model that learned nothing stays there (measured: ~0.95 -> ~0.05).
    first, last = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert 0.8 < first < 1.2, first
    assert last < 0.3 * first, (first, last)

    def draw(model: nn.Module) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return sample(
            trainer.diffusion, model, (32, 1, 16, 16), method="ddim", num_steps=25, generator=gen
        )

    before, after = draw(untrained), draw(trainer.ema.model)
    # Nearest-neighbour distance to the digits (measured: ~1.17 untrained -> ~0.45; two
    # held-out digits are ~0.19 apart) and the pixel mean (data -0.39) both move toward the data.
    assert _nn_distance(after, digits) < 0.6 * _nn_distance(before, digits)
    data_mean = digits.mean().item()
    assert abs(after.mean().item() - data_mean) < 0.5 * abs(before.mean().item() - data_mean)


def test_resume_is_bit_exact(digits, tmp_path):
    """N steps, save, load into a fresh trainer, N more == 2N straight steps, bit for bit."""
    # Dropout on so that every random stream of a step is exercised.
    config = TrainConfig(steps=6, lr=1e-3, warmup_steps=3, ema_decay=0.9, ema_warmup=True)
    model_config = dataclasses.replace(TINY16, overrides={"dropout": 0.1})
    data = digits[:40]  # 16-image batches: step 2 crosses an epoch boundary

    straight = _trainer(config, model_config)
    straight_losses = _run(straight, data, steps=6, batch=16)

    first = _trainer(config, model_config)
    fit(first, _batches(data, 16, 0), log_every=2, stop_after=3)  # an interrupted run
    assert first.step == 3 and len(first.loss_history) == 3
    path = save_checkpoint(tmp_path / "ckpt.pt", first, meta={"note": "half-way"})
    torch.manual_seed(12345)  # disturb the global RNG: resuming must not depend on it
    second = _trainer(config, model_config)
    state = load_checkpoint(path)
    assert state["meta"] == {"note": "half-way"}
    second.load_state_dict(state)
    assert second.step == 3
    fit(second, _batches(data, 16, second.step), log_every=2)

    assert second.step == 6
    assert second.loss_history == straight_losses
    pairs = [
        (straight.model, second.model),
        (straight.ema.model, second.ema.model),
    ]
    for model_a, model_b in pairs:
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(a, b)
    state_a = straight.optimizer.state_dict()["state"]
    state_b = second.optimizer.state_dict()["state"]
    for key, value in state_a.items():
        assert torch.equal(value["exp_avg_sq"], state_b[key]["exp_avg_sq"])
    # The second half really changed the weights (the comparison is not of two frozen models).
    moved = [
        not torch.equal(a, b)
        for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True)
    ]
    assert any(moved)


def test_fit_closes_windows_at_every_interval_and_calls_due_hooks(digits):
    """Windows close at multiples of log_every and of each hook's interval, and at the end; a
    hook runs when its interval divides the step or the window is final; losses are reduced."""
    calls: dict[str, list[Window]] = {"every": [], "four": []}
    reduced: list[list[float]] = []

    def halve(losses: list[float]) -> list[float]:  # stands in for the mean over ranks
        reduced.append(losses)
        return [loss / 2 for loss in losses]

    trainer = _trainer(TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup_steps=0))
    hooks = [
        Hook(lambda tr, w: calls["four"].append(w), every=4),
        Hook(lambda tr, w: calls["every"].append(w)),
    ]
    fit(trainer, _batches(digits, 8, 0), log_every=3, hooks=hooks, reduce_losses=halve)

    assert [w.step for w in calls["every"]] == [3, 4, 6, 8, 9, 10]
    assert [w.step for w in calls["four"]] == [4, 8, 10]  # 10: the final window
    assert [w.first_step for w in calls["every"]] == [1, 4, 5, 7, 9, 10]
    assert [w.final for w in calls["every"]] == [False] * 5 + [True]
    window = calls["every"][1]
    assert window.images == 8 and len(window.losses) == len(window.stats) == 1
    assert set(window.stats[0]) == {"lr", "grad_norm", "ema_decay"}
    assert window.losses == [loss / 2 for loss in reduced[1]]
    # The history holds every step's reduced loss, in order, once.
    assert trainer.loss_history == [loss / 2 for chunk in reduced for loss in chunk]
    assert len(trainer.loss_history) == 10
    with pytest.raises(ValueError, match="intervals must be integers >= 1"):
        fit(trainer, _batches(digits, 8, 10), steps=12, hooks=[Hook(print, every=0)])


def test_warmup_lr_values_and_first_update_size(digits):
    """lr ramps linearly over warmup_steps, then holds; Adam's first update moves weights by ~lr."""
    assert [lr_at(s, 2e-4, 4) for s in range(6)] == pytest.approx(
        [5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4]
    )
    assert lr_at(0, 2e-4, 0) == 2e-4
    assert lr_at(4999, 2e-4, 5000) == pytest.approx(2e-4)

    trainer = _trainer(TrainConfig(lr=1e-2, warmup_steps=100, grad_clip=None))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train_step(digits[:8])
    assert out["lr"] == pytest.approx(1e-4)
    # Adam's bias-corrected first step is lr * g / (|g| + eps): at most lr, and exactly lr
    # (up to eps) for every weight with a clear gradient.
    delta = max(
        (p - b).abs().max().item() for p, b in zip(trainer.model.parameters(), before, strict=True)
    )
    assert delta == pytest.approx(1e-4, rel=1e-3)
    lrs = [trainer.train_step(digits[:8])["lr"] for _ in range(3)]
    assert lrs == pytest.approx([2e-4, 3e-4, 4e-4])


def test_gradient_clipping_bounds_the_global_norm(digits):
    """The reported norm is the pre-clip one; the gradients Adam sees have norm <= grad_clip."""
    free = _trainer(TrainConfig(grad_clip=None))
    out_free = free.train_step(digits[:8])
    norm_free = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in free.model.parameters() if p.grad is not None])
    ).item()
    assert out_free["grad_norm"] == pytest.approx(norm_free, rel=1e-5)

    clip = 0.05
    assert out_free["grad_norm"] > 4 * clip  # the bound below must actually bite
    clipped = _trainer(TrainConfig(grad_clip=clip))
    out = clipped.train_step(digits[:8])
    # Same seed, same batch, same init: the pre-clip norm is the unclipped run's.
    assert out["grad_norm"] == pytest.approx(out_free["grad_norm"], rel=1e-5)
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in clipped.model.parameters() if p.grad is not None])
    ).item()
    assert norm == pytest.approx(clip, rel=1e-4)


def test_ema_math_on_a_toy_parameter():
    model = nn.BatchNorm1d(1)  # one weight, one bias, and running-stat buffers
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    assert ema.update(model, step=0) == 0.9
    assert ema.model.weight.item() == pytest.approx(0.1)
    ema.update(model, step=1)
    assert ema.model.weight.item() == pytest.approx(0.19)  # 0.9 * 0.1 + 0.1 * 1
    assert ema.model.running_mean.item() == 5.0  # buffers are copied, not averaged
    assert not ema.model.weight.requires_grad

    warm = EMA(model, decay=0.9999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert warm.update(model, step=0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert warm.model.weight.item() == pytest.approx(0.1 * 1.0 + 0.9 * 3.0)
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999  # the ramp ends at the configured decay


def test_checkpoint_write_is_atomic(digits, tmp_path):
    """A write that fails half-way leaves the previous checkpoint intact and no temp files."""
    trainer = _trainer(TrainConfig())
    trainer.train_step(digits[:8])
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer)
    trainer.train_step(digits[:8])
    with pytest.raises(Exception, match="pickle|lambda|local object"):
        save_checkpoint(path, trainer, meta={"unpicklable": lambda: None})
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_ema_export_rebuilds_the_sampling_model(digits, tmp_path):
    trainer = _trainer(
        TrainConfig(ema_decay=0.5), diffusion_config=DiffusionConfig(num_timesteps=50)
    )
    for _ in range(2):
        trainer.train_step(digits[:8])
    for path in (
        export_ema(tmp_path / "ema.pt", trainer, meta={"git": "abc"}),
        save_checkpoint(tmp_path / "ckpt.pt", trainer, meta={"git": "abc"}),
    ):
        model, diffusion, meta = load_ema_model(path)
        assert meta["step"] == 2 and meta["git"] == "abc"
        assert diffusion.num_timesteps == 50 and not model.training
        for a, b in zip(model.parameters(), trainer.ema.model.parameters(), strict=True):
            assert torch.equal(a, b)
        x, t = digits[:2], torch.tensor([0, 49])
        assert torch.equal(model(x, t), trainer.ema.model(x, t))
    assert (tmp_path / "ema.pt").stat().st_size < (tmp_path / "ckpt.pt").stat().st_size / 2


def test_bad_input_is_named(tmp_path, digits):
    with pytest.raises(ValueError, match="precision: got 'fp16'; allowed: 'fp32', 'bf16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="lr: must be > 0, got 0.0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"ema_decay: must be in \[0, 1\), got 1.0"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="steps: must be an integer >= 1.*batch_size"):
        TrainConfig(steps=0, batch_size=2.5)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        load_ema_model(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt"):
        load_checkpoint(tmp_path / "other.pt")
    small = _trainer(TrainConfig(), diffusion_config=DiffusionConfig(num_timesteps=50))
    path = save_checkpoint(tmp_path / "ckpt.pt", small)
    with pytest.raises(ValueError, match="diffusion config"):
        _trainer(TrainConfig()).load_state_dict(load_checkpoint(path))


# What the helpers derived before ddpm.seeding held them (training.step_seed, sample.py's
# shard_seed, evaluate.py's _seed), computed from that code and written down: the committed run's
# batches, shards and bounds depend on these exact numbers.
PREVIOUS_SEEDS = [
    # step_seed(seed, rank, step): SeedSequence([0, seed, rank, step]), two words >> 1
    (("train.step", 0, 0, 0), [7896617691693857887, 6195319269190327588]),
    (("train.step", 0, 1, 5), [3881824213163636711, 1860967649008055710]),
    (("train.step", 1234, 3, 799999), [4493732102938773290, 195718916720208582]),
    # shard_seed(seed, index): SeedSequence([seed, index]), one word
    (("sample.shard", 0, 0), [15793235383387715774]),
    (("sample.shard", 0, 1), [5836529245451711556]),
    (("sample.shard", 42, 7), [10473664704035447458]),
    # shard_seed(seed, TRAJECTORY_STREAM = 2**32 - 1)
    (("sample.trajectory", 0), [11242580174151778725]),
    (("sample.trajectory", 42), [8673427385058477037]),
    # _seed(seed, stream, k): SeedSequence([seed, stream, k]), one word; streams 1, 2, 3
    (("evaluate.baseline", 0), [5836529245451711556]),
    (("evaluate.baseline", 42), [15658369528003122356]),
    (("evaluate.nll", 0, 0), [17195319236771816063]),
    (("evaluate.nll", 0, 3), [6236264003346805428]),
    (("evaluate.nll", 42, 5), [3852051259053367983]),
    (("evaluate.mc", 0), [6582426945856704739]),
    (("evaluate.mc", 42), [18141372322412330060]),
]


@pytest.mark.parametrize(("call", "expected"), PREVIOUS_SEEDS)
def test_seed_streams_give_the_previous_seeds(call, expected):
    from ddpm.seeding import derive_seed, derive_seeds

    stream, seed, *indices = call
    assert derive_seeds(seed, stream, *indices, count=len(expected)) == expected
    assert derive_seed(seed, stream, *indices) == expected[0]


def test_seed_streams_are_named_and_take_their_indices():
    from ddpm.seeding import derive_seed

    with pytest.raises(ValueError, match="unknown seed stream 'sample.shards'"):
        derive_seed(0, "sample.shards", 1)
    with pytest.raises(ValueError, match=r"'train.step' takes \(rank, step\), got 1"):
        derive_seed(0, "train.step", 1)
    # The step stream feeds torch.manual_seed, which takes a signed 64-bit value.
    assert all(
        derive_seed(seed, "train.step", 0, step) < 2**63 for seed in range(3) for step in range(50)
    )


@pytest.mark.parametrize("supported", [True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_one_precision_rule_for_training_and_sampling(precision, device, supported):
    """ddpm.precision.resolve_precision: auto is bf16 exactly on a CUDA device with bf16; bf16 is
    refused, by the setting's name, only on a CUDA device without it. Sampling's switches
    (ddpm.sampling.network_switches) follow the same rule as the Trainer's."""
    from ddpm.precision import resolve_precision
    from ddpm.sampling import network_switches

    cuda = device == "cuda"
    if precision == "bf16" and cuda and not supported:
        with pytest.raises(ValueError, match="sample.precision 'bf16' asked for, but CUDA device"):
            resolve_precision(precision, device, "sample.precision", bf16_supported=supported)
        return
    bf16 = resolve_precision(precision, device, bf16_supported=supported)
    assert bf16 == (precision == "bf16" or (precision == "auto" and cuda and supported))
    switches = network_switches(precision, device, bf16_supported=supported)
    assert switches == {"bf16": bf16, "channels_last": cuda, "compile": cuda}
    if not cuda:  # nothing to ask the device: what torch reports here does not matter
        assert resolve_precision(precision, device) == bf16
        assert FastPath.resolve(TrainConfig(precision=precision), device).bf16 == bf16


def test_every_checkpoint_reader_refuses_a_non_checkpoint_in_one_line(digits, tmp_path):
    """load_checkpoint and load_ema_model raise one CheckpointError naming the file, whatever
    it holds instead of a checkpoint (what `ddpm` prints and what the pipeline can catch)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    torch.save({"format": "ddpm-ema", "version": 2}, tmp_path / "no-config.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    good = save_checkpoint(tmp_path / "good.pt", _trainer(TrainConfig()))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:1000])
    for name in ("notes.txt", "no-config.pt", "list.pt", "cut.pt", "missing.pt"):
        for load in (load_checkpoint, load_ema_model):
            with pytest.raises(CheckpointError) as error:
                load(tmp_path / name)
            message = str(error.value)
            assert str(tmp_path / name) in message and "\n" not in message, (load, message)
