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

Where the steps live (``benchmarks/`` is no package: each file is loaded by path, once per
process): ``gpu_suite_step.py`` (the ``Step`` a step function gets, ``StepTimeout``, shared
helpers), ``gpu_suite_environment.py`` (``environment``, the device peaks),
``gpu_suite_measurements.py`` (``train_step``, ``loss_cost``, ``extraction``),
``gpu_suite_fmnist.py`` (``fmnist_training`` and its subprocess helpers) and
``gpu_suite_input.py`` (``input_pipeline``). This file is the runner: budgets, deadlines, the
JSON, the summary and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smi_hub.script_modules import load_file_module  # noqa: E402

suite_step = load_file_module(
    "smi_benchmarks_gpu_suite_step", ROOT / "benchmarks" / "gpu_suite_step.py"
)
Step, StepTimeout = suite_step.Step, suite_step.StepTimeout
environment_step = suite_step.sibling("gpu_suite_environment")
measurement_steps = suite_step.sibling("gpu_suite_measurements")
fmnist_step = suite_step.sibling("gpu_suite_fmnist")
input_step = suite_step.sibling("gpu_suite_input")

STEPS = ("environment", "train_step", "loss_cost", "extraction", "fmnist_training")
EXTRA_STEPS = ("input_pipeline",)
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
        suite_step.free_memory(suite.device)
        suite.save()
    print(f"[gpu_suite] {name}: {record['status']} in {record['elapsed_s']} s", flush=True)
    return record


STEP_FUNCTIONS: dict[str, Callable[[Step], None]] = {
    "environment": environment_step.step_environment,
    "train_step": measurement_steps.step_train,
    "loss_cost": measurement_steps.step_loss_cost,
    "extraction": measurement_steps.step_extraction,
    "fmnist_training": fmnist_step.step_fmnist,
    "input_pipeline": input_step.step_input_pipeline,
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
