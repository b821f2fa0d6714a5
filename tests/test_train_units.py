"""The pure parts of the train and tune stages and of the training worker, without Ray: the run
key, the summaries and reports built from what the workers return, and what a worker does when
a window of steps closes."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.evaluation import Score
from ddpm.nn import ModelConfig
from ddpm.training import TrainConfig, Trainer, Window, fit, load_checkpoint, state_digest
from pipelines import train as train_stage
from pipelines import tune as tune_stage
from pipelines.params import TrainParams
from pipelines.project import load_params
from pipelines.store import Store
from pipelines.worker import (
    CHECKPOINT_FILE,
    Session,
    WindowCloser,
    WindowScore,
    WorkerConfig,
    window_report,
)

DATA_KEY = "data/sha256-0123"


@pytest.fixture(scope="module")
def params():
    return load_params()


def _key(params, data_key: str = DATA_KEY) -> str:
    return train_stage.Recipe.of(params, data_key).run_name()


# ---------------------------------------------------------------------------------------------
# The run key


def test_run_key_of_a_fixed_recipe_is_pinned():
    """The key names the Ray run folder that a rerun resumes and is written into ema.pt's meta:
    a change of its derivation retrains the default run and changes a DVC output."""
    recipe = train_stage.Recipe(
        seed=0,
        model=ModelConfig("tiny", image_size=16, in_channels=1),
        diffusion=DiffusionConfig(),
        train=TrainConfig(),
        num_workers=1,
        data_key=DATA_KEY,
    )
    assert recipe.run_name() == "train-6b3127399490"


def _other_value(name: str, value):
    """A valid value of TrainConfig field `name` other than `value`."""
    if name == "precision":
        return "fp32" if value != "fp32" else "bf16"
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int):
        return value * 2
    if isinstance(value, float):
        return value / 2
    raise AssertionError(f"no other value for TrainConfig.{name} = {value!r}")


def test_every_weight_shaping_value_changes_the_key(params):
    recipe = train_stage.Recipe.of(params, DATA_KEY)
    base = recipe.run_name()
    changed = {
        "seed": dataclasses.replace(recipe, seed=recipe.seed + 1),
        "model": dataclasses.replace(
            recipe, model=dataclasses.replace(recipe.model, overrides={"ch": 8})
        ),
        "diffusion": dataclasses.replace(
            recipe, diffusion=dataclasses.replace(recipe.diffusion, schedule="cosine")
        ),
        "num_workers": dataclasses.replace(recipe, num_workers=2),
        "data": dataclasses.replace(recipe, data_key="data/sha256-4567"),
    }
    for field in dataclasses.fields(TrainConfig):
        if field.name == "steps":
            continue
        value = _other_value(field.name, getattr(recipe.train, field.name))
        train = dataclasses.replace(recipe.train, **{field.name: value})
        changed[f"train.{field.name}"] = dataclasses.replace(recipe, train=train)
    keys = {what: r.run_name() for what, r in changed.items()}
    assert base not in keys.values(), [what for what, key in keys.items() if key == base]
    assert len(set(keys.values())) == len(keys)


def test_params_beyond_the_recipe_keep_the_key(params):
    """train.steps and every key TrainParams adds but num_workers (how the run is watched, kept
    and placed), and the sections train does not read, leave the run to resume."""
    base = _key(params)
    t = params.train
    knobs = {
        "steps": t.steps * 3,
        "use_gpu": not t.use_gpu,
        "cpus_per_worker": t.cpus_per_worker + 1,
        "checkpoint_every": t.checkpoint_every + 7,
        "checkpoints_to_keep": t.checkpoints_to_keep + 1,
        "max_failures": t.max_failures + 1,
        "placement_timeout_s": t.placement_timeout_s + 1,
        "log_every": t.log_every + 3,
        "out_dir": "models-elsewhere",
        "resume": not t.resume,
    }
    added = {f.name for f in dataclasses.fields(TrainParams)} - {
        f.name for f in dataclasses.fields(TrainConfig)
    }
    # Every key TrainParams adds is covered here (a new one gets a line, not a silent key).
    assert added - {"num_workers"} == set(knobs) - {"steps"}
    for name, value in knobs.items():
        assert _key(params.merged({"train": {name: value}})) == base, name
    others = {"evaluate": {"plots_dir": "plots-elsewhere"}, "sample": {"num_images": 512}}
    assert _key(params.merged(others)) == base


def test_tuned_values_change_the_key(params):
    """Train runs with Tune's choice laid over params: the choice is part of the recipe."""
    base = _key(params)
    assert _key(params.merged({"train": {"lr": params.train.lr / 3}})) != base
    assert _key(params.merged({"diffusion": {"schedule": "sigmoid"}})) != base


# ---------------------------------------------------------------------------------------------
# The train stage's summary


def _gathered(history: list[float], reported: dict) -> train_stage.Gathered:
    state = {"step": len(history), "loss_history": torch.tensor(history, dtype=torch.float64)}
    return train_stage.Gathered(state, 2, "file:///store/ray/run/step-00000030", 12.5, reported)


def test_train_summary_averages_the_last_window_and_the_first_ten_steps():
    history = [float(i) for i in range(1, 31)]  # 1 .. 30
    t = TrainParams(steps=40, log_every=4, num_workers=2)
    reported = {"resumed_from": 20, "images_per_second": 99.0}
    summary = train_stage.train_summary("train-abc", t, _gathered(history, reported))
    assert summary == {
        "run_name": "train-abc",
        "steps": 30,
        "target_steps": 40,
        "final_loss": 28.5,  # mean of 27..30
        "final_loss_stderr": pytest.approx(math.sqrt(5 / 3) / 2),  # their std / √4
        "first_loss": 5.5,  # mean of 1..10
        "resumed_from_step": 20,
        "wall_seconds": 12.5,
        "images_per_second": 99.0,
        "num_workers": 2,
        "replicas_identical": 2,
        "checkpoint": "file:///store/ray/run/step-00000030",
    }


def test_train_summary_of_a_short_history_and_no_report():
    summary = train_stage.train_summary(
        "train-abc", TrainParams(steps=3, log_every=50), _gathered([4.0, 2.0, 0.0], {})
    )
    assert (summary["final_loss"], summary["first_loss"]) == (2.0, 2.0)
    assert summary["final_loss_stderr"] == pytest.approx(2 / math.sqrt(3))
    one_step = _gathered([0.5], {})
    assert (
        train_stage.train_summary("train-abc", TrainParams(), one_step)["final_loss_stderr"] is None
    )
    assert summary["resumed_from_step"] == 0
    assert summary["images_per_second"] is None


# ---------------------------------------------------------------------------------------------
# The worker's window


def _window(final: bool = False) -> Window:
    stats = [
        {"lr": 0.001, "grad_norm": 3.0, "ema_decay": 0.9},
        {"lr": 0.002, "grad_norm": 1.0, "ema_decay": 0.95},
    ]
    return Window(11, 12, [0.5, 0.25], stats, 2.0, 0.5, 64, final)


def test_window_report_without_a_score():
    rows, metrics = window_report(_window(), resumed_from=4, found=None)
    assert rows == [
        (11, {"loss": 0.5, "lr": 0.001, "grad_norm": 3.0, "ema_decay": 0.9}),
        (
            12,
            {
                "loss": 0.25,
                "lr": 0.002,
                "grad_norm": 1.0,
                "ema_decay": 0.95,
                "images_per_second": 32.0,
                "data_wait_ms_per_step": 250.0,
            },
        ),
    ]
    assert metrics == {
        "loss": 0.375,
        "lr": 0.002,
        "grad_norm": 1.0,
        "ema_decay": 0.95,
        "step": 12,
        "resumed_from": 4,
        "images_per_second": 32.0,
        "data_wait_ms_per_step": 250.0,
    }


def test_window_report_sends_lists_to_ray_and_scalars_to_mlflow():
    score = Score(1.75, 0.125, per_image=torch.tensor([1.5, 2.0]))
    found = WindowScore("mc_bpd", score, profile=torch.tensor([0.5, 0.25, 0.125]))
    rows, metrics = window_report(_window(final=True), resumed_from=0, found=found)
    assert (metrics["mc_bpd"], metrics["mc_bpd_stderr"]) == (1.75, 0.125)
    assert metrics["per_image"] == [1.5, 2.0]
    assert metrics["bpd_profile"] == [0.5, 0.25, 0.125]
    assert (rows[-1][1]["mc_bpd"], rows[-1][1]["mc_bpd_stderr"]) == (1.75, 0.125)
    assert all(not isinstance(v, list) for _, row in rows for v in row.values())
    assert "mc_bpd" not in rows[0][1]


class RecordingSession(Session):
    """Keeps each report: step, metrics, and the checkpoint folder's files read back."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict, dict | None]] = []

    def report(self, metrics, step, folder: Path | None = None) -> None:
        saved = None
        if folder is not None:
            saved = {
                "state": load_checkpoint(folder / CHECKPOINT_FILE),
                "replica": (folder / "replica-0.sha256").read_text().strip(),
            }
        self.reports.append((step, metrics, saved))


def test_window_closer_reports_every_window_and_checkpoints_when_due(tmp_path):
    """Windows close at log_every (5) and checkpoint_every (3) and at the last step (7); the
    checkpoints at 3, 6 and 7 hold rank 0's state and its parameter digest."""
    torch.manual_seed(0)
    config = WorkerConfig(
        model=ModelConfig("tiny", image_size=8, in_channels=1),
        diffusion=DiffusionConfig("linear", 50),
        train=TrainConfig(steps=7, batch_size=2, lr=1e-3, warmup_steps=2),
        seed=3,
        store=Store(str(tmp_path)),
        data_key=DATA_KEY,
        threads=1,
        log_every=5,
        checkpoint_every=3,
    )
    trainer = Trainer.from_config(config.model, config.diffusion, config.train, seed=config.seed)
    session = RecordingSession()
    closer = WindowCloser(config, session, resumed_from=0)
    batches = iter(lambda: torch.rand(2, 1, 8, 8) * 2 - 1, None)
    fit(trainer, batches, log_every=config.log_every, hooks=closer.hooks())
    closer.finish(trainer)
    assert [step for step, _, _ in session.reports] == [3, 5, 6, 7]
    assert [step for step, _, saved in session.reports if saved] == [3, 6, 7]
    assert [m["resumed_from"] for _, m, _ in session.reports] == [0, 0, 0, 0]
    step, metrics, saved = session.reports[-1]
    assert saved["state"]["step"] == 7
    assert saved["replica"] == state_digest(trainer.model.state_dict())
    assert metrics["loss"] == trainer.loss_history[6]  # the last window is step 7 alone


def test_window_closer_reports_once_when_no_step_runs(tmp_path):
    """Ray restored a finished run: one report tells the driver where the run stood."""
    config = WorkerConfig(
        model=ModelConfig("tiny", image_size=8, in_channels=1),
        diffusion=DiffusionConfig("linear", 50),
        train=TrainConfig(steps=4, batch_size=2),
        seed=0,
        store=Store(str(tmp_path)),
        data_key=DATA_KEY,
        threads=1,
        log_every=2,
    )
    trainer = Trainer.from_config(config.model, config.diffusion, config.train, seed=0)
    trainer.step = 4
    session = RecordingSession()
    closer = WindowCloser(config, session, resumed_from=4)
    fit(trainer, iter(()), log_every=config.log_every, hooks=closer.hooks())
    closer.finish(trainer)
    assert session.reports == [(4, {"step": 4, "resumed_from": 4}, None)]


# ---------------------------------------------------------------------------------------------
# The tune stage's report


def _result(index: int, schedule: str, score: float, diff: float, kept: bool = True):
    spec = tune_stage.TrialSpec(index, schedule, 1e-3 * (index + 1))
    return tune_stage.RungResult(
        spec, 40, score, 0.01 * (index + 1), None, None, [], diff, 0.002, kept
    )


def test_tune_report_names_the_best_and_the_runner_up_gap():
    rung0 = [_result(i, "linear" if i % 2 else "cosine", 2.0 + i, i) for i in range(4)]
    rung1 = [_result(2, "cosine", 1.5, 0.0), _result(0, "cosine", 1.75, 0.25)]
    report = tune_stage.tune_report([rung0, rung1], "mc_bpd")
    assert report == {
        "enabled": True,
        "best_schedule": "cosine",
        "best_lr": pytest.approx(3e-3),
        "best_mc_bpd": 1.5,
        "best_mc_bpd_stderr": pytest.approx(0.03),
        "runner_up_gap": 0.25,
        "runner_up_gap_stderr": 0.002,
        "num_trials": 4,
        "num_rungs": 2,
        "num_stopped_early": 2,
    }
    # metrics/tune.json: the best trial under the evaluate stage's names for the same estimate.
    assert tune_stage.tune_headline(report, "mc_bpd") == {
        "bpd_mc": 1.5,
        "bpd_mc_stderr": pytest.approx(0.03),
        "lr": pytest.approx(3e-3),
        "schedule": "cosine",
    }


def test_tune_report_of_one_trial_has_no_gap_and_no_nan():
    only = _result(0, "linear", 12.0, 0.0)
    only.stderr = math.nan  # a score without a standard error
    report = tune_stage.tune_report([[only]], "classifier_fd")
    assert report["best_classifier_fd_stderr"] is None
    assert (report["runner_up_gap"], report["runner_up_gap_stderr"]) == (None, None)
    assert (report["num_trials"], report["num_rungs"], report["num_stopped_early"]) == (1, 1, 0)
    # No standard error, no column for one.
    assert tune_stage.tune_headline(report, "classifier_fd") == {
        "fd": 12.0,
        "lr": pytest.approx(1e-3),
        "schedule": "linear",
    }
