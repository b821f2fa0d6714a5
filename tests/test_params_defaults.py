"""One source of the pipeline's defaults: the params schema's defaults are params.yaml's, while the
library's configs keep the paper's values for library users (pipelines/params.py)."""

from __future__ import annotations

from pathlib import Path

from ddpm.sampling import SamplerConfig
from ddpm.training import TrainConfig
from pipelines.params import Params, load_params_file, params_from_dict

REPO = Path(__file__).resolve().parents[1]
ABSENT = "<absent>"


def test_schema_defaults_are_params_yaml_key_by_key():
    schema = params_from_dict({}).flat()
    written = load_params_file(REPO / "params.yaml").flat()
    differing = {
        key: (schema.get(key, ABSENT), written.get(key, ABSENT))
        for key in sorted(schema.keys() | written.keys())
        if schema.get(key, ABSENT) != written.get(key, ABSENT)
    }
    listing = "; ".join(f"{k}: schema {s!r}, params.yaml {w!r}" for k, (s, w) in differing.items())
    assert not differing, f"{len(differing)} defaults differ from params.yaml: {listing}"
    assert Params() == params_from_dict({})


def test_library_configs_keep_the_papers_values():
    """The pipeline restates its digits-run defaults in its own sections, not in the library's
    configs, which library users get with the paper's CIFAR-10 values."""
    paper = TrainConfig()
    assert (paper.steps, paper.batch_size, paper.lr, paper.warmup_steps) == (
        800_000,
        128,
        2e-4,
        5000,
    )
    assert (paper.ema_decay, paper.ema_warmup) == (0.9999, False)
    assert SamplerConfig().num_steps is None  # Algorithm 2 over all T steps
    # What the pipeline hands the library by default is params.yaml's, not the paper's.
    written = load_params_file(REPO / "params.yaml")
    assert Params().train_config() == written.train_config() != paper
    assert Params().sampler_config() == written.sampler_config() != SamplerConfig()
