#!/usr/bin/env bash
# Lint, format check and the whole test suite (unit tests of ddpm/ and end-to-end tests of the DAG).
# With arguments, pytest runs just those (e.g. scripts/test.sh tests/test_cli.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# tests/test_mlflow_ui.py drives Debian's Chromium, which only the tests need: installed here (it
# takes root: apt-get), not by setup.sh. Without it that test fails saying how to install it.
scripts/install_browser.sh || echo "test: could not install Chromium (scripts/install_browser.sh needs root); tests/test_mlflow_ui.py will fail" >&2
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q --durations=25 "$@"
fi
# The separate-hosts tests (their own network namespaces, Ray cluster, S3 and MLflow servers)
# mostly wait, on health checks, timeouts and an outage's 30 s, not on the CPU: they run in a
# pytest process of their own beside the rest of the suite, their report printed after its. The
# slowest tests' times are printed too, so that a slower suite shows where.
multi_host_log=$(mktemp)
.venv/bin/python -m pytest -q --durations=10 tests/test_multi_host.py >"$multi_host_log" 2>&1 &
multi_host=$!
# Interrupted, the background run is interrupted too (SIGINT: its fixtures then remove the
# namespaces and end their processes).
trap 'kill -INT "$multi_host" 2>/dev/null || true' INT TERM
status=0
.venv/bin/python -m pytest -q --durations=25 --ignore=tests/test_multi_host.py || status=$?
multi_host_status=0
wait "$multi_host" || multi_host_status=$?
echo "---- tests/test_multi_host.py (run beside the rest) ----"
cat "$multi_host_log"
rm -f "$multi_host_log"
if [ "$status" -ne 0 ] || [ "$multi_host_status" -ne 0 ]; then
  exit 1
fi
