"""Which CPU kernels every process of a stage runs: the machine's fastest, or ones every x86-64
machine has, so that a run reproduces bit for bit on another machine.

torch, oneDNN and the BLAS libraries under torch (MKL) and numpy (OpenBLAS) pick vector code by
CPU (AVX2, AVX-512, ...), and kernels of different widths sum in different orders: a classifier
trained on an AVX-512 machine differs in its last bits from one trained on an AVX2 machine, and
training amplifies that into different weights and metrics. `reproducibility.cpu_kernels:
portable` caps all four at AVX2 in the stage's driver and, through the runtime environment, in
every Ray worker on every node; `native` leaves each machine its own choice (faster where it has
AVX-512, reproducible only on the same kind of CPU). Each variable only caps: on an AVX2-only
machine it changes nothing.

torch, oneDNN and MKL read their variable once, at their first CPU kernel, not at import: setting
it before any tensor work in the process is enough, and `pin_this_process` checks torch's.
OpenBLAS reads its own when numpy loads, which a stage's driver has done by then: the pin holds
in the Ray workers, which compute every feature statistic and metric (the driver only averages
what they return, without matrix products).
On other architectures (ARM) there is nothing to cap to: portable pins nothing there, and
their results differ from x86 ones whatever the setting (docs/PIPELINE.md).
"""

from __future__ import annotations

import os
import platform

from pipelines.params import Params

# The ISA level every supported x86-64 machine has, as each library spells it.
PORTABLE_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
# Every variable kernel_env may set; one the user already set is kept as it is.
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENBLAS_CORETYPE",
    "CUBLAS_WORKSPACE_CONFIG",
)
X86_MACHINES = ("x86_64", "amd64")


def is_x86() -> bool:
    return platform.machine().lower() in X86_MACHINES


def kernel_env(params: Params) -> dict[str, str]:
    """The variables that pin the kernels for params' settings; {} for native kernels and
    nondeterministic GPUs. A value the user set in the environment wins (e.g.
    ATEN_CPU_CAPABILITY=default to test scalar code)."""
    wanted = {}
    if params.reproducibility.cpu_kernels == "portable":
        wanted.update(PORTABLE_KERNELS)
    if params.reproducibility.gpu_deterministic:
        wanted.update(DETERMINISTIC_CUBLAS)
    users = {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}
    return {name: users.get(name, value) for name, value in wanted.items()}


# cuBLAS reuses its workspace deterministically only with a fixed configuration of it; without
# the variable, torch's deterministic mode raises on the first CUDA matmul.
DETERMINISTIC_CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# What a Ray worker runs at its start with reproducibility.gpu_deterministic (a dotted name:
# Ray imports it in the worker, which has this package through the job's code).
GPU_SETUP_HOOK = "pipelines.kernels.make_gpu_deterministic"


def make_gpu_deterministic() -> None:
    """torch's deterministic algorithms in this process: CUDA kernels that would accumulate in a
    varying order (atomics) are replaced by ordered ones or raise, and cuDNN stops choosing
    among convolution algorithms by timing. Slower on GPUs; CPUs are deterministic already."""
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def pin_this_process(params: Params) -> str:
    """Pin this process's kernels (before it runs any tensor work), with
    reproducibility.gpu_deterministic also torch's deterministic mode, and say what runs, e.g.
    "portable (AVX2)". Raises when torch already chose other kernels in this process, which
    would make the driver's results differ from its workers'."""
    import torch

    wanted = kernel_env(params)
    if not is_x86():
        wanted = {k: v for k, v in wanted.items() if k not in PORTABLE_KERNELS}
    os.environ.update(wanted)
    if params.reproducibility.gpu_deterministic:
        make_gpu_deterministic()
    chosen = torch.backends.cpu.get_cpu_capability()
    capped = wanted.get("ATEN_CPU_CAPABILITY")
    if capped and chosen.lower() != capped.lower():
        raise RuntimeError(
            f"reproducibility.cpu_kernels is portable but torch already runs {chosen} kernels in "
            "this process: the stage ran tensor work before its kernels were pinned"
        )
    return in_effect()


def in_effect() -> str:
    """What this process runs: "portable (AVX2)" or "native (AVX512)" (+ ", deterministic GPU"),
    for run_info and MLflow."""
    import torch

    kind = "portable" if os.environ.get("ATEN_CPU_CAPABILITY") else "native"
    label = f"{kind} ({torch.backends.cpu.get_cpu_capability()})"
    return label + (", deterministic GPU" if torch.are_deterministic_algorithms_enabled() else "")
