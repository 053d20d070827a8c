"""The GPU suite's measurement steps (``benchmarks/gpu_suite.py``), each over its sibling
benchmark script's functions: ``train_step`` (a full training step at paper scale per loss,
eager then compiled; ``benchmarks/train_step.py``), ``loss_cost`` (the loss alone over N x D;
``benchmarks/loss_cost.py``) and ``extraction`` (``smi_hub.extract_features`` against a plain
torchvision forward; ``benchmarks/extract.py``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smi_hub.script_modules import load_file_module

suite_step = load_file_module(
    "smi_benchmarks_gpu_suite_step", Path(__file__).with_name("gpu_suite_step.py")
)
Step = suite_step.Step
StepTimeout = suite_step.StepTimeout
sync_device, free_memory = suite_step.sync_device, suite_step.free_memory
extract_bench = suite_step.sibling("extract")
loss_cost = suite_step.sibling("loss_cost")
train_bench = suite_step.sibling("train_step")
device_peaks = suite_step.sibling("gpu_suite_environment").device_peaks

LOSSES = ("smi", "barlow_twins", "vicreg")
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


# --------------------------------------------------------------------------------------------
# train_step
# --------------------------------------------------------------------------------------------


def _timed_step(runner: train_bench.Runner, a: torch.Tensor, b: torch.Tensor) -> float:
    sync_device(runner.device)
    t0 = time.perf_counter()
    runner.step(a, b)
    sync_device(runner.device)
    return time.perf_counter() - t0


def _peak_memory(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync_device(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync_device(device)
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
        free_memory(device)
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
