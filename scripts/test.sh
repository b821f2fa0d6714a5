#!/usr/bin/env bash
# Lint, format check and the whole test suite (unit tests of ddpm/ and end-to-end tests of the DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
