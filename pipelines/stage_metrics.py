"""Where a stage's numbers go: a few headline numbers for `dvc metrics show`, the whole report
beside them.

`dvc metrics show` prints one row per metrics file and one column per key of all of them, so
every key costs the whole table a column. The metrics files DVC declares (`<evaluate.out_dir>/
<stage>.json`) therefore hold each stage's headline numbers under short names, shared where two
stages measure the same thing (`bpd_mc`, the Monte-Carlo test bound, of Tune's best trial and of
the final model), each estimate with its standard error, so the default run's table fits in
200 columns. Each stage's full report (every image set, margin and count) goes to
`<evaluate.out_dir>/details/<stage>.json`: a DVC output too (`cache: false`, committed, its
hash in dvc.lock), so a reproduction still checks every number, but no column of the table.
The prepare stage has a report only: its image counts describe the data the others measure.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ddpm.io_utils import write_json

DETAILS_DIR = "details"
# A headline estimate's standard error sits beside it under this suffix (pipelines.compare
# pairs them); the reports use the same suffix for theirs.
STDERR_SUFFIX = "_stderr"
# Each stage's report key -> its name in the headline metrics. Two stages' keys for the same
# estimate share a name: Tune's mc_bpd (its best trial's) and evaluate's test_nll_bpd_mc are
# both bpd_mc, their classifier_fd both fd.
HEADLINE_NAMES = {
    "test_accuracy": "accuracy",
    "final_loss": "loss",
    "mc_bpd": "bpd_mc",
    "test_nll_bpd": "bpd",
    "test_nll_bpd_mc": "bpd_mc",
    "classifier_fd": "fd",
    "classifier_score": "score",
    "fid": "fid",
    "inception_score": "is",
}


def headline(report: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`keys` of `report` under their headline names, each with its standard error beside it when
    the report has one; keys the report lacks or holds as None are left out."""
    picked = {}
    for key in keys:
        name = HEADLINE_NAMES[key]
        for suffix in ("", STDERR_SUFFIX):
            if report.get(key + suffix) is not None:
                picked[name + suffix] = report[key + suffix]
    return picked


def write_stage_details(out_dir: Path, stage: str, details: dict[str, Any]) -> Path:
    """Write the stage's full report, out_dir/details/<stage>.json (out_dir being
    evaluate.out_dir); returns its path."""
    path = out_dir / DETAILS_DIR / f"{stage}.json"
    write_json(path, details)
    return path


def write_stage_metrics(
    out_dir: Path, stage: str, headline: dict[str, Any], details: dict[str, Any] | None = None
) -> Path:
    """Write the stage's headline metrics file (out_dir/<stage>.json) and, when given, its full
    report (`write_stage_details`); returns the headline file's path."""
    if details is not None:
        write_stage_details(out_dir, stage, details)
    path = out_dir / f"{stage}.json"
    write_json(path, headline)
    return path
