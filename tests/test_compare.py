"""`python -m pipelines.compare`: two revisions' metrics, key by key, allowing for their noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import compare
from pipelines.compare import DIFFERS, SAME, WITHIN_NOISE, Value, verdict

REPO = Path(__file__).resolve().parents[1]

DVC_YAML = """\
stages:
  evaluate:
    cmd: python -m pipelines.evaluate
    metrics:
      - ${evaluate.out_dir}/scores.json:
          cache: false
  prepare:
    cmd: python -m pipelines.prepare
    metrics:
      - metrics/counts.json
"""
PARAMS_YAML = "evaluate:\n  out_dir: metrics\n"

SCORES = {
    "loss": 0.5,
    "fid": 10.0,
    "score": 3.0,
    "score_stderr": 0.1,
    "schedule": "sigmoid",
    "samples": {"bpd": 2.0, "bpd_stderr": 0.05},
}
COUNTS = {"train_count": 4500}


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=compare test", "-c", "user.email=compare@example.invalid"]
    done = subprocess.run(
        ["git", "-C", str(repo), *identity, *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    git(repo, "add", *files)
    git(repo, "commit", "-q", "-m", message)


def metrics_files(scores: dict, counts: dict = COUNTS) -> dict[str, str]:
    return {"metrics/scores.json": json.dumps(scores), "metrics/counts.json": json.dumps(counts)}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository whose first commit holds dvc.yaml, params.yaml and the SCORES baseline."""
    git(tmp_path, "init", "-q")
    commit(
        tmp_path,
        {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS_YAML, **metrics_files(SCORES)},
        "baseline",
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def report_rows(output: str) -> dict[str, str]:
    """key -> its report line, for the rows of the report (indented lines)."""
    return {line.split()[0]: line for line in output.splitlines() if line.startswith("  ")}


def test_verdict_uses_two_combined_standard_errors():
    # se 0.3 and 0.4 combine to 0.5, so the bound is 1.0: not 0.5 (one se), not 1.4 (se_a + se_b).
    assert verdict(Value(1.0, 0.3), Value(1.9, 0.4)) == WITHIN_NOISE
    assert verdict(Value(1.0, 0.3), Value(2.2, 0.4)) == DIFFERS
    assert verdict(Value(1.0, 0.3), Value(0.05, 0.4)) == WITHIN_NOISE  # either direction
    assert verdict(Value(1.0, 0.3), Value(1.0, 0.3)) == SAME
    assert verdict(Value(1.0, 0.3), Value(1.0, 0.2)) == WITHIN_NOISE  # equal value, new stderr


def test_verdict_without_a_standard_error_is_exact():
    assert verdict(Value(0.5, None), Value(0.5, None)) == SAME
    assert verdict(Value(0.5, None), Value(0.5 + 1e-12, None)) == DIFFERS
    assert verdict(Value(1.0, 0.3), Value(1.1, None)) == DIFFERS  # one side has none
    assert verdict(Value("sigmoid", None), Value("linear", None)) == DIFFERS
    assert verdict(Value(True, None), Value(1, None)) == DIFFERS  # a flag is not a count
    assert verdict(Value(math.nan, None), Value(math.nan, None)) == SAME
    assert verdict(None, Value(1.0, None)) == DIFFERS  # absent at one revision


def test_stderr_keys_join_their_estimate():
    flat = compare.flatten(
        {
            "score": 3.0,
            "score_stderr": 0.1,
            "gap_stderr": 0.2,
            "samples": {"bpd": 2.0, "bpd_stderr": None},
        }
    )
    assert flat == {
        "score": Value(3.0, 0.1),
        "gap_stderr": Value(0.2, None),
        "samples.bpd": Value(2.0, None),
    }


def test_noise_and_a_deliberate_change_between_commits(repo, capsys):
    # score moves 0.2, under 2 * sqrt(0.1² + 0.1²) = 0.283; bpd 0.1, under 0.141.
    commit(
        repo,
        metrics_files({**SCORES, "score": 3.2, "samples": {"bpd": 2.1, "bpd_stderr": 0.05}}),
        "a rerun on other kernels",
    )
    assert compare.main(["HEAD~1", "HEAD"]) == 0
    out = capsys.readouterr().out
    rows = report_rows(out)
    assert rows["score"].endswith(WITHIN_NOISE) and "3 ± 0.1" in rows["score"]
    assert "+0.2" in rows["score"]
    assert rows["samples.bpd"].endswith(WITHIN_NOISE)
    for key in ("loss", "fid", "schedule", "train_count"):
        assert rows[key].endswith(f" {SAME}"), rows[key]
    assert "6 keys: 4 same, 2 within noise, 0 differs." in out
    assert "without ± have no standard error" in out

    # Deliberately changed: bpd moves 0.5 (> 0.141), fid by a hair but it has no stderr.
    commit(
        repo,
        metrics_files({**SCORES, "fid": 10.0001, "samples": {"bpd": 2.5, "bpd_stderr": 0.05}}),
        "a broken change",
    )
    assert compare.main(["HEAD~1", "HEAD"]) == 1
    rows = report_rows(capsys.readouterr().out)
    assert rows["samples.bpd"].endswith(DIFFERS) and "+0.4" in rows["samples.bpd"]
    assert rows["fid"].endswith(DIFFERS)
    assert rows["score"].endswith(WITHIN_NOISE)  # 3.2 back to the baseline's 3.0
    assert compare.main(["HEAD~2", "HEAD~2"]) == 0


def test_the_working_tree_when_the_second_revision_is_left_out(repo, capsys):
    (repo / "metrics/counts.json").write_text(json.dumps({"train_count": 4499, "test_count": 500}))
    assert compare.main(["HEAD"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("B: workspace")
    rows = report_rows(out)
    assert rows["train_count"].endswith(DIFFERS) and " -1 " in rows["train_count"]
    assert rows["test_count"].split()[1] == "absent" and rows["test_count"].endswith(DIFFERS)


def test_metrics_file_path_comes_from_params_at_each_revision(repo, capsys):
    """A revision that moved evaluate.out_dir reads its metrics from the new folder."""
    moved = {
        "params.yaml": "evaluate:\n  out_dir: results\n",
        "results/scores.json": json.dumps(SCORES),
    }
    commit(repo, moved, "metrics under results/")
    assert compare.main(["HEAD~1", "HEAD"]) == 1
    out = capsys.readouterr().out
    assert "\nresults/scores.json\n" in out and "\nmetrics/scores.json\n" in out
    assert report_rows(out)["score"].split()[1] == "absent"  # A had none under results/


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.compare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unknown_revision_is_one_line_and_exit_2(repo):
    done = run_module("HEAD", "no-such-tag", cwd=repo)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["compare: unknown revision 'no-such-tag'"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"metrics/scores.json": '{"loss": 0.5,'}, "metrics/scores.json at broken ("),
        ({"dvc.yaml": DVC_YAML.replace("metrics/counts", "metrics/gone")}, "metrics/gone.json: "),
        ({"params.yaml": "evaluate: {}\n"}, "${evaluate.out_dir} is not defined"),
    ],
    ids=["malformed json", "declared file missing", "undefined template"],
)
def test_unreadable_input_is_one_line_and_exit_2(repo, capsys, files, message):
    commit(repo, files, "broken")
    git(repo, "tag", "broken")
    assert compare.main(["HEAD~1", "broken"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert message in line and "broken" in line, line


def test_this_repository_against_itself_is_all_same():
    done = run_module("HEAD", "HEAD", cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = report_rows(done.stdout)
    committed = json.loads(git(REPO, "show", "HEAD:metrics/classifier.json"))
    # The accuracy is one row with its standard error, not two rows, at both revisions.
    accuracy = f"{committed['accuracy']:.6g} ± {committed['accuracy_stderr']:.2g}"
    assert rows["accuracy"].split()[1:7] == accuracy.split() * 2
    assert "accuracy_stderr" not in rows
    assert rows and all(line.endswith(f" {SAME}") for line in rows.values())
    assert max(len(line) for line in done.stdout.splitlines()) <= compare.WIDTH
