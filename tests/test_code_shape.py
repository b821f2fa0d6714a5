"""The pipeline's code stays readable: each function a screenful, each module one concern.

A stage's `run` is a handful of named steps; a function that grows past a screen mixes steps
that can be named and tested apart (issue 20). The limit is checked, not left to review.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def long_functions(folder: Path, limit: int, root: Path = REPO) -> list[str]:
    """`path:line name (N lines)` (path relative to `root`) for every function or method over
    `limit` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    where = path.relative_to(root).as_posix()
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_pipeline_function_is_longer_than_a_screen():
    assert long_functions(REPO / "pipelines", MAX_FUNCTION_LINES) == []


def test_the_measure_names_only_what_is_too_long(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(11))
    (folder / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{long_body}\n")
    assert long_functions(folder, 10, root=tmp_path) == ["pkg/m.py:5 long (12 lines)"]
