"""Settings shared by every test."""

import os

# Ray 2.60 turns on token auth for each new local cluster; the tests start throwaway local
# clusters on 127.0.0.1, so they switch it off explicitly rather than depend on ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# MLflow and DVC must never try to phone home from a test.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# One intra-op thread per process: the suite runs Ray workers beside the test process on two
# cores, and OpenMP threads spin-waiting for a busy core made single tests 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
