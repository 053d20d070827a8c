"""The GPU suite's ``environment`` step (``benchmarks/gpu_suite.py``): GPU, driver, versions,
the command, the git commit, and the device peaks (datasheet bf16 and a measured matrix
product) that the ``train_step`` step's MFU divides by."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from smi_hub.script_modules import load_file_module

suite_step = load_file_module(
    "smi_benchmarks_gpu_suite_step", Path(__file__).with_name("gpu_suite_step.py")
)
Step = suite_step.Step
ROOT = suite_step.ROOT
sync_device = suite_step.sync_device

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity); first match wins.
DATASHEET_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
)


def git_revision() -> dict[str, Any]:
    """The checkout's commit: from git, else from ``data/COMMIT`` (``make gpu-data`` writes it,
    for machines that receive the working tree without ``.git``)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            return {
                "commit": head.stdout.strip(),
                "dirty": bool(dirty.stdout.strip()),
                "from": "git",
            }
    except (OSError, subprocess.SubprocessError):
        pass
    saved = ROOT / "data" / "COMMIT"
    if saved.is_file():
        commit, _, note = saved.read_text().strip().partition("\n")
        return {"commit": commit, "note": note or None, "from": "data/COMMIT (make gpu-data)"}
    return {"commit": None, "from": "unknown: no git and no data/COMMIT"}


def nvidia_smi() -> str | None:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def datasheet_bf16(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def device_peaks(suite: Any) -> dict[str, Any]:
    """Datasheet bf16 peak of the device and a measured large matrix product, cached in
    ``suite.peaks`` (``suite``: the runner's ``Suite``)."""
    if suite.peaks is not None:
        return suite.peaks
    device, args = suite.device, suite.args
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    n = 8192 if cuda and not args.quick else 256
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    reps = 10
    sync_device(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync_device(device)
    measured = 2 * n**3 * reps / (time.perf_counter() - t0)
    datasheet = args.peak_tflops * 1e12 if args.peak_tflops else None
    if datasheet is None and cuda:
        datasheet = datasheet_bf16(name)
    suite.peaks = {
        "device_name": name,
        "datasheet_bf16_flops": datasheet,
        "datasheet_source": "--peak-tflops"
        if args.peak_tflops
        else "NVIDIA datasheet, dense bf16 tensor core"
        if datasheet
        else "unknown device (pass --peak-tflops)",
        "measured_matmul_flops": measured,
        "measured_matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} on random data, "
        f"mean of {reps} after 3 warm-ups",
    }
    return suite.peaks


def step_environment(step: Step) -> None:
    import torchvision

    r = step.result
    r["command"] = os.environ.get("SMI_GPU_SUITE_COMMAND") or shlex.join(
        [Path(sys.executable).name, *sys.argv]
    )
    r["python_command"] = shlex.join([sys.executable, *sys.argv])
    r["git"] = git_revision()
    r["python"] = platform.python_version()
    r["platform"] = platform.platform()
    r["cpu_count"] = os.cpu_count()
    r["torch"] = torch.__version__
    r["torchvision"] = torchvision.__version__
    r["torch_cuda"] = torch.version.cuda
    r["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    r["env"] = {
        k: os.environ.get(k)
        for k in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH", "SMI_FASHION_MNIST_DIR")
    }
    if step.device.type == "cuda":
        p = torch.cuda.get_device_properties(step.device)
        r["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_bytes": p.total_memory,
            "multiprocessors": p.multi_processor_count,
            "nvidia_smi": nvidia_smi(),
        }
    step.save()
    r["peak"] = device_peaks(step.suite)
