"""Fine-tune smi-hub weights into an image classifier (head + full backbone).

    python -m training.finetune --model smi_resnet18_fmnist --data fashion_mnist --out runs/ft
    python -m training.finetune --model weights/my_r50 --data imagefolder \
        --data-path /data/flowers --out runs/flowers --epochs 30 --backbone-lr 0.01
    python -m training.finetune ... --label-fraction 0.01      # 1% of the labels per class
    torchrun --nproc-per-node 4 -m training.finetune ...        # DDP, same arguments

Public API (``training.evaluate semisup`` builds on it)::

    finetune(cfg: FinetuneConfig) -> dict
        Train, select the best epoch on a validation split carved from the labelled training
        images, test it once, write ``cfg.out`` as a weights folder (``smi_hub.load(out)``
        gives the classifier) plus ``metrics.json`` and ``labels.json``; returns the
        ``metrics.json`` dict ({"protocol": "finetune", "metrics": {"top1", "top5",
        "val_top1", ...}, "settings": {...}, ...}).
    select_label_subset(labels, fraction=None, per_class=None, seed=0) -> list[int]
        Class-balanced, seeded choice of labelled training indices.

``--resume auto`` continues from ``<out>/checkpoints`` exactly (data order, augmentations,
optimizer, schedule, RNG states and the best epoch so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import smi_hub
from smi_hub.cli_format import ArgumentParser
from smi_hub.errors import SMIHubError
from smi_hub.fileio import atomic_write_text
from smi_hub.models import SMIModel
from smi_hub.outputs import Claim, claim_output_dir, resolve_output
from smi_hub.plan import TIMED_BATCH, print_plan, seconds_per_image
from training import distributed as D
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from training.config import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range
from training.data import (
    DataError,
    IndexedSubset,
    ResumableSampler,
    _mix_seed,
    build_source,
    eval_transform,
    subset_indices,
    view_transform,
)
from training.eval_data import default_resize_ratio
from training.label_lists import LabelListError, label_list_indices, read_label_list
from training.optim import WarmupCosine

log = logging.getLogger("training.finetune")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


class FinetuneError(ValueError):
    """A fine-tuning run was asked for something impossible; the message says how to fix it."""


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (stored in its checkpoints and metrics)."""

    model: str = smi_hub.DEFAULT_MODEL  # registry name, weights folder, HF repo id or URL
    data: str = "fashion_mnist"  # fashion_mnist | imagefolder | hf (as training.evaluate)
    out: str = "runs/finetune"
    data_path: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"  # None: no test evaluation
    image_key: str = "image"
    label_key: str = "label"
    train_subset: int | None = None  # a random subset of the train split (smoke runs)
    test_subset: int | None = None
    label_fraction: float | None = None  # keep this fraction of each class's labels
    labels_per_class: int | None = None  # or this many labelled images per class
    label_list: str | None = None  # or the files a list names (SimCLR's 1percent.txt format)
    val_fraction: float = 0.1  # of the labelled images, per class; 0: keep the last epoch
    random_init: bool = False  # same recipe from a randomly initialized backbone
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64  # global, across ranks
    optimizer: str = "sgd"
    lr: float = 0.05  # classifier head
    backbone_lr: float | None = None  # default lr / 10; 0 freezes the backbone
    layer_decay: float = 1.0  # backbone LR x layer_decay ** (stages above): 1 = uniform
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int | None = None  # default 5% of the steps
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop; (1, 1): no crop
    hflip_prob: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 256
    checkpoint_every_steps: int = 500
    keep_last: int = 2
    seed: int = 0
    progress: bool = True
    name: str | None = None  # model card title (default: the out folder name)
    keep_last_batch: bool = False  # train on an epoch's last, partial batch too (references)
    test_every_epoch: bool = False  # test after every epoch: best-epoch scores beside final

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d


# --------------------------------------------------------------------------------------------
# Label subsets and validation split
# --------------------------------------------------------------------------------------------


def select_label_subset(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Sorted indices of a class-balanced labelled subset: ``per_class`` random images of each
    class (all of a smaller class), or ``fraction`` of each class (at least one image). Neither:
    every index. The same ``labels`` and ``seed`` always give the same subset."""
    y = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else labels, dtype=int)
    if fraction is not None and per_class is not None:
        raise FinetuneError("Pass either a label fraction or labels per class, not both.")
    if fraction is not None and not 0 < fraction <= 1:
        raise FinetuneError(f"The label fraction must be in (0, 1], got {fraction}.")
    if per_class is not None and per_class < 1:
        raise FinetuneError(f"Labels per class must be >= 1, got {per_class}.")
    if fraction is None and per_class is None:
        return list(range(len(y)))
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = per_class if per_class is not None else max(1, round(fraction * len(idx)))  # type: ignore[operator]
        picked += idx[rng.permutation(len(idx))[:k]].tolist()
    return sorted(picked)


def split_validation(
    labels: Sequence[int] | np.ndarray, indices: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (train, val) per class: ``floor(n_c * val_fraction)`` of each
    class go to validation, always leaving at least one training image per class."""
    if not 0 <= val_fraction < 1:
        raise FinetuneError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    y = np.asarray(labels, dtype=int)
    idx = np.asarray(indices, dtype=int)
    rng = np.random.default_rng(seed + 7919)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(y[idx]):
        members = idx[y[idx] == c]
        members = members[rng.permutation(len(members))]
        n_val = min(int(math.floor(len(members) * val_fraction)), len(members) - 1)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class _MappedDataset(torch.utils.data.Dataset):
    """(transform(image), label) of a source; with ``seed``, item ``i`` of epoch ``e`` is
    transformed under a torch RNG seeded from ``(seed, e, i)`` (reproducible augmentations,
    whatever the workers, ranks or resumes)."""

    def __init__(self, base, transform, seed: int | None = None) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(self.seed, self.epoch, i))
            return self.transform(image), label


def _targets(ds) -> list[int]:
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [int(ds[i][1]) for i in range(len(ds))]
    return [int(t) for t in targets]


def _dataset_name(cfg: FinetuneConfig) -> str:
    return cfg.data if not cfg.data_path else f"{cfg.data}:{cfg.data_path}"


# --------------------------------------------------------------------------------------------
# Model, optimizer, evaluation
# --------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig, num_classes: int, class_names: Sequence[str]) -> SMIModel:
    """The pretrained (or, with ``random_init``, freshly initialized) backbone with a new
    ``num_classes``-way head and no projector."""
    torch.manual_seed(cfg.seed)  # random init and the head's init
    model = smi_hub.load(cfg.model, pretrained=not cfg.random_init)
    model.projector, model.projector_dims = None, []
    model.reset_classifier(num_classes, class_names=class_names)
    with torch.no_grad():  # as Barlow Twins' and VICReg's evaluate.py
        model.fc.weight.normal_(mean=0.0, std=0.01)
        model.fc.bias.zero_()
    return model


def _stage_depth(name: str) -> int:
    """0 for the stem, 1-4 for ``layer1``-``layer4``."""
    head = name.split(".", 1)[0]
    return int(head[5:]) if head.startswith("layer") and head[5:].isdigit() else 0


def build_param_groups(model: SMIModel, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Head at ``lr``; backbone at ``backbone_lr * layer_decay ** (4 - stage)`` (stem = stage
    0); no weight decay on biases and normalization weights. A zero backbone LR freezes it."""
    backbone_lr = cfg.lr / 10 if cfg.backbone_lr is None else cfg.backbone_lr
    groups: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            lr = cfg.lr
        else:
            lr = backbone_lr * cfg.layer_decay ** (4 - _stage_depth(name))
            if backbone_lr == 0:
                p.requires_grad_(False)
                continue
        key = (name.split(".", 1)[0] if not name.startswith("fc.") else "fc", lr, p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (_, lr, no_decay), ps in groups.items()
    ]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of a classifier on a dataset of
    (tensor, label); the model is put back into its previous train/eval mode."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    n = correct1 = correct5 = 0
    loss = 0.0
    for x, y in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        with D.autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += y.numel()
    model.train(was_training)
    n = max(n, 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss / n}


def _train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    cfg: FinetuneConfig,
) -> float:
    """One optimizer step; returns the loss."""
    with D.autocast(device, cfg.precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if not torch.isfinite(loss):
        raise FinetuneError(
            "The loss is not finite: training diverged. Lower --lr / --backbone-lr or use "
            "--precision fp32, then --resume auto from the last checkpoint."
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _test_dataset(cfg: FinetuneConfig, model: SMIModel) -> _MappedDataset:
    """The test split (``test_subset`` of it) with the model's evaluation transform."""
    test = build_source(cfg.data, cfg.data_path, cfg.test_split, cfg.image_key, cfg.label_key)
    idx = subset_indices(len(test), cfg.test_subset, cfg.seed)
    if idx is not None:
        test = IndexedSubset(test, idx)
    ev = eval_transform(model.image_size, model.mean, model.std, default_resize_ratio(model))
    return _MappedDataset(test, ev)


# Allowed values of the numeric settings (None values of optional settings are skipped), with
# the pretraining config's Range checks.
RANGES: dict[str, Range] = {
    "train_subset": COUNT,
    "test_subset": COUNT,
    "labels_per_class": COUNT,
    "epochs": COUNT,
    "max_steps": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "backbone_lr": NON_NEGATIVE,
    "layer_decay": Range(0.0, 1.0, lo_open=True),
    "weight_decay": NON_NEGATIVE,
    "momentum": Range(0.0, 1.0, hi_open=True),
    "warmup_steps": NON_NEGATIVE,
    "label_smoothing": Range(0.0, 1.0, hi_open=True),
    "crop_scale": Range(0.0, 1.0, lo_open=True),
    "hflip_prob": PROBABILITY,
    "num_workers": NON_NEGATIVE,
    "eval_batch_size": COUNT,
    "checkpoint_every_steps": COUNT,
    "keep_last": COUNT,
    "seed": Range(0, 2**32 - 1),
}


def _check_settings(cfg: FinetuneConfig) -> None:
    """Every numeric setting in its range, the device present, ``out`` outside the data."""
    for key, allowed in RANGES.items():
        value = getattr(cfg, key)
        for v in value if isinstance(value, tuple | list) else [value]:
            try:
                if v is not None:
                    allowed.check(key, v)
            except ConfigError as e:
                raise FinetuneError(f"--{key.replace('_', '-')}{str(e)[len(key) :]}") from None
    if len(cfg.crop_scale) != 2 or cfg.crop_scale[0] > cfg.crop_scale[1]:
        raise FinetuneError(f"--crop-scale needs MIN MAX with MIN <= MAX, got {cfg.crop_scale}.")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise FinetuneError(f"--device must be auto, cpu or cuda, got {cfg.device!r}.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(
            f"--device {cfg.device}: no CUDA GPU is visible here; use --device cpu or auto."
        )
    if cfg.data_path and Path(cfg.out).resolve().is_relative_to(Path(cfg.data_path).resolve()):
        raise FinetuneError(
            f"--out {cfg.out} lies inside --data-path {cfg.data_path}: its files would become "
            "training data (a class of their own) on the next run. Choose an --out outside it."
        )
    no_test = cfg.test_split and not (Path(cfg.data_path or ".") / cfg.test_split).is_dir()
    if cfg.data == "imagefolder" and cfg.data_path and no_test:
        raise FinetuneError(
            f"{cfg.data_path} has no {cfg.test_split}/ folder, so there is no test split: "
            "accuracy on the training images would be reported as test accuracy. Add "
            f"{cfg.data_path}/{cfg.test_split}/<class>/<image> (held-out images), or pass "
            "--test-split none to report only the validation accuracy."
        )


def _check_classes(cfg: FinetuneConfig, labels: list[int], class_names: list[str]) -> None:
    """At least two classes, and an image in each (an empty class folder is a class the
    head could never learn)."""
    if len(class_names) < 2:
        raise FinetuneError(
            f"{_dataset_name(cfg)} {cfg.train_split} has {len(class_names)} class(es) "
            f"({', '.join(class_names)}); a classifier needs at least 2 (a 1-way head answers "
            "100% for anything). Add a folder per class."
        )
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise FinetuneError(
            f"{_dataset_name(cfg)} {cfg.train_split}: the class(es) {empty[:5]} have no image; "
            "fill or remove their folders."
        )


def _check(cfg: FinetuneConfig) -> None:
    if cfg.data in ("imagefolder", "hf") and not cfg.data_path:
        raise FinetuneError(
            f"--data {cfg.data} needs --data-path (data_path): "
            + ("an ImageFolder root." if cfg.data == "imagefolder" else "a datasets folder/file.")
        )
    if cfg.data_path and not Path(cfg.data_path).exists():
        raise FinetuneError(f"--data-path {cfg.data_path} does not exist.")
    _check_settings(cfg)
    if cfg.precision not in PRECISIONS:
        raise FinetuneError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise FinetuneError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}.")
    if cfg.epochs < 1 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise FinetuneError("epochs and max_steps must be >= 1.")
    if cfg.batch_size < 1 or cfg.lr <= 0 or (cfg.backbone_lr or 0) < 0:
        raise FinetuneError("batch_size and lr must be positive and backbone_lr >= 0.")
    if not 0 < cfg.layer_decay <= 1:
        raise FinetuneError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}.")
    if cfg.label_list and (cfg.label_fraction or cfg.labels_per_class or cfg.train_subset):
        raise FinetuneError(
            "--label-list names the labelled images itself; drop --label-fraction, "
            "--labels-per-class and --train-subset."
        )
    if cfg.test_every_epoch and not cfg.test_split:
        raise FinetuneError("test_every_epoch needs a test split (--test-split).")


def _main_process() -> bool:
    """Rank 0 of torchrun (or a single process), known before the process group starts."""
    return os.environ.get("RANK", "0") == "0"


def finetune(cfg: FinetuneConfig, resume: str = "none", overwrite: bool = False) -> dict[str, Any]:
    """Run the fine-tuning ``cfg`` describes (see the module docstring); returns the metrics
    dict also written to ``<out>/metrics.json``. Under torchrun, every rank calls it.

    ``cfg.out`` must be new, empty, or a folder fine-tuning or export wrote; ``overwrite``
    writes beside other files, replacing only the weights folder's own (``smi_hub.outputs``).
    The folder stays locked while the run lasts."""
    _check(cfg)
    claim = claim_output_dir(cfg.out, "weights", overwrite, "--out") if _main_process() else None
    try:
        return _finetune(cfg, resume, claim)
    finally:
        if claim is not None:
            claim.release()


def _finetune(cfg: FinetuneConfig, resume: str, claim: Claim | None) -> dict[str, Any]:
    device = D.setup_distributed(cfg.device)
    ws, rk = D.world_size(), D.rank()
    is_main = rk == 0
    out = resolve_output(cfg.out, "--out")  # ~ expanded, a symlink followed: as claimed
    ckpt_dir = out / "checkpoints"
    resume_path = resolve_resume(
        resume, ckpt_dir, error=FinetuneError, new_run_hint="choose another --out."
    )
    t_start = time.time()

    # ---- data: the labelled subset, its validation split, the test split
    base = build_source(cfg.data, cfg.data_path, cfg.train_split, cfg.image_key, cfg.label_key)
    sub = subset_indices(len(base), cfg.train_subset, cfg.seed)
    split_index = list(range(len(base))) if sub is None else sub  # position -> split index
    if sub is not None:
        base = IndexedSubset(base, sub)
    labels = _targets(base)
    if not labels or min(labels) < 0:
        raise FinetuneError(
            f"{_dataset_name(cfg)} {cfg.train_split} has unlabelled images; fine-tuning needs "
            "class subfolders (ImageFolder) or a label column."
        )
    classes = list(getattr(base, "classes", []) or [])
    num_classes = max(len(classes), max(labels) + 1)
    class_names = classes if len(classes) == num_classes else [str(c) for c in range(num_classes)]
    _check_classes(cfg, labels, class_names)
    if cfg.label_list:
        if not hasattr(base, "samples"):
            raise FinetuneError("--label-list names files: it needs --data imagefolder.")
        try:
            labelled = label_list_indices(base.samples, read_label_list(cfg.label_list))
        except LabelListError as e:
            raise FinetuneError(f"{cfg.label_list}: {e}") from e
    else:
        labelled = select_label_subset(labels, cfg.label_fraction, cfg.labels_per_class, cfg.seed)
    train_idx, val_idx = split_validation(labels, labelled, cfg.val_fraction, cfg.seed)
    model = build_model(cfg, num_classes, class_names)
    mean, std, size = model.mean, model.std, model.image_size
    augment = view_transform(
        size, mean, std, crop_scale=cfg.crop_scale, hflip_prob=cfg.hflip_prob,
        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
    )  # fmt: skip
    evaluation = eval_transform(size, mean, std, default_resize_ratio(model))
    train_ds = _MappedDataset(IndexedSubset(base, train_idx), augment, seed=cfg.seed)
    val_ds = _MappedDataset(IndexedSubset(base, val_idx), evaluation) if val_idx else None
    test_ds = _test_dataset(cfg, model) if cfg.test_every_epoch else None

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text(
            json.dumps(
                {
                    "dataset": _dataset_name(cfg),
                    "split": cfg.train_split,
                    "seed": cfg.seed,
                    "label_fraction": cfg.label_fraction,
                    "labels_per_class": cfg.labels_per_class,
                    "label_list": cfg.label_list,
                    "val_fraction": cfg.val_fraction,
                    "classes": class_names,
                    "train_indices": [split_index[i] for i in train_idx],
                    "val_indices": [split_index[i] for i in val_idx],
                }
            )
            + "\n"
        )

    batch = cfg.batch_size
    if len(train_ds) < batch:
        batch = max(ws, len(train_ds) // ws * ws)
        if is_main:
            log.info("Only %d training images: batch size lowered to %d.", len(train_ds), batch)
    if batch % ws:
        raise FinetuneError(f"batch_size={batch} is not divisible by the {ws} processes.")
    sampler = ResumableSampler(
        len(train_ds), batch // ws, ws, rk, seed=cfg.seed, drop_last=not cfg.keep_last_batch
    )
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # ---- model, optimizer, schedule
    model.to(device)
    frozen = cfg.backbone_lr == 0
    optimizer: torch.optim.Optimizer
    groups = build_param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps)
    scheduler = WarmupCosine(optimizer, total_steps, warmup, min_lr_ratio=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    start_epoch, step, start_batch = 0, 0, 0
    best: dict[str, Any] = {"val_top1": -1.0, "epoch": None, "step": 0, "state": None}
    history: list[dict[str, Any]] = []
    running = {"loss_sum": 0.0, "loss_n": 0}  # this epoch's train loss so far
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location="cpu")
        if state.get("model_config") != model.config:
            raise CheckpointError(
                f"{resume_path} holds a {state.get('model_config')} model, this run builds "
                f"{model.config}; resume with the run's own arguments."
            )
        saved = state.get("config", {})
        changed = sorted(k for k, v in cfg.to_dict().items() if saved.get(k, v) != v)
        if changed and is_main:
            log.warning(
                "Resuming with changed settings %s; the schedule keeps its length.", changed
            )
        start_epoch, step, start_batch = restore_training_state(
            state, model, optimizer, scheduler, scaler
        )
        best = dict(state["best"])
        history = list(state["history"])
        running = dict(state["running"])
        total_steps = int(state["scheduler"]["total_steps"])
        if is_main:
            log.info("Resumed from %s: epoch %d, step %d.", resume_path, start_epoch, step)
    if is_main:
        per_image = seconds_per_image(model, model.image_size, device, train=True)
        print_plan(
            f"finetune {cfg.model} on {len(train_ds):,} labelled images x {cfg.epochs} epochs = "
            f"{total_steps:,} steps of {batch} ({total_steps - step:,} to go) on {ws} x "
            f"{device} -> {cfg.out}",
            per_image * (batch // ws) * (total_steps - step),
            f"model compute of 1 timed batch of {TIMED_BATCH}; data loading and evaluation "
            "not included",
        )
    net: nn.Module = model
    if ws > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if is_main:
            save_checkpoint(
                {
                    **training_state(
                        model,
                        optimizer,
                        scheduler,
                        scaler,
                        epoch=epoch,
                        step=step,
                        step_in_epoch=step_in_epoch,
                        config=cfg.to_dict(),
                    ),
                    "best": best,
                    "history": history,
                    "running": running,
                },
                ckpt_dir,
                keep_last=cfg.keep_last,
            )
        D.barrier()

    def end_of_period(epoch_float: float, train_loss: float) -> None:
        """Validate (rank 0) and keep the best state; the test set is never looked at."""
        record: dict[str, Any] = {"epoch": epoch_float, "step": step, "train_loss": train_loss}
        if is_main and val_ds is not None:
            val = evaluate_classifier(model, val_ds, device, cfg.eval_batch_size, cfg.precision)
            record.update(val_top1=val["top1"], val_loss=val["loss"])
            if val["top1"] > best["val_top1"]:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best.update(val_top1=val["top1"], epoch=epoch_float, step=step, state=state)
        if is_main and test_ds is not None:
            res = evaluate_classifier(model, test_ds, device, cfg.eval_batch_size, cfg.precision)
            record.update(test_top1=res["top1"], test_top5=res["top5"])
        history.append(record)
        if is_main:
            log.info("epoch %.2f: %s", epoch_float, record)

    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", file=sys.stderr)
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        net.train()  # (validation switched to eval mode)
        if frozen:  # a frozen backbone keeps its BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        train_ds.set_epoch(epoch)
        step_in_epoch = first
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
            loss = _train_step(net, x, y, optimizer, scaler, device, cfg)
            scheduler.step()
            step += 1
            step_in_epoch += 1
            running["loss_sum"] += loss
            running["loss_n"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
            if step >= total_steps:
                break
            if step % cfg.checkpoint_every_steps == 0 and step_in_epoch < steps_per_epoch:
                checkpoint(epoch, step_in_epoch)
        done = step_in_epoch >= steps_per_epoch
        end_of_period(
            epoch + (1 if done else step_in_epoch / steps_per_epoch),
            running["loss_sum"] / max(running["loss_n"], 1),
        )
        if done:
            running.update(loss_sum=0.0, loss_n=0)
        checkpoint(epoch + 1, 0) if done else checkpoint(epoch, step_in_epoch)
    if bar is not None:
        bar.close()

    result: dict[str, Any] = {}
    if is_main:
        assert claim is not None
        result = _finish(cfg, claim, model, best, history, device, {
            "train_images": len(train_idx), "val_images": len(val_idx),
            "labelled_images": len(labelled), "num_classes": num_classes,
            "steps": step, "batch_size": batch, "world_size": ws,
            "seconds": round(time.time() - t_start, 1),
        })  # fmt: skip
    D.barrier()
    return result


def _finish(
    cfg: FinetuneConfig,
    claim: Claim,
    model: SMIModel,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    device: torch.device,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Load the best state, test it once, write the weights folder and metrics.json."""
    out = claim.path
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    chosen = best if best["state"] is not None else history[-1]
    metrics: dict[str, Any] = {
        "val_top1": best["val_top1"] if best["state"] is not None else None,
        "best_epoch": math.ceil(chosen["epoch"]),  # 1-based; a cut-short epoch counts as one
        "best_step": chosen["step"],
    }
    if cfg.test_split:
        test = _test_dataset(cfg, model)
        res = evaluate_classifier(model, test, device, cfg.eval_batch_size, cfg.precision)
        metrics.update(top1=res["top1"], top5=res["top5"], test_images=len(test))
    tested = [r for r in history if "test_top1" in r]
    if tested:  # the references' report: the best epoch's test scores beside the final ones
        top = max(tested, key=lambda r: r["test_top1"])
        metrics.update(
            best_test_top1=top["test_top1"],
            best_test_top5=max(r["test_top5"] for r in tested),
            best_test_epoch=math.ceil(top["epoch"]),
        )
    base_cfg = getattr(model, "weights_config", {}) or {}
    training = {
        "task": "finetune",
        "base_model": cfg.model,
        "base_weights_sha256": None if cfg.random_init else base_cfg.get("weights_sha256"),
        "base_training": None if cfg.random_init else base_cfg.get("training") or None,
        "dataset": _dataset_name(cfg),
        "split": cfg.train_split,
        **{k: v for k, v in cfg.to_dict().items() if k not in ("model", "data", "out", "name")},
        **settings,
        "best_epoch": metrics["best_epoch"],
        "evaluation_datasets": {"finetune": _dataset_name(cfg)},
    }
    training = {k: v for k, v in training.items() if v is not None}
    results = {
        f"finetune_{k}": round(float(v), 4)
        for k, v in metrics.items()
        if k in ("top1", "top5", "val_top1") and v is not None
    }
    model.weights_config = {}
    smi_hub.save_weights_folder(
        model.cpu(), out, with_projector=False, training=training, results=results,
        name=cfg.name or out.resolve().name, claim=claim,
    )  # fmt: skip
    result = {
        "protocol": "finetune",
        "dataset": _dataset_name(cfg),
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "settings": {**cfg.to_dict(), **settings},
        "checkpoint": cfg.model if not cfg.random_init else "random-init",
        "history": history,
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m training.finetune",
        description="Fine-tune smi-hub weights (head + backbone) into an image classifier.",
    )
    d = FinetuneConfig()
    p.add_argument("--model", default=d.model, help="registry name, weights folder, HF repo, URL")
    p.add_argument("--data", default=d.data, help="fashion_mnist | imagefolder | hf")
    p.add_argument("--out", required=True, help="output weights folder (and run files)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files (only the weights files are replaced)",
    )
    p.add_argument("--data-path", help="ImageFolder root or Hugging Face datasets folder/file")
    p.add_argument("--train-split", default=d.train_split, help="split to train on")
    p.add_argument("--test-split", default=d.test_split, help="'none': no test evaluation")
    p.add_argument("--image-key", default=d.image_key, help="image column (--data hf)")
    p.add_argument("--label-key", default=d.label_key, help="label column (--data hf)")
    p.add_argument("--train-subset", type=int, help="use a random subset of N training images")
    p.add_argument("--test-subset", type=int, help="use a random subset of N test images")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--label-fraction", type=float, help="fraction of labels kept per class")
    labels.add_argument("--labels-per-class", type=int, help="labelled images kept per class")
    labels.add_argument(
        "--label-list",
        help="file naming the labelled images, one file name per line (SimCLR's 1percent.txt "
        "format; --data imagefolder)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=d.val_fraction,
        help="of the labelled images per class, held out to pick the best epoch (0: last)",
    )  # fmt: skip
    p.add_argument("--random-init", action="store_true", help="same recipe, random backbone")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the labelled images")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="head learning rate")
    p.add_argument(
        "--backbone-lr",
        type=float,
        help="backbone learning rate (default: --lr / 10); 0 freezes it",
    )
    p.add_argument(
        "--layer-decay", type=float, default=d.layer_decay,
        help="backbone LR x decay ** (stages above the layer); 1: uniform",
    )  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up (default: 5%% of the steps)")
    p.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy smoothing"
    )
    p.add_argument(
        "--crop-scale", type=float, nargs=2, default=list(d.crop_scale),
        help="RandomResizedCrop area range (1 1: no crop)",
    )  # fmt: skip
    p.add_argument(
        "--hflip-prob", type=float, default=d.hflip_prob, help="horizontal flip probability"
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default=d.precision, help="autocast precision"
    )
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument(
        "--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes"
    )
    p.add_argument(
        "--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps,
        help="mid-epoch checkpoint interval (and one at each epoch end)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="label subset, split, data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--name", help="model card title (default: the --out folder name)")
    p.add_argument("--resume", default="none", help="'auto', a checkpoint path, or 'none'")
    p.add_argument(
        "--keep-last-batch", action="store_true", help="train on each epoch's last partial batch"
    )
    p.add_argument(
        "--test-every-epoch", action="store_true", help="also report the best epoch's test scores"
    )
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The ``FinetuneConfig`` of parsed CLI arguments."""
    return FinetuneConfig(
        model=args.model, data=args.data, out=args.out, data_path=args.data_path,
        train_split=args.train_split,
        test_split=None if str(args.test_split).lower() == "none" else args.test_split,
        image_key=args.image_key, label_key=args.label_key, train_subset=args.train_subset,
        test_subset=args.test_subset, label_fraction=args.label_fraction,
        labels_per_class=args.labels_per_class, label_list=args.label_list,
        val_fraction=args.val_fraction, keep_last_batch=args.keep_last_batch,
        test_every_epoch=args.test_every_epoch,
        random_init=args.random_init, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        backbone_lr=args.backbone_lr, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        label_smoothing=args.label_smoothing, crop_scale=tuple(args.crop_scale),
        hflip_prob=args.hflip_prob, precision=args.precision, device=args.device,
        num_workers=args.num_workers, checkpoint_every_steps=args.checkpoint_every_steps,
        seed=args.seed, progress=not args.no_progress, name=args.name,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = finetune(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except (FinetuneError, DataError, CheckpointError, SMIHubError) as e:
        print(f"Error: {cli_words(str(e))}", file=sys.stderr)
        return 2
    finally:
        D.cleanup_distributed()
    if result:
        shown = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in
                 result["metrics"].items()]  # fmt: skip
        print(f"Fine-tuned weights -> {args.out}: " + ", ".join(shown))
    return 0


_CONFIG_KEYS = {  # the pretraining config keys training.data names, as this CLI's flags
    "data.path": "--data-path",
    "data.split": "--train-split/--test-split",
    "data.image_key": "--image-key",
    "data.label_key": "--label-key",
    "train.batch_size": "--batch-size",
}


def cli_words(message: str) -> str:
    """``message`` with the pretraining config keys replaced by this command's flags."""
    for key, flag in _CONFIG_KEYS.items():
        message = message.replace(key, flag)
    return message


if __name__ == "__main__":
    sys.exit(main())
