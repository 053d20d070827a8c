"""GPU suite: what only a GPU can show, in one command with a time budget per step.

    bash benchmarks/gpu_suite.sh                            # on the GPU machine (docs/benchmarks.md)
    python benchmarks/gpu_suite.py --out results.json       # the same steps, without the wrapper
    python benchmarks/gpu_suite.py --quick --out r.json     # CPU dry run at tiny sizes (the CI test)

Steps, in this order (``--steps`` picks some):

* ``environment``: GPU, driver, torch / CUDA / cuDNN versions, the command, the git commit, and
  the device's bf16 matrix-product rate (measured) next to its datasheet peak;
* ``train_step``: one full training step at paper scale (ResNet-50, 224 px, batch 256,
  projector 8192-8192-8192, bf16 autocast, channels_last, LARS) for SMI, Barlow Twins and VICReg
  alternating in one process: images/s, median step time, peak memory (one model alive at a
  time), FLOPs counted by ``FlopCounterMode`` and model FLOP utilisation; then the same under
  ``torch.compile`` if enough of the step's budget is left;
* ``loss_cost``: the loss alone (``benchmarks/loss_cost.py``'s functions) over N x D, time,
  memory and the crossover N where SMI's loss becomes costlier than Barlow Twins';
* ``extraction``: ``smi_hub.extract_features`` against a plain torchvision ResNet-50 forward on
  the same preprocessed images (fp32, channels_last, bf16), then both reading PNG files through
  DataLoader workers;
* ``fmnist_training``: the SMI Fashion-MNIST recipe at full width (base width 64, bf16) with
  ``python -m training.pretrain`` for as many steps as fit the budget (a short calibration run
  measures the step rate), k-NN on the test set (``python -m training.evaluate knn``), export
  (``smi_hub.export.export_checkpoint``, what ``smi-hub export`` runs) and the comparison with the
  embedded default model's k-NN accuracy.

Not in the default run (the steps above fill a 10-minute command): ``input_pipeline``
(``--steps input_pipeline``): ``benchmarks/input_pipeline.py`` on 20,000 JPEGs it makes: the
per-core cost of today's worker pipeline against the batched one, then paper-scale pretraining
steps fed from the files (batched augmentation on the GPU) against the same steps alone, then
``smi-hub extract`` of 10,000 of the files with ``--decode cpu`` against ``--decode device``.

Each step has a time budget: a step checks it between measurements and stops with what it has
measured (status ``timed_out``); a step still running at budget + grace is interrupted
(SIGALRM). The JSON is rewritten atomically after every measurement, so a killed run still
leaves every finished measurement. The exported model is copied next to the JSON with its
weights file cut into parts of at most 15 MiB (``cat model.safetensors.part* >
model.safetensors`` restores it; its sha256 is in config.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smi_hub.script_modules import load_file_module  # noqa: E402


def _sibling(name: str) -> types.ModuleType:
    """A benchmark script next to this one, loaded from its file as ``smi_benchmarks_<name>``
    (``benchmarks/`` is no package, and an installed package of that name must not shadow it)."""
    return load_file_module(f"smi_benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")


extract_bench = _sibling("extract")
loss_cost = _sibling("loss_cost")
input_bench = _sibling("input_pipeline")
train_bench = _sibling("train_step")

STEPS = ("environment", "train_step", "loss_cost", "extraction", "fmnist_training")
EXTRA_STEPS = ("input_pipeline",)
LOSSES = ("smi", "barlow_twins", "vicreg")
# Seconds per step on the GPU: 515 s in all; with the interrupt grace and start-up the suite
# ends within 9.5 minutes, inside the GPU machine's 10-minute limit per command.
BUDGETS = {
    "environment": 15,
    "train_step": 120,
    "loss_cost": 45,
    "extraction": 45,
    "fmnist_training": 290,
}
# Steps run only when named with --steps, each with its own budget.
EXTRA_BUDGETS = {"input_pipeline": 300}
QUICK_EXTRA_BUDGETS = {"input_pipeline": 120}
QUICK_BUDGETS = {
    "environment": 20,
    "train_step": 60,
    "loss_cost": 30,
    "extraction": 40,
    "fmnist_training": 150,
}
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity); first match wins.
DATASHEET_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
)
TRAIN = {
    "full": {
        "arch": "resnet50", "base_width": 64, "small_stem": False, "image_size": 224,
        "batch_size": 256, "projector": [8192, 8192, 8192], "precision": "bf16",
        "channels_last": True, "warmup": 3, "steps": 10,
        "compile_backend": "inductor", "min_compile_s": 40.0,
    },
    "quick": {
        "arch": "resnet18", "base_width": 8, "small_stem": True, "image_size": 32,
        "batch_size": 16, "projector": [64, 64, 64], "precision": "bf16",
        "channels_last": True, "warmup": 1, "steps": 2,
        "compile_backend": "eager", "min_compile_s": 5.0,
    },
}  # fmt: skip
LOSS_GRID = {
    "full": {"n": (256, 512, 1024, 2048, 4096), "d": (2048, 8192), "max_reps": 10},
    "quick": {"n": (16, 32), "d": (32,), "max_reps": 2},
}
EXTRACT = {
    "full": {"arch": "resnet50", "image_size": 224, "images": 2048, "batch_size": 256},
    "quick": {"arch": "resnet18", "image_size": 32, "images": 64, "batch_size": 32},
}
INPUT = {
    "full": {"images": 20_000, "per_core_images": 200, "repeats": 2, "batch_size": 256,
             "steps": 40, "model": input_bench.PAPER_MODEL, "extract_images": 10_000,
             "extract_model": input_bench.EXTRACT_MODEL},
    "quick": {"images": 32, "per_core_images": 8, "repeats": 1, "batch_size": 8, "steps": 2,
              "model": {"arch": "resnet18", "base_width": 8, "small_stem": True,
                        "image_size": 32, "projector": [64, 64, 64], "precision": "bf16",
                        "channels_last": False},
              "extract_images": 16,
              "extract_model": {"arch": "resnet18", "base_width": 8, "image_size": 64}},
}  # fmt: skip
FMNIST_CONFIG = "training/configs/fmnist_resnet18_smi.yaml"
FMNIST_TRAIN_IMAGES = 60_000
PART_BYTES = 15 * 2**20  # $OUT returns files of at most 16 MiB
EXPORT_NAME = {"full": "smi_resnet18w64_fmnist", "quick": "smi_resnet18w8_fmnist_quick"}


class StepTimeout(Exception):
    """A step ran out of its time budget."""


class Suite:
    """The results JSON, the settings, and the device peaks shared by the steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.mode = "quick" if args.quick else "full"
        self.path = Path(args.out)
        self.artifacts = Path(args.artifacts) if args.artifacts else self.path.parent
        self.peaks: dict[str, Any] | None = None
        self.data: dict[str, Any] = {
            "suite": "smi-hub benchmarks/gpu_suite.py",
            "mode": self.mode,
            "device": str(self.device),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "finished": False,
            "steps": {},
        }

    def save(self) -> None:
        """Rewrite the JSON atomically (a reader sees the old or the new file, never a mix)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


class Step:
    """What a step function gets: its result dict (filled as it goes) and its deadline."""

    def __init__(self, suite: Suite, record: dict[str, Any], budget_s: float) -> None:
        self.suite, self.args, self.device = suite, suite.args, suite.device
        self.quick = suite.args.quick
        self.result: dict[str, Any] = record["result"]
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`StepTimeout` once the budget is spent (between measurements)."""
        if self.left() <= 0:
            raise StepTimeout("budget spent; stopped between measurements")

    def save(self) -> None:
        self.suite.save()


def _alarm(signum, frame) -> None:  # noqa: ARG001
    raise StepTimeout("interrupted at budget + grace")


def run_step(
    suite: Suite, name: str, fn: Callable[[Step], None], budget_s: float, grace_s: float
) -> dict[str, Any]:
    """Run one step within its budget; record status ``ok``, ``timed_out`` or ``error`` and
    keep whatever the step put in its result before it stopped."""
    record: dict[str, Any] = {"status": "running", "budget_s": budget_s, "result": {}}
    suite.data["steps"][name] = record
    suite.save()
    print(f"[gpu_suite] {name}: budget {budget_s:.0f} s", flush=True)
    hard = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _alarm) if hard else None
    if hard:
        signal.setitimer(signal.ITIMER_REAL, max(budget_s + grace_s, 0.01))
    t0 = time.monotonic()
    try:
        try:
            fn(Step(suite, record, budget_s))
            record["status"] = "ok"
        finally:  # disarmed before any handler runs: no alarm can escape this function
            if hard:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    except StepTimeout as e:
        record["status"], record["timeout"] = "timed_out", str(e)
    except Exception as e:  # a failed step must not stop the others
        record["status"], record["error"] = "error", f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        record["elapsed_s"] = round(time.monotonic() - t0, 2)
        _free_memory(suite.device)
        suite.save()
    print(f"[gpu_suite] {name}: {record['status']} in {record['elapsed_s']} s", flush=True)
    return record


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


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


def device_peaks(suite: Suite) -> dict[str, Any]:
    """Datasheet bf16 peak of the device and a measured large matrix product (cached)."""
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
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
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


# --------------------------------------------------------------------------------------------
# train_step
# --------------------------------------------------------------------------------------------


def _timed_step(runner: train_bench.Runner, a: torch.Tensor, b: torch.Tensor) -> float:
    _sync(runner.device)
    t0 = time.perf_counter()
    runner.step(a, b)
    _sync(runner.device)
    return time.perf_counter() - t0


def _peak_memory(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


def _train_rows(step: Step, times: dict[str, list[float]], compiled: bool) -> None:
    """(Re)write the rows of one variant from the step times measured so far."""
    res, cfg = step.result, step.result["settings"]
    peaks = device_peaks(step.suite)
    rows = [r for r in res["rows"] if r["compiled"] != compiled]
    for name, t in times.items():
        if not t:
            continue
        s = statistics.median(t)
        per = res["per_config"].get(name, {})
        flops = per.get("flops_per_step")
        rate = flops / s if flops else None
        row = {
            "loss": name,
            "compiled": compiled,
            "steps_timed": len(t),
            "step_ms_median": round(1e3 * s, 2),
            "step_ms_min": round(1e3 * min(t), 2),
            "images_per_s": round(cfg["batch_size"] / s, 1),
            "peak_memory_bytes": None if compiled else per.get("peak_memory_bytes"),
            "flops_per_step": flops,
            "achieved_tflops": round(rate / 1e12, 2) if rate else None,
            "mfu_datasheet": round(rate / peaks["datasheet_bf16_flops"], 4)
            if rate and peaks["datasheet_bf16_flops"]
            else None,
            "mfu_measured_matmul": round(rate / peaks["measured_matmul_flops"], 4)
            if rate
            else None,
        }
        rows.append(row)
    for compiled_flag in (False, True):
        group = [r for r in rows if r["compiled"] == compiled_flag]
        smi = next((r for r in group if r["loss"] == "smi"), None)
        for r in group:
            r["images_per_s_ratio_to_smi"] = (
                round(r["images_per_s"] / smi["images_per_s"], 3) if smi else None
            )
    res["rows"] = rows
    step.save()


def _alternate(
    step: Step, runners: list[train_bench.Runner], a, b, warmup: int, steps: int, compiled: bool
):
    """Steps of every objective in turn, round by round; rows updated after every round."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(warmup + steps):
        step.check()
        for r in runners:
            t = _timed_step(r, a, b)
            if i >= warmup:
                times[r.name].append(t)
        if i >= warmup:
            _train_rows(step, times, compiled)


def step_train(step: Step) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(TRAIN[step.suite.mode])
    device = step.device
    res = step.result
    peaks = device_peaks(step.suite)
    res["settings"] = {
        **cfg,
        "losses": list(LOSSES),
        "device_name": peaks["device_name"],
        "data": "Fashion-MNIST test images resized (benchmarks/train_step.py real_batch); "
        "view B is view A mirrored",
        "optimizer": "LARS (training.optim.build_optimizer via benchmarks/train_step.py Runner)",
        "timing": "median wall time of full steps (both views forward, loss, backward, LARS "
        "step), synchronized, objectives alternating step by step after warm-up",
        "memory": "torch.cuda.max_memory_allocated over one step with only that objective's "
        "model and optimizer alive (weights, gradients, momentum, activations)",
        "flops": "torch.utils.flop_counter.FlopCounterMode over one eager step (forward, loss, "
        "backward; 2 FLOPs per multiply-add; the optimizer's elementwise work not counted)",
        "mfu": "achieved FLOP/s over the datasheet dense bf16 peak (mfu_datasheet) and over the "
        "measured bf16 matrix-product rate (mfu_measured_matmul)",
    }
    res["per_config"], res["rows"] = {}, []
    ns = argparse.Namespace(
        arch=cfg["arch"], base_width=cfg["base_width"], small_stem=cfg["small_stem"],
        projector=cfg["projector"], image_size=cfg["image_size"],
        channels_last=cfg["channels_last"], precision=cfg["precision"], seed=0,
    )  # fmt: skip
    x = train_bench.real_batch(cfg["batch_size"], cfg["image_size"]).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    a, b = x.contiguous(memory_format=fmt), torch.flip(x, dims=[3]).contiguous(memory_format=fmt)
    for name in LOSSES:  # memory and FLOPs, one model alive at a time
        step.check()
        runner = train_bench.Runner(ns, name, device)
        runner.step(a, b)
        mem = _peak_memory(lambda r=runner: r.step(a, b), device)
        with FlopCounterMode(display=False) as counter:
            runner.step(a, b)
        res["per_config"][name] = {
            "peak_memory_bytes": mem,
            "flops_per_step": int(counter.get_total_flops()),
        }
        step.save()
        del runner
        _free_memory(device)
    runners = [train_bench.Runner(ns, name, device) for name in LOSSES]
    _alternate(step, runners, a, b, cfg["warmup"], cfg["steps"], compiled=False)
    if step.left() < cfg["min_compile_s"]:
        res["compile"] = (
            f"skipped: {step.left():.0f} s of the budget left, needs {cfg['min_compile_s']}"
        )
        return
    res["compile"] = {"backend": cfg["compile_backend"], "first_step_s": {}}
    try:
        for r in runners:
            r.model = torch.compile(r.model, backend=cfg["compile_backend"])
        for r in runners:  # the first steps compile forward and backward
            step.check()
            res["compile"]["first_step_s"][r.name] = round(_timed_step(r, a, b), 2)
            step.save()
        _alternate(step, runners, a, b, cfg["warmup"], cfg["steps"], compiled=True)
    except StepTimeout:
        raise
    except Exception as e:  # a compiler failure is a result; the eager rows stand
        res["compile"]["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        del runners
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# loss_cost
# --------------------------------------------------------------------------------------------


def step_loss_cost(step: Step) -> None:
    grid = LOSS_GRID[step.suite.mode]
    device, res = step.device, step.result
    meter = loss_cost.PeakMemory(device)
    res["settings"] = {
        "n": list(grid["n"]),
        "d": list(grid["d"]),
        "losses": list(LOSSES),
        "dtype": "float32",
        "timing": f"median of up to {grid['max_reps']} loss(z_a, z_b).backward() calls after "
        "a warm-up call, objectives alternating (benchmarks/loss_cost.py measure_times)",
        "memory_method": meter.method,
    }
    res["cases"], res["crossover"] = [], {}
    for n in grid["n"]:  # every width at each N first: a timeout keeps the small N of all D
        for d in grid["d"]:
            if res["cases"]:
                step.check()
            case: dict[str, Any] = {"n": n, "d": d, "grad_bytes": 2 * n * d * 4}
            case["losses"] = loss_cost.measure_times(
                n, d, list(LOSSES), device, 0, max_reps=grid["max_reps"]
            )
            peaks = loss_cost.measure_memory(n, d, list(LOSSES), device, 0, meter)
            for name, peak in peaks.items():
                case["losses"][name]["peak_bytes"] = peak
            res["cases"].append(loss_cost.add_ratios(case))
            res["crossover"] = {str(w): loss_cost.crossover(res["cases"], w) for w in grid["d"]}
            step.save()


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------


def step_extraction(step: Step) -> None:
    from PIL import Image
    from torch.utils.data import DataLoader

    import smi_hub
    from smi_hub.fashion_mnist import load_arrays

    cfg = EXTRACT[step.suite.mode]
    device, res = step.device, step.result
    workers = 2 if step.quick else min(8, max(1, (os.cpu_count() or 2) - 2))
    reps = 1 if step.quick else 3
    n, bs = cfg["images"], cfg["batch_size"]
    model = smi_hub.SMIModel(arch=cfg["arch"], projector_dims=[], image_size=cfg["image_size"])
    model = model.eval().to(device)
    net = extract_bench.torchvision_twin(model).to(device)
    tfm = smi_hub.get_transforms(model)
    images, _ = load_arrays("test")
    pils = [Image.fromarray(images[i]) for i in range(n)]
    x = torch.stack([tfm(im) for im in pils])
    res["settings"] = {
        **cfg,
        "data": f"{n} Fashion-MNIST test images (uint8 28 px), preprocessed by "
        f"get_transforms(model) to {cfg['image_size']} px, float32 on the host",
        "model": f"{cfg['arch']} (random init; speed does not depend on the weights); plain = "
        "torchvision's model with the same backbone weights",
        "timing": f"best of {reps} passes over all images ({min(reps, 2)} from files), ours "
        "and plain alternating (benchmarks/extract.py paired), features copied to the host",
        "file_workers": workers,
    }
    res["rows"] = []
    bf16 = torch.bfloat16

    def plain(memory_format: torch.memory_format, dtype: torch.dtype | None):
        def run() -> None:
            net.to(memory_format=memory_format)
            autocast = (
                torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            )
            with torch.inference_mode(), autocast:
                for i in range(0, n, bs):
                    net(x[i : i + bs].to(device, memory_format=memory_format)).float().cpu()

        return run

    def ours(**kw):
        return lambda: smi_hub.extract_features(model, x, batch_size=bs, progress=False, **kw)

    def add(variant: str, t_plain: float, t_ours: float) -> None:
        res["rows"].append(
            {
                "variant": variant,
                "plain_images_per_s": round(n / t_plain, 1),
                "extract_features_images_per_s": round(n / t_ours, 1),
                "ratio": round(t_plain / t_ours, 3),
            }
        )
        step.save()

    cl, contiguous = torch.channels_last, torch.contiguous_format
    variants = (
        ("fp32", plain(contiguous, None), ours()),
        ("fp32 channels_last", plain(cl, None), ours(channels_last=True)),
        ("bf16 autocast", plain(contiguous, bf16), ours(amp_dtype=bf16)),
        ("bf16 autocast channels_last", plain(cl, bf16), ours(channels_last=True, amp_dtype=bf16)),
    )
    for variant, fa, fb in variants:
        step.check()
        add(variant, *extract_bench.paired(fa, fb, reps))
    net.to(memory_format=contiguous)
    step.check()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(pils):
            paths.append(Path(tmp) / f"{i:05d}.png")
            im.save(paths[-1])
        loader = DataLoader(extract_bench._Files(paths, tfm), batch_size=bs, num_workers=workers)

        def plain_files() -> None:
            net.to(memory_format=cl)
            with torch.inference_mode(), torch.autocast(device.type, dtype=bf16):
                for batch in loader:
                    net(batch.to(device, memory_format=cl)).float().cpu()

        def ours_files() -> None:
            smi_hub.extract_features(
                model, tmp, batch_size=bs, num_workers=workers, channels_last=True,
                amp_dtype=bf16, progress=False,
            )  # fmt: skip

        t_plain, t_ours = extract_bench.paired(plain_files, ours_files, min(reps, 2))
        add(f"PNG files, DataLoader {workers} workers, bf16 channels_last", t_plain, t_ours)


# --------------------------------------------------------------------------------------------
# fmnist_training
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _run_logged(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` (own process group, output to ``log``) for at most ``timeout`` seconds;
    at the limit the whole group gets SIGTERM, then SIGKILL."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        killed = False
        try:
            proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            killed = True
        finally:
            if proc.poll() is None:  # timed out, or the step was interrupted
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return {
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "killed_at_limit": killed,
        "wall_s": round(time.monotonic() - t0, 2),
        "log_tail": log.read_text()[-1500:] if proc.returncode else None,
    }


def _calibrate(records: list[dict[str, Any]], wall_s: float) -> dict[str, float]:
    """Seconds per step in the steady state (between the last two epoch ends, so epoch-end
    work is included) and the run's fixed cost (start-up and shutdown)."""
    epochs = [r for r in records if r.get("type") == "epoch"]
    if len(epochs) < 2:
        raise RuntimeError(f"calibration run logged {len(epochs)} epoch(s), needs 2")
    e1, e2 = epochs[-2], epochs[-1]
    per_step = (e2["elapsed_s"] - e1["elapsed_s"]) / max(1, e2["step"] - e1["step"])
    return {"seconds_per_step": per_step, "fixed_s": max(0.0, wall_s - e2["elapsed_s"])}


def _split_copy(src: Path, dst: Path) -> list[str]:
    """Copy ``src`` to ``dst`` whole if small, else as ``dst.partN`` pieces of PART_BYTES."""
    if src.stat().st_size <= PART_BYTES:
        shutil.copyfile(src, dst)
        return [dst.name]
    names = []
    with open(src, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            part = dst.with_name(f"{dst.name}.part{i}")
            part.write_bytes(chunk)
            names.append(part.name)
    return names


def step_fmnist(step: Step) -> None:
    from smi_hub.export import export_checkpoint
    from smi_hub.registry import DEFAULT_MODEL, WEIGHTS_ROOT
    from training.checkpoint import find_latest

    res, quick = step.result, step.quick
    work = Path(step.args.work_dir) / "fmnist"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dev = step.device.type
    workers = 0 if quick else min(12, max(1, (os.cpu_count() or 2) - 2))
    py = [sys.executable, "-m"]
    common = [
        "--config", FMNIST_CONFIG, f"device={dev}", f"data.num_workers={workers}",
        "train.precision=bf16", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every_steps=1000000",  # epoch ends only: the step rate is what matters
    ]  # fmt: skip
    if quick:
        common += [
            "model.base_width=8", "model.projector_dims=[64,64]", "train.batch_size=32",
            "data.subset=256", "log.monitor_samples=64",
        ]  # fmt: skip
    else:
        common += ["model.base_width=64"]
    eval_reserve = 20.0 if quick else 50.0
    res["settings"] = {
        "recipe": FMNIST_CONFIG,
        "overrides": common[2:],
        "eval": "python -m training.evaluate knn (k 20, T 0.07, full train and test splits)"
        if not quick
        else "k-NN on 512 train / 256 test images",
        "eval_reserve_s": eval_reserve,
    }
    # calibration: two short epochs (2 x 30 steps; 2 x 2 in quick mode) give the step rate
    calib = _run_logged(
        [*py, "training.pretrain", *common, f"output_dir={work / 'calibration'}",
         f"data.subset={64 if quick else 7680}", "train.epochs=2"],
        work / "calibration.log", min(90.0, step.left() / 3),
    )  # fmt: skip
    res["calibration"] = calib
    step.save()
    if calib["returncode"] != 0:
        raise RuntimeError(f"calibration run failed (exit {calib['returncode']})")
    rate = _calibrate(_read_jsonl(work / "calibration" / "metrics.jsonl"), calib["wall_s"])
    calib.update({k: round(v, 4) for k, v in rate.items()})
    train_s = step.left() - eval_reserve - rate["fixed_s"]
    max_steps = max(1, int(0.9 * train_s / rate["seconds_per_step"]))
    if quick:
        max_steps = min(max_steps, 3)
    step.check()
    epochs = 1 if quick else max_steps // (FMNIST_TRAIN_IMAGES // 256) + 2
    run = work / "run"
    main = _run_logged(
        [*py, "training.pretrain", *common, f"output_dir={run}", f"train.epochs={epochs}",
         f"train.max_steps={max_steps}"],
        work / "train.log", step.left() - eval_reserve,
    )  # fmt: skip
    records = _read_jsonl(run / "metrics.jsonl")
    start = next((r for r in records if r.get("event") == "start"), {})
    epoch_records = [r for r in records if r.get("type") == "epoch"]
    speeds = [r["images_per_s"] for r in records if r.get("type") == "train"]
    main.update(
        max_steps=max_steps,
        steps_done=max((r.get("step", 0) for r in records), default=0),
        steps_per_epoch=start.get("steps_per_epoch"),
        epochs_done=epoch_records[-1]["epoch"] if epoch_records else 0,
        images_per_s_median=round(statistics.median(speeds), 1) if speeds else None,
        epoch_log=[
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "time"}
            for r in epoch_records
        ],
    )
    res["train"] = main
    step.save()
    if main["returncode"] != 0 and not main["killed_at_limit"]:
        raise RuntimeError(f"training run failed (exit {main['returncode']})")
    knn_cmd = [*py, "training.evaluate", "knn", "--run-dir", str(run), "--device", dev,
               "--num-workers", str(workers), "--batch-size", "1024"]  # fmt: skip
    if quick:
        knn_cmd += ["--train-subset", "512", "--test-subset", "256"]
    res["knn"] = _run_logged(knn_cmd, work / "knn.log", max(10.0, step.left()))
    knn_file = run / "eval" / "knn.json"
    if not knn_file.is_file():
        raise RuntimeError(f"k-NN evaluation wrote no result (exit {res['knn']['returncode']})")
    metrics = json.loads(knn_file.read_text())["metrics"]
    default = json.loads((WEIGHTS_ROOT / DEFAULT_MODEL / "config.json").read_text())
    top1, ref = metrics["top1"], default["results"]["knn_top1"]
    res["knn"].update(top1=top1, top5=metrics["top5"])
    res["comparison"] = {
        "default_model": DEFAULT_MODEL,
        "default_knn_top1": ref,
        "knn_top1": top1,
        "margin_points": round(top1 - ref, 2),
        "beats_default": top1 > ref,
        "comparable": not quick,  # the default was evaluated on the full splits
    }
    step.save()
    ckpt = find_latest(run / "checkpoints")
    name = EXPORT_NAME[step.suite.mode]
    folder = export_checkpoint(ckpt, work / "export" / name, name=name)
    dst = step.suite.artifacts / name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    files = []
    for f in sorted(folder.iterdir()):
        files += _split_copy(f, dst / f.name)
    exported = json.loads((folder / "config.json").read_text())
    res["export"] = {
        "checkpoint": str(ckpt.relative_to(work)),
        "folder": str(dst),
        "files": files,
        "weights_sha256": exported["weights_sha256"],
        "results": exported.get("results"),
        "reassemble": "cat model.safetensors.part* > model.safetensors"
        if any(".part" in f for f in files)
        else None,
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def step_input_pipeline(step: Step) -> None:
    cfg = INPUT[step.suite.mode]
    res = step.result
    workers = 2 if step.quick else os.cpu_count() or 1
    res["settings"] = {
        **{k: v for k, v in cfg.items() if k != "model"},
        "model": cfg["model"],
        "workers": workers,
        "data": "JPEGs 500x375 quality 90 made by benchmarks/input_pipeline.py (random "
        "crops/flips of scikit-image / scikit-learn photos, or data/photos/)",
        "per_core": "one process, one torch thread, variants interleaved, best of repeats",
        "end_to_end": "DataLoader workers decode + crop (CropTwoViews), BatchAugment on the "
        "device, then the Runner's full step (benchmarks/train_step.py, SMI, LARS); step only: "
        "the same Runner on one prepared batch; eager",
        "extract": "smi-hub extract (extract_features) of the first extract_images files, "
        "--decode cpu (workers decode) against --decode device (workers read bytes, nvjpeg "
        "decodes on the GPU), same model, batch and workers; pixel and feature differences "
        "of the two paths on 256 files",
    }
    folder = Path(step.args.work_dir) / "jpegs"
    t0 = time.perf_counter()
    input_bench.make_jpeg_folder(folder, cfg["images"], processes=workers)
    res["make_jpegs_s"] = round(time.perf_counter() - t0, 1)
    step.save()
    step.check()
    res["per_core"] = input_bench.measure_per_core(folder, cfg["per_core_images"], cfg["repeats"])
    step.save()
    step.check()
    res["end_to_end"] = input_bench.measure_end_to_end(
        folder,
        step.device,
        cfg["model"],
        cfg["batch_size"],
        workers,
        cfg["steps"],
        deadline=time.perf_counter() + step.left() - 5,
    )
    step.save()
    step.check()
    res["extract"] = input_bench.measure_extract(
        folder,
        step.device,
        workers,
        cfg["batch_size"],
        cfg["extract_images"],
        cfg["extract_model"],
        deadline=time.perf_counter() + step.left() - 5,
    )
    step.save()


STEP_FUNCTIONS: dict[str, Callable[[Step], None]] = {
    "environment": step_environment,
    "train_step": step_train,
    "loss_cost": step_loss_cost,
    "extraction": step_extraction,
    "fmnist_training": step_fmnist,
    "input_pipeline": step_input_pipeline,
}


def budgets(args: argparse.Namespace) -> dict[str, float]:
    """Per-step seconds: the defaults of the mode, scaled to ``--budget-s`` when given, then
    ``--budget STEP=SECONDS`` overrides."""
    table = {**QUICK_BUDGETS, **QUICK_EXTRA_BUDGETS} if args.quick else {**BUDGETS, **EXTRA_BUDGETS}
    base = {s: float(table[s]) for s in args.steps}
    if args.budget_s:
        scale = args.budget_s / sum(base.values())
        base = {s: v * scale for s, v in base.items()}
    for item in args.budget:
        name, _, value = item.partition("=")
        if name not in STEP_FUNCTIONS or not value:
            raise SystemExit(
                f"--budget {item!r}: write STEP=SECONDS, STEP one of {STEPS + EXTRA_STEPS}"
            )
        base[name] = float(value)
    return base


def summary(data: dict[str, Any]) -> str:
    lines = [f"GPU suite ({data['mode']}, {data['device']}): {data['path']}"]
    for name, rec in data["steps"].items():
        lines.append(f"  {name:<16} {rec['status']:<10} {rec.get('elapsed_s', 0):>7.1f} s")
    steps = data["steps"]
    for r in steps.get("train_step", {}).get("result", {}).get("rows", []):
        mfu = r["mfu_datasheet"] if r["mfu_datasheet"] is not None else r["mfu_measured_matmul"]
        mem = r["peak_memory_bytes"]
        lines.append(
            f"  train {r['loss']:<12} {'compiled' if r['compiled'] else 'eager':<8} "
            f"{r['images_per_s']:>9.1f} img/s {r['step_ms_median']:>9.1f} ms "
            f"MFU {mfu if mfu is not None else float('nan'):.3f} "
            f"{'' if mem is None else f'{mem / 2**30:.1f} GiB'}"
        )
    for d, c in steps.get("loss_cost", {}).get("result", {}).get("crossover", {}).items():
        if c:
            lines.append(f"  loss crossover D={d}: N ~ {c['n']:,} ({c['how']})")
    for r in steps.get("extraction", {}).get("result", {}).get("rows", []):
        lines.append(
            f"  extract {r['variant']:<48} {r['extract_features_images_per_s']:>9.1f} img/s "
            f"ratio {r['ratio']:.3f}"
        )
    pipe = steps.get("input_pipeline", {}).get("result", {})
    for r in pipe.get("per_core", []):
        lines.append(
            f"  input {r['variant'][:60]:<60} {r['ms_per_image_per_core']:>8.2f} ms/img/core"
        )
    e2e = pipe.get("end_to_end")
    if e2e:
        lines.append(
            f"  input end-to-end {e2e['images_per_s_end_to_end']} img/s vs step only "
            f"{e2e['images_per_s_step_only']} ({e2e['end_to_end_over_step_only']})"
        )
    comp = steps.get("fmnist_training", {}).get("result", {}).get("comparison")
    if comp:
        lines.append(
            f"  fmnist k-NN {comp['knn_top1']:.2f} vs default {comp['default_knn_top1']} "
            f"({'beats' if comp['beats_default'] else 'does not beat'} it)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON (rewritten after every step)")
    p.add_argument("--quick", action="store_true", help="CPU dry run at tiny sizes (CI)")
    p.add_argument("--steps", nargs="+", choices=STEPS + EXTRA_STEPS, default=list(STEPS))
    p.add_argument("--budget-s", type=float, help="total seconds, shared as the defaults are")
    p.add_argument("--budget", action="append", default=[], help="STEP=SECONDS (repeatable)")
    p.add_argument("--grace-s", type=float, default=10.0, help="interrupt a step this late")
    p.add_argument("--device", help="default: cuda if available (cpu with --quick)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak of an unlisted device")
    p.add_argument("--artifacts", help="folder for the exported model (default: --out's)")
    p.add_argument("--work-dir", help="checkpoints and logs (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    plan = budgets(args)
    own_work = args.work_dir is None
    args.work_dir = str(Path(args.work_dir or tempfile.mkdtemp(prefix="smi_gpu_suite_")).resolve())
    if args.quick:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    suite = Suite(args)
    suite.data["budgets_s"] = plan
    suite.data["path"] = str(suite.path)
    try:
        for name, budget in plan.items():
            grace = min(args.grace_s, 0.1 * budget + 2.0)
            run_step(suite, name, STEP_FUNCTIONS[name], budget, grace)
        suite.data["finished"] = True
        suite.save()
    finally:
        if own_work:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    print(summary(suite.data), flush=True)
    return 0 if all(r["status"] == "ok" for r in suite.data["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
