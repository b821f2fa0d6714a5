"""The sample and evaluate stages' pure parts, on hand-made numbers and without Ray: the report
evaluate builds from what its tasks gathered (each margin, the classifier validity verdict both
ways, FID present or absent) and sample's shard plan, resume bookkeeping and records."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines import evaluate, project, sample

REPO = Path(__file__).resolve().parents[1]


def score(fd: float, value: float, std: float, present: int, count: int) -> dict[str, float]:
    """What ddpm.metrics.classifier_metrics returns for one image set (the FD's standard error
    a tenth of it)."""
    return {
        "classifier_fd": fd,
        "classifier_fd_stderr": fd / 10,
        "classifier_score": value,
        "classifier_score_std": std,
        "classes_present": present,
        "class_entropy": 0.25 * present,
        "num_samples": count,
    }


def gathered(**changes) -> evaluate.Gathered:
    """Numbers chosen so each statistic is easy to work out by hand."""
    values = {
        "scores": {
            "samples": score(2.0, 6.0, 0.3, 10, 40),
            "untrained": score(50.0, 1.5, 0.6, 3, 32),
            "real_test": score(0.5, 9.0, 0.15, 10, 400),
        },
        "fid": {},
        "fid_reason": "FID Inception weights not found",
        # Two test images, T = 3; their totals 6 and 7 bits/dim.
        "terms": np.array([[1.0, 2.0, 2.99], [2.0, 3.0, 1.97]]),
        "prior": np.array([0.01, 0.03]),
        "total": np.array([6.0, 7.0]),
        "mc": {
            "samples": np.array([6.0, 6.2, 6.4, 6.6]),
            "untrained": np.array([7.0, 7.4, 7.2, 7.8]),
        },
        "accuracy": 0.95,
    }
    return evaluate.Gathered(**(values | changes))


def test_report_of_each_image_set_and_the_trained_models_bound():
    report = evaluate.build_report(gathered())
    trained, untrained, real = report["samples"], report["untrained"], report["real_test"]
    assert trained["classifier_fd"] == 2.0 and untrained["classes_present"] == 3
    # The score's standard error: the std over the 10 splits divided by √9.
    assert trained["classifier_score_stderr"] == pytest.approx(0.1)
    assert untrained["classifier_score_stderr"] == pytest.approx(0.2)
    assert real["classifier_score_stderr"] == pytest.approx(0.05)
    # Mean and sample std / √N of the per-image Monte-Carlo bounds.
    assert trained["test_nll_bpd_mc"] == pytest.approx(6.3)
    assert trained["test_nll_bpd_mc_stderr"] == pytest.approx(math.sqrt(0.2 / 3) / 2)
    assert untrained["test_nll_bpd_mc"] == pytest.approx(7.35)
    # The full bound exists for the trained model only; the held-out digits get no bound.
    assert trained["test_nll_bpd"] == pytest.approx(6.5)
    assert trained["test_nll_bpd_stderr"] == pytest.approx(0.5)
    assert trained["test_nll_bpd_prior"] == pytest.approx(0.02)
    assert "test_nll_bpd" not in untrained
    assert not any(key.startswith("test_nll") for key in real)
    # Without FID weights the keys are absent, not null.
    assert not any("fid" in entry or "inception_score" in entry for entry in (trained, real))
    json.dumps(report, allow_nan=False)  # a metrics file: no NaN


def test_margins_when_the_classifier_is_valid():
    margin = evaluate.build_report(gathered())["margin"]
    # Paired per-image differences 1.0, 1.2, 0.8, 1.2: mean 1.05, sample variance 0.11 / 3.
    assert margin["bpd_mc_gain"] == pytest.approx(1.05)
    assert margin["bpd_mc_gain_stderr"] == pytest.approx(math.sqrt(0.11 / 3) / 2)
    assert margin["fd_ratio"] == pytest.approx(25.0)  # untrained FD 50 over trained FD 2
    assert margin["score_gain"] == pytest.approx(4.5)
    assert margin["score_gain_stderr"] == pytest.approx(math.hypot(0.1, 0.2))


@pytest.mark.parametrize(
    "accuracy, valid",
    [(0.95, True), (evaluate.CLASSIFIER_MIN_ACCURACY, True), (0.89, False), (0.108, False)],
)
def test_classifier_validity_verdict_gates_the_classifier_margins(accuracy, valid):
    report = evaluate.build_report(gathered(accuracy=accuracy))
    assert report["classifier_metrics_valid"] is valid
    classifier_margins = {"fd_ratio", "score_gain", "score_gain_stderr"}
    given = classifier_margins & set(report["margin"])
    assert given == (classifier_margins if valid else set())
    # The likelihood margin does not depend on the classifier.
    assert report["margin"]["bpd_mc_gain"] == pytest.approx(1.05)
    # Invalid metrics are still reported, marked as such.
    assert report["samples"]["classifier_fd"] == 2.0


def test_fd_ratio_of_a_perfect_trained_fd_is_finite():
    scores = gathered().scores | {"samples": score(0.0, 6.0, 0.3, 10, 40)}
    margin = evaluate.build_report(gathered(scores=scores))["margin"]
    assert margin["fd_ratio"] == pytest.approx(50.0 / 1e-12)


def test_fid_and_inception_score_join_each_image_set_when_computed():
    fid = {
        "samples": {"fid": 12.5, "inception_score": 3.0},
        "untrained": {"fid": 300.0, "inception_score": 1.1},
        "real_test": {"fid": 4.0, "inception_score": 8.5},
    }
    report = evaluate.build_report(gathered(fid=fid, fid_reason=None))
    assert [report[n]["fid"] for n in fid] == [12.5, 300.0, 4.0]
    assert [report[n]["inception_score"] for n in fid] == [3.0, 1.1, 8.5]
    assert "fid" not in report["margin"]


def test_headline_holds_the_trained_models_numbers_under_short_names():
    report = evaluate.build_report(gathered())
    assert evaluate.evaluate_headline(report) == {
        "bpd": pytest.approx(6.5),
        "bpd_stderr": pytest.approx(0.5),
        "bpd_mc": pytest.approx(6.3),
        "bpd_mc_stderr": pytest.approx(math.sqrt(0.2 / 3) / 2),
        "fd": 2.0,
        "fd_stderr": 0.2,
        "score": 6.0,
        "score_stderr": pytest.approx(0.1),
    }
    # An invalid classifier's numbers stay in the full report only; FID joins when computed;
    # a null standard error is left out.
    fid = {name: {"fid": 12.5, "inception_score": 3.0} for name in report if name != "margin"}
    one_image = {"samples": np.array([6.0]), "untrained": np.array([7.5])}
    changed = gathered(accuracy=0.5, fid=fid, fid_reason=None, mc=one_image)
    headline = evaluate.evaluate_headline(evaluate.build_report(changed))
    assert set(headline) == {"bpd", "bpd_stderr", "bpd_mc", "fid", "is"}
    assert (headline["fid"], headline["is"]) == (12.5, 3.0)


def test_tune_and_evaluate_name_the_same_estimate_alike_in_their_headlines():
    # One column of `dvc metrics show` per quantity: Tune's best trial and the final model.
    from pipelines import tune

    tuned = {"best_lr": 1e-3, "best_schedule": "linear"}
    mc = tune.tune_headline(tuned | {"best_mc_bpd": 6.3, "best_mc_bpd_stderr": 0.1}, "mc_bpd")
    fd = tune.tune_headline(
        tuned | {"best_classifier_fd": 2.0, "best_classifier_fd_stderr": 0.2}, "classifier_fd"
    )
    final = evaluate.evaluate_headline(evaluate.build_report(gathered()))
    assert {"bpd_mc", "bpd_mc_stderr"} <= set(mc) & set(final)
    assert {"fd", "fd_stderr"} <= set(fd) & set(final)


def test_a_single_image_has_a_null_standard_error():
    mc = {"samples": np.array([6.0]), "untrained": np.array([7.5])}
    report = evaluate.build_report(gathered(mc=mc, total=np.array([6.25])))
    assert report["samples"]["test_nll_bpd_mc"] == 6.0
    assert report["samples"]["test_nll_bpd_mc_stderr"] is None
    assert report["samples"]["test_nll_bpd_stderr"] is None
    assert report["margin"]["bpd_mc_gain"] == 1.5 and report["margin"]["bpd_mc_gain_stderr"] is None


def test_run_info_and_per_timestep_terms():
    g = gathered()
    info = evaluate.build_run_info(g)
    assert info == {
        "fid_unavailable_reason": "FID Inception weights not found",
        "num_images": {"samples": 40, "untrained": 32, "real_test": 400},
        "test_nll_images": 2,
        "bound_clip_denoised": True,
        "classifier_test_accuracy": 0.95,
    }
    np.testing.assert_allclose(g.bpd_per_timestep, [1.5, 2.5, 2.48])


def test_mlflow_metrics_name_each_number_by_its_group():
    metrics = evaluate.report_metrics(evaluate.build_report(gathered()))
    assert list(metrics) == ["samples", "untrained", "real_test", "margin"]
    assert metrics["samples"]["samples.classifier_fd"] == 2.0
    assert metrics["real_test"]["real_test.classes_present"] == 10.0
    assert metrics["margin"]["margin.fd_ratio"] == pytest.approx(25.0)
    # A null standard error is left out, not logged as NaN.
    one_image = evaluate.build_report(
        gathered(mc={"samples": np.array([6.0]), "untrained": np.array([7.0])})
    )
    assert "samples.test_nll_bpd_mc_stderr" not in evaluate.report_metrics(one_image)["samples"]
    assert "samples.test_nll_bpd_mc" in evaluate.report_metrics(one_image)["samples"]


@pytest.fixture(scope="module")
def sample_params():
    s = project.load_params(REPO / "params.yaml").sample
    return dataclasses.replace(s, num_images=40, shard_size=16)


def test_shard_plan_splits_the_images_and_seeds_each_shard(sample_params):
    # The seeds the stage's own SeedSequence([seed, index]) helper gave before ddpm.seeding
    # held the layout: the committed sample sets' pixels depend on them.
    assert sample.shard_plan(sample_params, 0) == [
        (0, 16, 15793235383387715774),
        (1, 16, 5836529245451711556),
        (2, 8, 17195319236771816063),
    ]
    assert [seed for _, _, seed in sample.shard_plan(sample_params, 7)] == [
        16920295385781661272,
        6635463128224577688,
        18279110831140952437,
    ]


def test_stale_shards_are_the_redrawn_ones_and_those_beyond_the_plan(sample_params):
    plan = sample.shard_plan(sample_params, 0)
    names = [f"shard-0000{i}.parquet" for i in (0, 1, 2, 3, 5)]
    assert sample.stale_shard_names(names, plan, [plan[1]]) == [
        "shard-00001.parquet",
        "shard-00003.parquet",
        "shard-00005.parquet",
    ]
    assert sample.stale_shard_names(names[:3], plan, []) == []


def test_worker_groups_deal_shards_round_robin_without_empty_tasks():
    todo = [(i, 16, 100 + i) for i in range(5)]
    groups = sample.worker_groups(todo, 2)
    assert [[index for index, _, _ in group] for group in groups] == [[0, 2, 4], [1, 3]]
    assert [[index for index, _, _ in g] for g in sample.worker_groups(todo[3:], 4)] == [[3], [4]]


def test_sampler_record_names_the_network_only_when_a_switch_is_on(sample_params):
    off = dict.fromkeys(("bf16", "channels_last", "compile"), False)
    record = sample.sampler_record(sample_params, 7, off)
    assert record == {**sample_params.kwargs(), "batch_size": sample_params.batch_size, "seed": 7}
    on = off | {"compile": True}
    assert sample.sampler_record(sample_params, 7, on)["network"] == on


def test_sampling_metrics_count_what_this_run_drew(sample_params):
    plan = sample.shard_plan(sample_params, 0)
    metrics = sample.sampling_metrics(plan, [plan[0], plan[2]], 2.0)
    assert metrics == {
        "shards_total": 3,
        "shards_generated": 2,
        "images_generated": 24,
        "sampling_seconds": 2.0,
        "images_per_second": 12.0,
    }
    resumed = sample.sampling_metrics(plan, [], 0.5)
    assert resumed["images_generated"] == 0 and "images_per_second" not in resumed


def test_network_switches_on_a_gpu_the_driver_cannot_see(sample_params):
    """The driver resolves for a GPU node without asking torch (it may have none): auto and
    bf16 mean bf16 there, fp32 never does, and an explicit switch overrides auto."""
    s = dataclasses.replace(sample_params, precision="fp32", channels_last=False)
    assert sample.network_switches(s, "cuda") == {
        "bf16": False,
        "channels_last": False,
        "compile": True,
    }
    s = dataclasses.replace(sample_params, precision="bf16", compile=True)
    assert sample.network_switches(s, "cpu") == {
        "bf16": True,
        "channels_last": False,
        "compile": True,
    }
    assert sample.network_switches(sample_params, "cuda")["bf16"] is True


def test_stage_phases_charge_the_time_inside_them(monkeypatch):
    """`phase` charges its block to its name and what came before to `run`; a phase inside a
    phase leaves the time to the outer one; a misspelt phase is refused."""
    import time

    from pipelines import run_info

    monkeypatch.setattr(run_info.StageClock, "running", None)
    with run_info.phase("compute"):  # no stage clock: the block just runs
        pass
    clock = run_info.StageClock()
    clock.lap("params_and_checks")
    time.sleep(0.05)
    with run_info.phase("compute"):
        time.sleep(0.1)
        with run_info.phase("outputs"):
            time.sleep(0.05)
    with run_info.phase("outputs"):
        time.sleep(0.02)
    with pytest.raises(ValueError, match="unknown work phase 'pictures'"):
        with run_info.phase("pictures"):
            pass
    clock.lap("run")
    assert clock.seconds["run"] == pytest.approx(0.05, abs=0.03)
    assert clock.seconds["compute"] == pytest.approx(0.15, abs=0.03)
    assert clock.seconds["outputs"] == pytest.approx(0.02, abs=0.015)
    assert set(clock.seconds) <= set(run_info.PHASES)
