"""Where the default run's wall time goes, stage by stage (a script, not a test).

    dvc repro && .venv/bin/python benchmarks/stage_breakdown.py [--root .]

Reads the `seconds` each stage recorded in run_info/<stage>.json (pipelines/run_info.py's
StageClock: from the process's start to its Ray shutdown) and prints one row per stage of
dvc.yaml, in DAG order: the fixed costs (imports, Ray, MLflow), the stage's work split into
publishing to the store, compute, output files and pictures, MLflow logging and the rest (`run`),
and the share of the stage's time that is not compute. A stage that DVC skipped as up to date
keeps its last run's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Run as a file, the script's folder comes first on sys.path, not the repository: this
# checkout's code, not whichever copy an installed package points at (or none).
sys.path.insert(0, str(REPO))

from pipelines.run_info import PHASES  # noqa: E402


def table(root: Path) -> list[str]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    header = (
        f"{'stage':11s}" + "".join(f"{p[:10]:>11s}" for p in PHASES) + f"{'total':>8s}{'fixed':>7s}"
    )
    rows = [header]
    sums = dict.fromkeys(PHASES, 0.0)
    for stage in stages:
        path = root / "run_info" / f"{stage}.json"
        seconds = (
            json.loads(path.read_text(encoding="utf-8")).get("seconds") if path.is_file() else None
        )
        if not seconds:
            rows.append(f"{stage:11s}  (no timing in {path})")
            continue
        total = sum(seconds.values())
        fixed = total - seconds.get("compute", 0.0)
        for phase in PHASES:
            sums[phase] += seconds.get(phase, 0.0)
        cells = "".join(f"{seconds.get(p, 0.0):11.1f}" for p in PHASES)
        rows.append(f"{stage:11s}{cells}{total:8.1f}{fixed / total:7.0%}")
    total = sum(sums.values())
    if total:
        cells = "".join(f"{sums[p]:11.1f}" for p in PHASES)
        rows.append(f"{'all':11s}{cells}{total:8.1f}{(total - sums['compute']) / total:7.0%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO)
    print("\n".join(table(parser.parse_args().root)))


if __name__ == "__main__":
    main()
