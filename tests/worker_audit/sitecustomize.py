"""Loaded by every Python process of the multi-node test cluster (its folder is on PYTHONPATH):
in Ray worker processes only, records each file opened under $DDPM_AUDIT_ROOT.

tests/test_pipeline_e2e.py points DDPM_AUDIT_ROOT at the driver's repository and asserts that no
worker ever read it: workers must get their data through the shared store. Python source is not
counted: Ray puts the driver's working directory first on every worker's sys.path, so on one
machine workers import the repository's copy of the code (on other machines that folder does
not exist and they import the copy the job ships, see pipelines.common.init_ray). Each worker
also leaves `<pid>.started` holding its working directory, which proves the hook ran.
"""

import os
import sys

_ROOT = os.environ.get("DDPM_AUDIT_ROOT")
_LOG = os.environ.get("DDPM_AUDIT_DIR")
_CODE = (".py", ".pyc", ".so")

if _ROOT and _LOG and any(str(arg).endswith("default_worker.py") for arg in sys.argv[:2]):
    with open(os.path.join(_LOG, f"{os.getpid()}.started"), "w") as marker:
        marker.write(os.getcwd())

    def _record(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_ROOT + os.sep) and not path.endswith(_CODE):
            with open(os.path.join(_LOG, f"{os.getpid()}.read"), "a") as log:
                log.write(f"{event} {path} (argv {sys.argv[1:4]})\n")

    sys.addaudithook(_record)
