"""Pretraining's data from its config: the two-view training dataset, the fixed images of the
collapse monitors, and each view's preparation on the training device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.batch_augment import BatchAugment, CropTwoViews, view_specs
from training.config import PretrainConfig
from training.data import (
    IndexedSubset,
    SafeTwoViewDataset,
    build_source,
    check_readable,
    subset_indices,
    two_view_transform,
)


def augment_on_device(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether the augmentations after the crop run batched on the training device
    (``data.augment.device``: ``gpu``, or ``auto`` on CUDA)."""
    mode = cfg.data.augment.device
    return mode == "gpu" or (mode == "auto" and device.type == "cuda")


def build_train_dataset(cfg: PretrainConfig, batched: bool = False) -> SafeTwoViewDataset:
    """The two-view training dataset the config describes (probed for readability). With
    ``batched``, workers only decode, crop and flip (:class:`CropTwoViews`); the rest is
    :func:`view_preparer`'s :class:`BatchAugment` on the training device."""
    d = cfg.data
    base = build_source(d.source, d.path, d.split, d.image_key, d.label_key)
    idx = subset_indices(len(base), d.subset, cfg.seed)
    if idx is not None:
        base = IndexedSubset(base, idx)
    check_readable(base, d.max_bad_fraction, seed=cfg.seed)
    m = cfg.model
    if batched:
        transform = CropTwoViews(m.image_size, view_specs(d.augment))
    else:
        transform = two_view_transform(m.image_size, m.mean, m.std, d.augment)
    return SafeTwoViewDataset(base, transform, seed=cfg.seed)


def build_monitor_dataset(
    cfg: PretrainConfig, dataset: SafeTwoViewDataset
) -> SafeTwoViewDataset | None:
    """The fixed image pairs of the per-epoch collapse monitors (``log.monitor_samples`` of
    ``dataset``'s images, same views); None when the monitors are off."""
    if cfg.log.monitor_samples <= 0:
        return None
    n_mon = min(cfg.log.monitor_samples, len(dataset))
    mon_idx = subset_indices(len(dataset.base), n_mon, seed=cfg.seed + 1) or range(n_mon)
    return SafeTwoViewDataset(
        IndexedSubset(dataset.base, mon_idx), dataset.transform, seed=cfg.seed + 1
    )


def view_preparer(
    cfg: PretrainConfig, device: torch.device, batched: bool
) -> Callable[[Any], torch.Tensor]:
    """Loader batch of one view -> the model's input on ``device``: the batched augmentation
    (``batched``), or a plain transfer of the workers' finished views."""
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if batched:
        m, a = cfg.model, cfg.data.augment
        return BatchAugment(m.mean, m.std, max(a.blur_sigma), device, cfg.train.channels_last)
    return lambda x: x.to(device, non_blocking=True).contiguous(memory_format=layout)
