"""The one line a long job prints before it starts: what it will do (images, steps, epochs,
device, output) and how long that should take, from one timed batch on this machine.

    plan: pretrain 60,000 images x 10 epochs = 2,340 steps of 256 on cpu -> runs/x;
    estimate ~1 h 20 min (3 x the forward of 1 timed batch of 8; data loading not included)
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

TIMED_BATCH = 8


TRAIN_FACTOR = 3.0  # a training step costs about 3 forwards (forward + backward of 2x)


def seconds_per_image(
    model: nn.Module, image_size: int, device: torch.device | str, *, train: bool
) -> float:
    """Seconds one image costs ``model`` on ``device``: an inference-mode forward of a batch of
    :data:`TIMED_BATCH` random images in the model's memory layout, timed after one warm-up;
    ``train`` counts :data:`TRAIN_FACTOR` forwards. Nothing of the model (weights, BatchNorm
    statistics, gradients, mode) and no global RNG is touched. No backward is timed: on the
    CPU a backward through a tiny channels-last model hung or crashed oneDNN's 1x1
    convolution kernel, and a plan line must never cost the run it announces."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TIMED_BATCH, 3, image_size, image_size, generator=g).to(device)
    if _is_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training

    def once() -> None:
        with torch.inference_mode():
            model.eval()(x)

    try:
        once()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / TIMED_BATCH
        return seconds * TRAIN_FACTOR if train else seconds
    finally:
        model.train(was_training)


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D weight is stored channels-last."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def duration(seconds: float) -> str:
    """``~45 s``, ``~12 min``, ``~3 h 10 min``."""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"~{minutes} min"
    return f"~{minutes // 60} h {minutes % 60:02d} min"


def print_plan(what: str, seconds: float | None, basis: str) -> str:
    """Print (to stderr) and return ``plan: WHAT; estimate ... (BASIS)``."""
    estimate = f"estimate {duration(seconds)} ({basis})" if seconds is not None else basis
    line = f"plan: {what}; {estimate}"
    print(line, file=sys.stderr, flush=True)
    return line
