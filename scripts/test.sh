#!/usr/bin/env bash
# Lint, format check and the whole test suite (unit tests of ddpm/ and end-to-end tests of the DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# tests/test_mlflow_ui.py drives Debian's Chromium, which only the tests need: installed here (it
# takes root: apt-get), not by setup.sh. Without it that test fails saying how to install it.
scripts/install_browser.sh || echo "test: could not install Chromium (scripts/install_browser.sh needs root); tests/test_mlflow_ui.py will fail" >&2
# The slowest tests' times, so that a slower suite shows where.
.venv/bin/python -m pytest -q --durations=25 "$@"
