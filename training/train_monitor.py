"""What a pretraining run reports as it goes: the metrics log (JSONL + TensorBoard), the
per-epoch collapse monitors, the progress bar's ETA and the divergence stop."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smi_hub.models import SMIModel
from training import distributed as D
from training.config import PretrainConfig
from training.monitors import collapse_metrics

# the run's logger: its messages keep the name of the command they come from
log = logging.getLogger("training.pretrain")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


class MetricsLogger:
    """Rank-0 JSONL + TensorBoard writer (no-op on other ranks)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None):
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)
            except ImportError:
                log.warning("tensorboard is not installed; writing metrics.jsonl only.")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            kind = record.get("type", "train")
            for k, v in record.items():
                numeric = isinstance(v, int | float) and not isinstance(v, bool)
                if numeric and k not in ("step", "time", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def monitor_embeddings(
    model: SMIModel,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    precision: str,
    batch_size: int,
    prepare: Callable[[Any], torch.Tensor],
) -> dict[str, float]:
    """Collapse monitors of backbone and projector embeddings of a fixed set of image pairs
    (``prepare``: a loader batch of one view -> the model's input on ``device``)."""
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "pa": [], "pb": []}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    for a, b, _ in loader:
        for key, x in (("a", a), ("b", b)):
            x = prepare(x)
            with D.autocast(device, precision):
                h = model.embed(x)
                z = model.projector(h)
            feats[key].append(h.float().cpu())
            feats["p" + key].append(z.float().cpu())
    model.train(was_training)
    cat = {k: torch.cat(v) for k, v in feats.items()}
    out = {f"backbone_{k}": v for k, v in collapse_metrics(cat["a"], cat["b"]).items()}
    out.update({f"projector_{k}": v for k, v in collapse_metrics(cat["pa"], cat["pb"]).items()})
    return out


def diverged_message(n: int, step: int, saved: Path | None, cfg: PretrainConfig) -> str:
    """Why the run stopped, what is on disk, and what to change."""
    fix = "lower train.lr, use train.precision=fp32 or set train.grad_clip"
    head = f"{n} consecutive non-finite steps at step {step}: training diverged."
    if saved is None:
        return (
            f"{head} No checkpoint was written yet (the first comes after "
            f"checkpoint.every_steps={cfg.checkpoint.every_steps} steps or one epoch), so there "
            f"is nothing to resume: {fix}, then start again."
        )
    return (
        f"{head} The last good checkpoint, {saved}, is intact (nothing is saved after a "
        f"non-finite step): {fix}, then --resume auto."
    )


def fmt_time(seconds: float) -> str:
    """A duration as ``m:ss`` or ``h:mm:ss`` (``?`` when not finite), for the progress bar."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
