"""The GPU suite's ``input_pipeline`` step (``benchmarks/gpu_suite.py``, only with ``--steps
input_pipeline``): ``benchmarks/input_pipeline.py`` on JPEGs it makes: the per-core cost of the
worker pipelines, pretraining steps fed from the files against the steps alone, and
``smi-hub extract`` with ``--decode cpu`` against ``--decode device``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from smi_hub.script_modules import load_file_module

suite_step = load_file_module(
    "smi_benchmarks_gpu_suite_step", Path(__file__).with_name("gpu_suite_step.py")
)
Step = suite_step.Step
input_bench = suite_step.sibling("input_pipeline")

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
