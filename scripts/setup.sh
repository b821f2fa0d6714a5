#!/usr/bin/env bash
# Create .venv and install the library, the DAG's dependencies (the `pipeline` extra: Ray, MLflow,
# DVC, ...) and the test tools. Safe to rerun. `pip install .` alone installs just the library.
# torch/torchvision are pinned in pyproject.toml: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[pipeline,dev]"
.venv/bin/python -c "import torch, ray, mlflow, dvc, pyarrow; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
# The S3 tests need these; a broken boto stack should fail setup, not the suite much later.
.venv/bin/python -c "import boto3, dvc_s3, moto.server; print('installed: boto3', boto3.__version__, '| moto', moto.__version__)"
