"""The data side of fine-tuning: the run's settings (``FinetuneConfig``) and their checks,
class-balanced label subsets, the validation split and the (image, label) datasets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import smi_hub
from smi_hub.models import SMIModel
from training.config import ConfigError
from training.config_checks import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, Range
from training.data import (
    IndexedSubset,
    _mix_seed,
    build_source,
    eval_transform,
    subset_indices,
)
from training.eval_data import default_resize_ratio

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


class MappedDataset(torch.utils.data.Dataset):
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


def dataset_targets(ds) -> list[int]:
    """The integer label of every item of ``ds`` (its ``targets`` when it has them)."""
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [int(ds[i][1]) for i in range(len(ds))]
    return [int(t) for t in targets]


def dataset_name(cfg: FinetuneConfig) -> str:
    """``data`` or ``data:data_path``, as recorded in labels.json, metrics and the card."""
    return cfg.data if not cfg.data_path else f"{cfg.data}:{cfg.data_path}"


# --------------------------------------------------------------------------------------------
# Model, optimizer, evaluation
# --------------------------------------------------------------------------------------------


def build_test_dataset(cfg: FinetuneConfig, model: SMIModel) -> MappedDataset:
    """The test split (``test_subset`` of it) with the model's evaluation transform."""
    test = build_source(cfg.data, cfg.data_path, cfg.test_split, cfg.image_key, cfg.label_key)
    idx = subset_indices(len(test), cfg.test_subset, cfg.seed)
    if idx is not None:
        test = IndexedSubset(test, idx)
    ev = eval_transform(model.image_size, model.mean, model.std, default_resize_ratio(model))
    return MappedDataset(test, ev)


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


def check_classes(cfg: FinetuneConfig, labels: list[int], class_names: list[str]) -> None:
    """At least two classes, and an image in each (an empty class folder is a class the
    head could never learn)."""
    if len(class_names) < 2:
        raise FinetuneError(
            f"{dataset_name(cfg)} {cfg.train_split} has {len(class_names)} class(es) "
            f"({', '.join(class_names)}); a classifier needs at least 2 (a 1-way head answers "
            "100% for anything). Add a folder per class."
        )
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise FinetuneError(
            f"{dataset_name(cfg)} {cfg.train_split}: the class(es) {empty[:5]} have no image; "
            "fill or remove their folders."
        )


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse impossible settings before any work starts (``FinetuneError``)."""
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
