"""What the GPU suite's runner (``benchmarks/gpu_suite.py``) and its step modules
(``gpu_suite_environment.py``, ``gpu_suite_measurements.py``, ``gpu_suite_fmnist.py``,
``gpu_suite_input.py``) share: the :class:`Step` a step function gets, the
:class:`StepTimeout` it raises, the loader of sibling benchmark scripts and two device helpers.
It loads none of those modules, so the step modules need not load the runner."""

from __future__ import annotations

import gc
import time
import types
from pathlib import Path
from typing import Any

import torch

from smi_hub.script_modules import load_file_module

ROOT = Path(__file__).resolve().parents[1]


def sibling(name: str) -> types.ModuleType:
    """A benchmark script next to this one, loaded from its file as ``smi_benchmarks_<name>``
    (``benchmarks/`` is no package, and an installed package of that name must not shadow it)."""
    return load_file_module(f"smi_benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")


class StepTimeout(Exception):
    """A step ran out of its time budget."""


class Step:
    """What a step function gets: its result dict (filled as it goes) and its deadline. ``suite``
    is the runner's ``Suite`` (the results JSON, the settings, the device peaks)."""

    def __init__(self, suite: Any, record: dict[str, Any], budget_s: float) -> None:
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


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
