"""Where a stage's numbers go: a few headline numbers for `dvc metrics show`, the whole report
beside them.

`dvc metrics show` prints one row per metrics file and one column per key of all of them, so
every key costs the whole table a column. The metrics files DVC declares (`<evaluate.out_dir>/
<stage>.json`) therefore hold each stage's headline numbers under short names, shared where two
stages measure the same thing (`bpd_mc`, the Monte-Carlo test bound, of Tune's best trial and of
the final model), so the default run's table fits in 200 columns. Each stage's full report
(every image set, margin and count) goes to `<evaluate.out_dir>/details/<stage>.json`: a DVC
output too (`cache: false`, committed, its hash in dvc.lock), so a reproduction still checks
every number, but no column of the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm.io_utils import write_json

DETAILS_DIR = "details"
# A headline estimate's standard error sits beside it under this suffix (pipelines.compare
# pairs them).
STDERR_SUFFIX = "_stderr"


def write_stage_metrics(
    out_dir: Path, stage: str, headline: dict[str, Any], details: dict[str, Any] | None = None
) -> Path:
    """Write the stage's headline metrics file (out_dir/<stage>.json, out_dir being
    evaluate.out_dir) and, when given, its full report (out_dir/details/<stage>.json); returns
    the headline file's path."""
    if details is not None:
        write_json(out_dir / DETAILS_DIR / f"{stage}.json", details)
    path = out_dir / f"{stage}.json"
    write_json(path, headline)
    return path
