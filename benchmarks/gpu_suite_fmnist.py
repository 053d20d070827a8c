"""The GPU suite's ``fmnist_training`` step (``benchmarks/gpu_suite.py``): the SMI Fashion-MNIST
recipe at full width run with ``python -m training.pretrain`` for as many steps as fit the
budget (a calibration run measures the step rate), k-NN, export, and the comparison with the
embedded default model; the subprocess and file helpers it runs on."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smi_hub.script_modules import load_file_module

suite_step = load_file_module(
    "smi_benchmarks_gpu_suite_step", Path(__file__).with_name("gpu_suite_step.py")
)
Step = suite_step.Step
ROOT = suite_step.ROOT

FMNIST_CONFIG = "training/configs/fmnist_resnet18_smi.yaml"
FMNIST_TRAIN_IMAGES = 60_000
PART_BYTES = 15 * 2**20  # $OUT returns files of at most 16 MiB
EXPORT_NAME = {"full": "smi_resnet18w64_fmnist", "quick": "smi_resnet18w8_fmnist_quick"}


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
