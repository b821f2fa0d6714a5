"""README's Python examples run as written (in a scratch folder, so their files land there)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


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
