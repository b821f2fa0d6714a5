"""Compare two revisions' committed metrics, allowing for the noise their standard errors state.

`dvc metrics diff` answers "are the numbers the same?". When the bits cannot match (another GPU
model, native CPU kernels, another architecture) every estimate moves a little, and the question
becomes "did it move by more than its noise?". This command answers that, key by key:

    python -m pipelines.compare REV_A [REV_B]      # REV_B omitted: the working tree

It reads the metrics files dvc.yaml declares (its `${...}` paths filled from params.yaml), at each
revision as git holds them (`git show REV:path`) and, for the working tree, from disk. The stages
store an estimate's standard error beside it as `<name>_stderr` (pipelines/evaluate.py,
pipelines/tune.py); such a pair is one row. Verdicts:

- `same`: value and standard error exactly equal;
- `within noise`: |B - A| <= 2 sqrt(se_A² + se_B²), both standard errors known;
- `differs`: anything else, including any change of a key with no standard error (a count, a
  name) and a key present at one revision only.

Exit status 0 when nothing differs, 1 when something does, 2 for input it cannot read (an unknown
revision, a missing or malformed file), said in one line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pipelines.stage_metrics import STDERR_SUFFIX

SAME, WITHIN_NOISE, DIFFERS = "same", "within noise", "differs"
NOISE_FACTOR = 2.0  # how many combined standard errors a difference may be and still be noise
WIDTH = 120
_INTERPOLATION = re.compile(r"\$\{\s*([^}\s]+)\s*\}")


class CompareError(Exception):
    """Input this command cannot read; the message is the one line the user sees."""


@dataclass(frozen=True)
class Revision:
    name: str  # as the user wrote it, or "workspace"
    commit: str | None  # None: the working tree on disk

    def __str__(self) -> str:
        return self.name if self.commit is None else f"{self.name} ({self.commit[:10]})"


class Value(NamedTuple):
    value: Any
    stderr: float | None


@dataclass(frozen=True)
class Row:
    path: str
    key: str
    a: Value | None  # None: the key is absent at that revision
    b: Value | None
    verdict: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def repository_root(cwd: Path) -> Path:
    found = _git(cwd, "rev-parse", "--show-toplevel")
    if found.returncode != 0:
        raise CompareError(f"{cwd} is not inside a git repository")
    return Path(found.stdout.strip())


def resolve_revision(root: Path, name: str | None) -> Revision:
    if name is None:
        return Revision("workspace", None)
    found = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}")
    if found.returncode != 0:
        raise CompareError(f"unknown revision {name!r}")
    return Revision(name, found.stdout.strip())


def read_text(root: Path, rev: Revision, path: str) -> str | None:
    """The file's text at `rev`; None when the revision has no such file."""
    if rev.commit is None:
        file = root / path
        try:
            return file.read_text(encoding="utf-8") if file.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            raise CompareError(f"{path} in the workspace cannot be read: {e}") from None
    shown = _git(root, "show", f"{rev.commit}:{path}")
    return shown.stdout if shown.returncode == 0 else None


def _parse(text: str, path: str, rev: Revision) -> Any:
    try:
        return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        message = str(e).splitlines()[0]
        raise CompareError(
            f"{path} at {rev} is not valid {Path(path).suffix[1:]}: {message}"
        ) from None


def _lookup(variables: dict[str, Any], dotted: str, where: str) -> str:
    node: Any = variables
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CompareError(f"{where}: ${{{dotted}}} is not defined in params.yaml")
        node = node[part]
    return str(node)


def _declared_paths(dvc: dict[str, Any]) -> list[str]:
    """Metrics paths in dvc.yaml, still templated: the top-level list and every stage's."""
    entries = list(dvc.get("metrics") or [])
    for stage in (dvc.get("stages") or {}).values():
        if isinstance(stage, dict):
            entries.extend(stage.get("metrics") or [])
    # An entry is a path or {path: {cache: false, ...}}.
    return [p for e in entries for p in (e if isinstance(e, dict) else [e])]


def declared_metrics(root: Path, rev: Revision) -> list[str]:
    """The metrics files dvc.yaml declares at `rev`, with `${...}` taken from params.yaml."""
    text = read_text(root, rev, "dvc.yaml")
    if text is None:
        raise CompareError(f"dvc.yaml: not at {rev}")
    dvc = _parse(text, "dvc.yaml", rev) or {}
    params_text = read_text(root, rev, "params.yaml")
    variables = (_parse(params_text, "params.yaml", rev) if params_text else None) or {}
    for extra in dvc.get("vars") or []:  # inline `vars:` mappings; files named there are not read
        if isinstance(extra, dict):
            variables = {**variables, **extra}
    where = f"dvc.yaml at {rev}"
    paths = [
        _INTERPOLATION.sub(lambda m: _lookup(variables, m[1], where), str(p))
        for p in _declared_paths(dvc)
    ]
    return list(dict.fromkeys(paths))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Value]:
    """Dotted keys; `<name>_stderr` beside a `<name>` becomes that row's standard error."""
    rows: dict[str, Value] = {}
    for key, value in data.items():
        base = key.removesuffix(STDERR_SUFFIX)
        if key != base and base in data and (value is None or _is_number(value)):
            continue
        if isinstance(value, dict):
            rows.update(flatten(value, f"{prefix}{key}."))
            continue
        stderr = data.get(f"{key}{STDERR_SUFFIX}")
        rows[f"{prefix}{key}"] = Value(value, stderr if _is_number(stderr) else None)
    return rows


def load_metrics(root: Path, rev: Revision, path: str) -> dict[str, Value]:
    text = read_text(root, rev, path)
    if text is None:
        raise CompareError(f"{path}: declared in dvc.yaml but not at {rev}")
    data = _parse(text, path, rev)
    if not isinstance(data, dict):
        raise CompareError(f"{path} at {rev} holds no mapping of metrics")
    return flatten(data)


def _identical(x: Any, y: Any) -> bool:
    both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
    return both_nan or (type(x) is bool) == (type(y) is bool) and x == y


def verdict(a: Value | None, b: Value | None) -> str:
    if a is None or b is None:
        return DIFFERS
    if _identical(a.value, b.value) and _identical(a.stderr, b.stderr):
        return SAME
    numeric = _is_number(a.value) and _is_number(b.value)
    if not numeric or a.stderr is None or b.stderr is None:
        return DIFFERS
    combined = math.hypot(a.stderr, b.stderr)
    return WITHIN_NOISE if abs(b.value - a.value) <= NOISE_FACTOR * combined else DIFFERS


def compare(root: Path, rev_a: Revision, rev_b: Revision) -> list[Row]:
    """One row per metric key at either revision, files in dvc.yaml's order (A's first)."""
    paths_a, paths_b = declared_metrics(root, rev_a), declared_metrics(root, rev_b)
    rows = []
    for path in dict.fromkeys(paths_a + paths_b):
        a = load_metrics(root, rev_a, path) if path in paths_a else {}
        b = load_metrics(root, rev_b, path) if path in paths_b else {}
        for key in dict.fromkeys([*a, *b]):
            rows.append(Row(path, key, a.get(key), b.get(key), verdict(a.get(key), b.get(key))))
    return rows


def _shown(v: Value | None) -> str:
    if v is None:
        return "absent"
    if _is_number(v.value):
        text = f"{v.value:.6g}"
    else:
        text = json.dumps(v.value) if not isinstance(v.value, str) else v.value
    return text if v.stderr is None else f"{text} ± {v.stderr:.2g}"


def _difference(row: Row) -> str:
    if row.a is None or row.b is None or not (_is_number(row.a.value) and _is_number(row.b.value)):
        return ""
    difference = row.b.value - row.a.value
    return "0" if difference == 0 else f"{difference:+.2g}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(rows: list[Row], rev_a: Revision, rev_b: Revision) -> list[str]:
    """Rows grouped by file, fitting WIDTH columns; a key too long for its column gets a line."""
    value_w, diff_w, verdict_w = 26, 9, len(WITHIN_NOISE)
    key_w = WIDTH - 2 * value_w - diff_w - verdict_w - 4
    lines = [
        f"A: {rev_a}    B: {rev_b}",
        f"{'metric':<{key_w}} {'A':<{value_w}} {'B':<{value_w}} {'B - A':>{diff_w}} verdict",
    ]
    for path in dict.fromkeys(r.path for r in rows):
        lines.append(path)
        for row in (r for r in rows if r.path == path):
            key = f"  {row.key}"
            if len(key) > key_w - 1:
                lines.append(key)
                key = ""
            lines.append(
                f"{key:<{key_w}} {_clip(_shown(row.a), value_w):<{value_w}} "
                f"{_clip(_shown(row.b), value_w):<{value_w}} "
                f"{_difference(row):>{diff_w}} {row.verdict}"
            )
    counts = {v: sum(r.verdict == v for r in rows) for v in (SAME, WITHIN_NOISE, DIFFERS)}
    lines.append(f"{len(rows)} keys: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    lines.append(
        f"within noise: |B - A| <= {NOISE_FACTOR:g} sqrt(se_A² + se_B²), se: standard error."
    )
    lines.append(
        "Values shown without ± have no standard error: they compare exactly, same or differs."
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.compare",
        description="Compare two revisions' metrics key by key: same, within noise (|B - A| <= 2 "
        "combined standard errors) or differs.",
    )
    parser.add_argument("rev_a", metavar="REV_A", help="a git revision: tag, branch, commit")
    parser.add_argument(
        "rev_b", metavar="REV_B", nargs="?", help="another revision; omitted: the working tree"
    )
    args = parser.parse_args(argv)
    try:
        root = repository_root(Path.cwd())
        rev_a, rev_b = resolve_revision(root, args.rev_a), resolve_revision(root, args.rev_b)
        rows = compare(root, rev_a, rev_b)
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_report(rows, rev_a, rev_b)))
    return 1 if any(r.verdict == DIFFERS for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
