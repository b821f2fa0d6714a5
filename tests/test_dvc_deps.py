"""dvc.yaml's code dependencies are exactly what each stage's command imports.

DVC reruns a stage when a listed dependency changes and only then: a module the stage imports but
dvc.yaml leaves out lets a code change pass with stale outputs reported as up to date, and a module
listed but never imported reruns the stage (train's 5 minutes, the whole DAG's 7) for nothing. The
closure is read from the source (every `import` and `from ... import`, at any depth, including
those inside functions), so it holds for code that runs on Ray workers too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ddpm", "pipelines")


def module_file(name: str) -> Path | None:
    """The file of a module of this repository's packages, None for any other module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports: `import a.b` and `from a.b import c` (c may be a submodule),
    relative imports resolved against the file's package; parents come along because Python
    runs each package's __init__ before its module."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    else:
        package = package.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return with_parents


def import_closure(module: str) -> set[Path]:
    """The files of this repository that `python -m <module>` can run."""
    todo = [module]
    seen: set[Path] = set()
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return seen


def stage_commands() -> dict[str, str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: spec["cmd"] for name, spec in stages.items()}


def code_deps(stage: str) -> list[str]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    return [d for d in spec.get("deps", []) if d.split("/")[0] in PACKAGES]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_a_stage_depends_on_exactly_the_code_it_imports(stage):
    command = stage_commands()[stage].split()
    assert command[:2] == ["python", "-m"], f"{stage}: {command}"
    closure = import_closure(command[2])
    assert closure, f"{stage}: {command[2]} is not a module of this repository"
    deps = code_deps(stage)
    missing = sorted(p.relative_to(REPO).as_posix() for p in closure if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports these but does not depend on them"
    unused = [d for d in deps if not any(covered(p, [d]) for p in closure)]
    assert not unused, f"dvc.yaml stage {stage} depends on code it never imports"


def test_the_closure_follows_imports_inside_functions_and_packages(tmp_path):
    """The reader itself: a lazily imported module and a package's __init__ are found."""
    closure = {p.relative_to(REPO).as_posix() for p in import_closure("pipelines.train")}
    # pipelines/train.py imports Ray Train's pieces inside run(); pipelines.worker at the top,
    # which reaches the library's U-Net through the ddpm.nn package.
    assert {"pipelines/train.py", "pipelines/worker.py", "ddpm/__init__.py"} <= closure
    assert "ddpm/nn/__init__.py" in closure
    assert "pipelines/prepare.py" not in closure
