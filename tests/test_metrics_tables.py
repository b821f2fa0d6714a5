"""The metrics tables users read: `dvc metrics show` of the committed default run, and the
`dvc exp show` form docs/PIPELINE.md gives for comparing experiments, both as written there.

The metrics files hold each stage's headline numbers only (pipelines/stage_metrics.py), so the
first fits in 200 columns; the second is checked on real DVC experiments of a scratch project
whose one stage writes the committed run's metrics files, its numbers moved by train.lr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUIDE = REPO / "docs/PIPELINE.md"
HEADLINE_STAGES = ("classifier", "tune", "train", "evaluate")


def documented(prefix: str) -> str:
    """The command line of docs/PIPELINE.md's bash blocks that starts with `prefix`, without
    its comment."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, lines
    return lines[0].split("  #")[0].strip()


def shell(command: str, cwd: Path, **env: str) -> str:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_metrics_show_of_the_committed_run_fits_in_200_columns():
    table = shell(documented("dvc metrics show"), REPO, COLUMNS="1000")
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 200, table
    header = lines[0].split()
    assert header[0] == "Path" and {"accuracy", "loss", "bpd", "bpd_mc", "fd"} <= set(header)
    # One row per stage's headline file, and no key of the full reports among the columns.
    assert [line.split()[0] for line in lines[1:]] == [f"metrics/{s}.json" for s in HEADLINE_STAGES]
    details = json.loads((REPO / "metrics/details/evaluate.json").read_text())
    assert not set(header) & {f"samples.{key}" for key in details["samples"]}


# The scratch project's stage: the committed headline files, evaluate's and train's numbers
# moved by train.lr so that experiments differ in them as real ones do.
WRITER = """
import json, pathlib, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
for name, numbers in json.load(open("committed.json")).items():
    moved = {k: v * (1 + lr) if isinstance(v, float) and name in ("evaluate", "train") else v
             for k, v in numbers.items()}
    pathlib.Path(f"metrics/{name}.json").write_text(json.dumps(moved))
"""


def test_documented_exp_show_form_fits_in_120_columns(tmp_path):
    committed = {s: json.loads((REPO / f"metrics/{s}.json").read_text()) for s in HEADLINE_STAGES}
    (tmp_path / "committed.json").write_text(json.dumps(committed))
    (tmp_path / "write.py").write_text(WRITER)
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    (tmp_path / "metrics").mkdir()
    outs = "\n".join(f"      - metrics/{s}.json: {{cache: false}}" for s in HEADLINE_STAGES)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  run:\n    cmd: python write.py\n    deps: [write.py, committed.json]\n"
        f"    params: [train, diffusion]\n    metrics:\n{outs}\n"
    )
    # `dvc exp run` commits each experiment: it needs a git identity, which a fresh HOME lacks.
    identity = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "t"), ("EMAIL", "t@t"))}  # fmt: skip
    shell(
        "git init -q && dvc init -q && dvc repro -q && git add -A && "
        "git commit -q -m baseline && "
        "dvc exp run -q -S train.lr=5e-4 && "
        "dvc exp run -q -S train.lr=2e-3 -S diffusion.schedule=cosine",
        tmp_path,
        **identity,
    )
    table = shell(documented("dvc exp show --only-changed"), tmp_path, COLUMNS="120")
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 120, table
    assert "…" not in table, table  # DVC shortens cells that do not fit its width
    header = lines[1].split()
    assert {"Experiment", "train.lr", "diffusion.schedule", "loss", "bpd", "fd"} <= set(header)
    # Standard errors and the columns DVC names by file (bpd_mc, in Tune's file and evaluate's)
    # are left out.
    assert not any(name.endswith("_stderr") or name.startswith("metrics/") for name in header)
    # The workspace, the baseline and both experiments.
    assert len([line for line in lines if re.search(r"\d\.\d", line)]) == 4, table
