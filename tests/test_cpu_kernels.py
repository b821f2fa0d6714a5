"""`reproducibility.cpu_kernels: portable` makes an AVX-512 machine compute what an AVX2-only one
does, bit for bit, in the stage's own process and in its Ray workers.

One machine stands in for both kinds: the AVX2 machine is this one with torch, oneDNN, MKL and
OpenBLAS capped by their variables (an AVX2-only CPU picks exactly those kernels). Each probe runs
in a fresh process, because the libraries choose their kernels once per process: a few classifier
steps, a few DDPM training steps, a sampling shard and a Fréchet distance with its bootstrap
standard error (float64 products in MKL and OpenBLAS), reduced to digests of their exact bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What an AVX2-only CPU makes each library pick.
CAPPED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
KERNEL_VARIABLES = tuple(CAPPED)


def _work() -> dict[str, str]:
    """Digests of classifier weights, DDPM weights after a few steps, and a sampling shard."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from ddpm.diffusion import DiffusionConfig
    from ddpm.metrics.classifier import train_classifier
    from ddpm.nn import ModelConfig
    from ddpm.sampling import sample
    from ddpm.training import TrainConfig, Trainer, state_digest

    torch.set_num_threads(1)
    digits = load_digits()
    images = torch.from_numpy(digits.images[:256].astype("float32")).unsqueeze(1) / 8.0 - 1.0
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(-1, 1)
    classifier, _ = train_classifier(
        images, np.asarray(digits.target[:256]), epochs=1, batch_size=64, seed=0
    )
    trainer = Trainer.from_config(
        ModelConfig("tiny", image_size=16, in_channels=1),
        DiffusionConfig("linear", 1000),
        TrainConfig(lr=1e-3, warmup_steps=0, batch_size=32),
    )
    for step in range(4):
        trainer.train_step(images[step * 32 : (step + 1) * 32])
    shard = sample(
        trainer.diffusion,
        trainer.model,
        (4, 1, 16, 16),
        num_steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    from ddpm.metrics import FeatureStats, frechet_distance, frechet_distance_stderr

    features = np.random.default_rng(0).normal(size=(256, 32)) + 0.5
    reference = FeatureStats(32).update(np.random.default_rng(1).normal(size=(512, 32)))
    samples = FeatureStats(32).update(features)
    fd = frechet_distance(samples.mean, samples.cov, reference.mean, reference.cov)
    fd_stderr = frechet_distance_stderr(features, reference.mean, reference.cov, replicates=20)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "fd": np.array([fd, fd_stderr]).tobytes().hex(),
        "classifier": state_digest(classifier.state_dict()),
        "train": state_digest(trainer.model.state_dict()),
        "sample": hashlib.sha256(shard.numpy().tobytes()).hexdigest(),
    }


def _probe_portable() -> dict[str, str]:
    """The pipeline's own mechanism: params pin this process, and a Ray worker started with the
    stage's runtime environment computes the same work."""
    import ray

    from pipelines import cluster, kernels
    from pipelines.params import load_params_file

    params = load_params_file(REPO / "params.yaml").merged(
        {"reproducibility": {"cpu_kernels": "portable"}, "ray": {"num_cpus": 2}}
    )
    label = kernels.pin_this_process(params)
    result = {**_work(), "label": label}
    cluster.init_ray(params, "test-cpu-kernels")
    try:
        result["worker"] = ray.get(ray.remote(num_cpus=1)(_work).remote(), timeout=600)
    finally:
        ray.shutdown()
    return result


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    if mode == "capped":
        env.update(CAPPED)
    done = subprocess.run(
        [sys.executable, __file__, mode],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def native() -> dict:
    result = _probe("native")
    if result["capability"] != "AVX512":
        pytest.skip(
            f"this CPU runs {result['capability']} kernels natively: without AVX-512 native and "
            "portable kernels are the same, so there is no difference to show"
        )
    return result


@pytest.fixture(scope="module")
def capped(native) -> dict:
    return _probe("capped")


def test_native_kernels_differ_from_the_avx2_machines(native, capped):
    assert capped["capability"] == "AVX2"
    # Training amplifies the summation order's last bits: the weights differ.
    assert native["classifier"] != capped["classifier"]
    assert native["train"] != capped["train"]
    assert native["sample"] != capped["sample"]


def test_portable_kernels_equal_the_avx2_machines_in_driver_and_workers(capped):
    portable = _probe("portable")
    assert portable["label"] == "portable (AVX2)"
    for key in ("classifier", "train", "sample", "fd"):
        assert portable[key] == capped[key], key
        assert portable["worker"][key] == capped[key], f"Ray worker: {key}"
    assert portable["worker"]["capability"] == "AVX2"


def test_kernel_env_sets_every_pinning_variable_and_keeps_the_users(monkeypatch):
    from pipelines import kernels
    from pipelines.params import load_params_file

    # The names kernel_env reads back from the environment are exactly the ones it may set.
    pinned = {**kernels.PORTABLE_KERNELS, **kernels.DETERMINISTIC_CUBLAS}
    assert set(kernels.KERNEL_VARIABLES) == set(pinned)
    params = load_params_file(REPO / "params.yaml").merged(
        {"reproducibility": {"cpu_kernels": "portable", "gpu_deterministic": True}}
    )
    for name in pinned:
        monkeypatch.delenv(name, raising=False)
    assert kernels.kernel_env(params) == pinned
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # a user testing scalar code
    assert kernels.kernel_env(params) == {**pinned, "ATEN_CPU_CAPABILITY": "default"}


if __name__ == "__main__":
    outcome = _probe_portable() if sys.argv[1] == "portable" else _work()
    print(json.dumps(outcome))
