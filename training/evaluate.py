"""Evaluation of frozen (or fine-tuned) backbones: k-NN, linear probes, transfer, semi-supervised.

    python -m training.evaluate knn --run-dir runs/fmnist_resnet18_smi
    python -m training.evaluate linear --protocol fast --run-dir runs/fmnist_resnet18_smi
    python -m training.evaluate linear --protocol barlow_twins --weights FOLDER --dataset ...
    python -m training.evaluate transfer --weights smi_resnet18_fmnist --data digits \
        --shots 1 5 10 all --seeds 0 1 2 3 4
    python -m training.evaluate semisup --fraction 0.01 --protocol vicreg --weights FOLDER
    python -m training.evaluate knn --random-init --config training/configs/X.yaml ...

Protocols:

- ``knn``: DINO's weighted k-NN (``eval_knn.py``) on cached features of centre images.
- ``linear --protocol fast`` (default): today's cheap probe, a linear classifier on cached,
  standardized centre-image features. ``--protocol barlow_twins`` / ``vicreg``: the reference
  linear evaluations exactly: the frozen backbone (eval mode) sees freshly augmented images
  every epoch (RandomResizedCrop + flip), raw features, SGD momentum 0.9 at lr 0.3 (Barlow
  Twins) or 0.02 (VICReg), weight decay 1e-6, batch 256, 100 epochs, cosine per epoch, top-1 and
  top-5 on the test split after every epoch (final and best reported).
- ``transfer``: on any labelled dataset other than the pretraining one (``--data`` SOURCE):
  k-NN on all training images, and a linear probe on 1 / 5 / 10 / all labelled images per
  class over several seeds.
- ``semisup``: fine-tuning on a fixed, seeded, class-balanced ``--fraction`` of the labels
  (index file saved and reused) with the references' semi-supervised settings, through
  ``training/finetune.py``.

Evaluation preprocessing comes from the model (``smi_hub.registry.preprocessing``: resize the
short side to 256 then center-crop 224 for 224 px models, no resize for small ones) unless
``--resize-ratio`` overrides it. Features are extracted once per model, dataset and split and
cached (``--cache-dir``; by default ``<run-dir>/eval/features``). Results go to ``<out>.json``
(``eval/<protocol>.json`` under ``--run-dir``) and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from smi_hub.errors import SMIHubError
from smi_hub.fileio import atomic_write, atomic_write_text
from smi_hub.images import to_rgb
from smi_hub.models import SMIModel
from training.checkpoint import CheckpointError, find_latest, load_checkpoint
from training.data import DataError, IndexedSubset, build_source, eval_transform, subset_indices

log = logging.getLogger("training.evaluate")
PROTOCOLS = ("knn", "linear", "transfer", "semisup")
LINEAR_PROTOCOLS = ("fast", "barlow_twins", "vicreg")
EVAL_SOURCES = ("fashion_mnist", "imagefolder", "hf", "digits")

# The references' linear evaluation (barlowtwins@8e8d284 / vicreg@4e12602 evaluate.py + README)
REFERENCE_LINEAR = {
    "barlow_twins": {"lr": 0.3, "weight_decay": 1e-6, "batch_size": 256, "epochs": 100},
    "vicreg": {"lr": 0.02, "weight_decay": 1e-6, "batch_size": 256, "epochs": 100},
}
# Their semi-supervised fine-tuning (README commands): 20 epochs, weight decay 0, SGD momentum
# 0.9, cosine per epoch, batch 256. Barlow Twins publishes only the 1 % setting.
REFERENCE_SEMISUP = {
    ("barlow_twins", 0.01): {"lr_backbone": 0.005, "lr_head": 0.5},
    ("vicreg", 0.01): {"lr_backbone": 0.03, "lr_head": 0.08},
    ("vicreg", 0.1): {"lr_backbone": 0.01, "lr_head": 0.1},
}
SEMISUP_COMMON = {"epochs": 20, "weight_decay": 0.0, "batch_size": 256}


class EvalError(ValueError):
    """Evaluation was asked for something impossible; the message says how to fix it."""


def _bar(iterable: Iterable, desc: str, total: int | None = None, **kw: Any) -> tqdm:
    """A progress bar on stderr (every evaluation loop has one)."""
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, **kw)


# --------------------------------------------------------------------------------------------
# Protocols on features (pure functions, usable on any N x C tensors)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Weighted k-NN (Wu et al. 2018; DINO's protocol): cosine similarity to the ``k`` nearest
    training features, votes weighted by ``exp(sim / temperature)``. Returns the top-5 (or
    fewer) predicted classes of each test feature, N x min(5, C), best first."""
    if k < 1 or temperature <= 0:
        raise EvalError(f"k must be >= 1 and temperature > 0, got k={k}, T={temperature}.")
    train = F.normalize(train_features.float().to(device), dim=1)
    test = F.normalize(test_features.float().to(device), dim=1)
    train_labels = train_labels.long().to(device)
    c = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, train.shape[0])
    preds = []
    starts = range(0, test.shape[0], chunk_size)
    for start in _bar(starts, "k-NN", unit="chunk", disable=len(starts) < 4):
        sim = test[start : start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.topk(min(5, c), dim=1).indices.cpu())
    return torch.cat(preds)


def topk_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent from N x k ranked predictions."""
    target = labels.long().cpu()[:, None]
    pred = pred.cpu()
    n = max(1, target.shape[0])
    return {
        "top1": 100.0 * float((pred[:, :1] == target).any(dim=1).sum()) / n,
        "top5": 100.0 * float((pred[:, :5] == target).any(dim=1).sum()) / n,
    }


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of :func:`knn_predict` on labelled test features.
    ``device``: where the similarity search runs (e.g. ``cuda``)."""
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    pred = knn_predict(
        train_features, train_labels, test_features, k, temperature, c, chunk_size, device
    )
    return topk_accuracy(pred, test_labels)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C counts: row = true class, column = predicted class (top-1)."""
    idx = labels.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, -1)


def per_class_report(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names: Sequence[str] = ()
) -> dict[str, Any]:
    """Per-class top-1 accuracy (percent) and the confusion matrix of top-1 predictions."""
    cm = confusion_matrix(pred[:, 0] if pred.ndim == 2 else pred, labels, num_classes)
    support = cm.sum(dim=1).clamp_min(1)
    names = list(class_names) or [str(i) for i in range(num_classes)]
    return {
        "classes": names,
        "top1": [100.0 * float(cm[i, i]) / float(support[i]) for i in range(num_classes)],
        "confusion": cm.tolist(),
    }


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(1e-6) if train.shape[0] > 1 else 1.0
    return [(x - mean) / std for x in (train, *others)]


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 1024,
    seed: int = 0,
    desc: str | None = None,
) -> nn.Linear:
    """Fit a linear classifier (SGD with momentum 0.9, cosine schedule, cross-entropy) on the
    device the features are on. ``desc``: show a progress bar over epochs with this label."""
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.normal_(0, 0.01, generator=g)
        clf.bias.zero_()
    clf = clf.to(features.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = features.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in _bar(range(epochs), desc or "linear", unit="epoch", disable=desc is None):
        order = torch.randperm(n, generator=g).to(features.device)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            loss = F.cross_entropy(clf(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


@torch.no_grad()
def _predict(clf: nn.Module, features: torch.Tensor) -> torch.Tensor:
    logits = clf(features)
    return logits.topk(min(5, logits.shape[1]), dim=1).indices


def _accuracy(clf: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return topk_accuracy(_predict(clf, features), labels)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    lrs: tuple[float, ...] = (0.1,),
    weight_decays: tuple[float, ...] = (0.0,),
    epochs: int = 100,
    batch_size: int = 1024,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The ``fast`` linear probe on frozen, standardized features. With several ``lrs`` x
    ``weight_decays`` the best pair is chosen on a held-out ``val_fraction`` of the training
    features, then the classifier is refit on all of them; the test set is used once.
    ``predictions``: the test set's ranked top-5 classes (N x 5 tensor)."""
    y_tr, y_te = train_labels.long().to(device), test_labels.long().to(device)
    c = int(num_classes or int(max(y_tr.max(), y_te.max())) + 1)
    x_tr, x_te = _standardize(train_features.float().to(device), test_features.float().to(device))
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    sweep: list[dict[str, float]] = []
    best = grid[0]
    if len(grid) > 1:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(x_tr.shape[0], generator=g).to(device)
        n_val = max(1, int(round(val_fraction * x_tr.shape[0])))
        val, fit = order[:n_val], order[n_val:]
        best_acc = -1.0
        for i, (lr, wd) in enumerate(grid):
            desc = f"linear sweep {i + 1}/{len(grid)} lr={lr} wd={wd}" if progress else None
            clf = train_linear(x_tr[fit], y_tr[fit], c, epochs, lr, wd, batch_size, seed, desc)
            acc = _accuracy(clf, x_tr[val], y_tr[val])["top1"]
            sweep.append({"lr": lr, "weight_decay": wd, "val_top1": acc})
            if acc > best_acc:
                best, best_acc = (lr, wd), acc
    desc = f"linear lr={best[0]} wd={best[1]}" if progress else None
    clf = train_linear(x_tr, y_tr, c, epochs, best[0], best[1], batch_size, seed, desc)
    pred = _predict(clf, x_te)
    metrics = topk_accuracy(pred, y_te)
    metrics["train_top1"] = _accuracy(clf, x_tr, y_tr)["top1"]
    return {
        "metrics": metrics,
        "best": {"lr": best[0], "weight_decay": best[1]},
        "sweep": sweep,
        "predictions": pred.cpu(),
    }


def sample_shots(labels: torch.Tensor, shots: int | None, seed: int) -> torch.Tensor:
    """Indices of ``shots`` random examples per class (all of a class when it has fewer)."""
    if shots is None:
        return torch.arange(labels.shape[0])
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:shots]])
    return torch.cat(picked).sort().values


def low_shot(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: tuple[int | None, ...] = (1, 5, 10, None),
    seeds: tuple[int, ...] = (0, 1, 2),
    classifier: str = "linear",
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, Any]:
    """Low-shot transfer: for each ``shots`` (None = all) and seed, train on that many labelled
    images per class and test on the full test set. Returns mean and std of top-1 per shot."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    metrics: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    jobs = [(s, seed) for s in shots for seed in (seeds if s is not None else seeds[:1])]
    for s, seed in _bar(jobs, "low-shot", unit="fit"):
        name = "all" if s is None else str(s)
        idx = sample_shots(train_labels, s, seed)
        if classifier == "knn":
            acc = knn_classify(
                train_features[idx], train_labels[idx], test_features, test_labels,
                k=k, temperature=temperature, num_classes=c,
            )["top1"]  # fmt: skip
        else:
            acc = linear_probe(
                train_features[idx], train_labels[idx], test_features, test_labels,
                lrs=(lr,), weight_decays=(weight_decay,), epochs=epochs,
                batch_size=256, num_classes=c, seed=seed, progress=False,
            )["metrics"]["top1"]  # fmt: skip
        runs.setdefault(name, []).append(acc)
    for name, accs in runs.items():
        metrics[f"{name}shot_top1"] = float(np.mean(accs))
        metrics[f"{name}shot_top1_std"] = float(np.std(accs))
    return {"metrics": metrics, "runs": runs}


# --------------------------------------------------------------------------------------------
# Models, datasets and cached features
# --------------------------------------------------------------------------------------------

_MODEL_KEYS = (
    "arch", "base_width", "small_stem", "projector_dims", "image_size", "mean", "std",
    "zero_init_residual", "projector_bias",
)  # fmt: skip


def load_model(
    checkpoint: str | None = None,
    weights: str | None = None,
    run_dir: str | None = None,
    random_init: bool = False,
    model_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[SMIModel, str]:
    """The model to evaluate and a description of where it came from.

    Exactly one source of weights: a training ``checkpoint``, ``weights`` (a weights folder,
    or a registry name / Hugging Face id / URL that ``smi_hub.load`` resolves), a ``run_dir``
    (its newest checkpoint) or ``random_init`` (architecture from the other arguments or
    ``model_config``, weights drawn with ``seed``: the random-initialisation baseline).
    """
    from smi_hub.hub import load as hub_load
    from smi_hub.weights import load_weights_folder

    if run_dir and not checkpoint and not weights:
        found = find_latest(Path(run_dir) / "checkpoints")
        if found is None and not random_init:
            raise EvalError(f"No checkpoint in {run_dir}/checkpoints; train first or pass one.")
        checkpoint = str(found) if found else None
    if random_init:
        cfg = model_config
        if cfg is None and checkpoint:
            cfg = load_checkpoint(checkpoint)["model_config"]
        if cfg is None and weights:
            cfg = hub_load(weights, pretrained=False).config
        if cfg is None:
            raise EvalError(
                "--random-init needs an architecture: pass --config, --checkpoint, --weights "
                "or --run-dir to copy it from."
            )
        torch.manual_seed(seed)
        return SMIModel(**{k: v for k, v in cfg.items() if k in _MODEL_KEYS}), "random-init"
    if checkpoint and weights:
        raise EvalError("Pass either --checkpoint or --weights, not both.")
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model = SMIModel(**state["model_config"])
        model.load_state_dict(state["model"])
        return model, str(checkpoint)
    if weights:
        if Path(weights).is_dir():
            return load_weights_folder(weights, device="cpu"), str(weights)
        return hub_load(weights, device="cpu"), str(weights)
    raise EvalError(
        "No model given: pass --checkpoint PATH, --weights FOLDER|NAME, --run-dir DIR or "
        "--random-init (with an architecture source)."
    )


def model_fingerprint(model: SMIModel) -> str:
    """sha256 over the backbone tensors and architecture (names the feature cache)."""
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for k, v in model.backbone_state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_resize_ratio(model: SMIModel) -> float:
    """The evaluation resize the model's weights expect: short side ``image_size * ratio``,
    then center crop ``image_size``. From its ``pretrained_cfg`` (timm's ``crop_pct`` =
    1 / ratio, or a recorded ``resize_ratio``), else ``smi_hub.registry.preprocessing`` of
    its config (256/224 for 224 px models, 1.0 up to 64 px)."""
    from smi_hub.registry import preprocessing

    pre = getattr(model, "pretrained_cfg", None) or {}
    recorded = pre.get("resize_ratio")
    if recorded is None and pre.get("crop_pct"):
        recorded = 1.0 / float(pre["crop_pct"])
    resize = preprocessing(model.config, recorded)["resize"]
    return resize / model.image_size


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits, 10 classes, as RGB
    PIL images (the 0-16 ink levels scaled to 0-255, gray replicated to 3 channels).

    It ships without a split: ``train`` and ``test`` are a fixed stratified half of each class
    (seed 0, the odd image of a class to train): 901 and 896 images. Evaluation resizes the 8x8 images up to the model's input
    (bicubic, short side ``image_size * resize_ratio``, e.g. 28 px for the Fashion-MNIST models).
    """

    def __init__(self, split: str = "train") -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test"):
            raise DataError(f"digits has splits train and test, not {split!r}.")
        digits = load_digits()
        images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(0)
        keep = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(labels == c))
            half = (len(idx) + 1) // 2
            keep.append(idx[:half] if split == "train" else idx[half:])
        order = np.sort(np.concatenate(keep))
        self.images, self.targets = images[order], [int(t) for t in labels[order]]
        self.indices = order.tolist()
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, i: int) -> str:
        return f"digits[{self.indices[i]}]"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return to_rgb(Image.fromarray(self.images[i], mode="L")), self.targets[i]


def build_eval_source(
    source: str,
    path: str | None = None,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
) -> torch.utils.data.Dataset:
    """``training.data.build_source`` plus the packaged evaluation-only source ``digits``."""
    if source == "digits":
        return DigitsDataset(split)
    if source not in EVAL_SOURCES:
        raise EvalError(f"Unknown --dataset {source!r}; choose one of {', '.join(EVAL_SOURCES)}.")
    return build_source(source, path, split, image_key, label_key)


@torch.no_grad()
def extract(
    model: SMIModel,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N x C, float32) and labels (N) of a dataset of (tensor, label).

    Unreadable images raise; evaluation sets are expected to be clean."""
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y in _bar(loader, desc, unit="batch"):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        feats.append(model.embed(x).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


class Transformed(torch.utils.data.Dataset):
    """``(transform(image), label)`` over a dataset of ``(image, label)``."""

    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def labelled_source(
    source: str,
    path: str | None,
    split: str,
    subset: int | None = None,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
) -> torch.utils.data.Dataset:
    """One labelled split (a fixed random ``subset`` of it when given) of ``(PIL, label)``."""
    base = build_eval_source(source, path, split, image_key, label_key)
    idx = subset_indices(len(base), subset, seed)
    if idx is not None:
        base = IndexedSubset(base, idx)
    labels = getattr(base, "targets", None)
    if labels is not None and len(labels) and min(labels) < 0:
        raise EvalError(
            f"{source} {split} has unlabelled images; evaluation needs class subfolders "
            "(ImageFolder) or a label column."
        )
    return base


def cached_features(
    model: SMIModel,
    source: str,
    path: str | None,
    split: str,
    subset: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    resize_ratio: float | None = None,
    image_key: str = "image",
    label_key: str = "label",
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split, read from / written to ``cache_dir`` when given.
    ``resize_ratio`` None: the model's own preprocessing (:func:`default_resize_ratio`)."""
    if resize_ratio is None:
        resize_ratio = default_resize_ratio(model)
    key = json.dumps(
        [
            model_fingerprint(model),
            source,
            str(path),
            split,
            subset,
            resize_ratio,
            seed,
            image_key,
            label_key,
        ]  # fmt: skip
    )
    name = f"{source}_{split}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    cache = Path(cache_dir) / name if cache_dir else None
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
        log.info("Features of %s/%s from cache %s", source, split, cache)
        return data["features"], data["labels"]
    base = labelled_source(source, path, split, subset, seed, image_key, label_key)
    transform = eval_transform(model.image_size, model.mean, model.std, resize_ratio)
    feats, labels_t = extract(
        model, Transformed(base, transform), batch_size, num_workers, device, f"{split} features"
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save({"features": feats, "labels": labels_t}, tmp))
    return feats, labels_t


# --------------------------------------------------------------------------------------------
# The references' linear evaluation (augmented images every epoch, frozen backbone)
# --------------------------------------------------------------------------------------------


def reference_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_ratio: float
) -> tuple[v2.Compose, v2.Compose]:
    """The references' ``evaluate.py`` transforms at the model's size: train
    RandomResizedCrop(size) + horizontal flip, test Resize(size * ratio) + CenterCrop(size),
    both with torchvision's default (bilinear) interpolation, then ToTensor + Normalize."""
    tail = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose(
        [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *tail]
    )
    resize = int(round(image_size * resize_ratio))
    test = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail])
    return train, test


class _FrozenLinear(nn.Module):
    """Frozen backbone (kept in eval mode) + trainable linear head on the raw pooled features."""

    def __init__(self, backbone: SMIModel, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = nn.Linear(backbone.num_features, num_classes)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01, generator=generator)
            self.head.bias.zero_()

    def train(self, mode: bool = True) -> _FrozenLinear:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics never move
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.backbone.embed(x)
        return self.head(h)


def reference_linear(
    model: SMIModel,
    train_set: torch.utils.data.Dataset,
    test_set: torch.utils.data.Dataset,
    num_classes: int,
    lr: float,
    weight_decay: float = 1e-6,
    epochs: int = 100,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """The references' frozen linear evaluation on already-transformed datasets: SGD momentum
    0.9 on the head only, cosine annealing stepped once per epoch, cross-entropy, shuffled
    batches; test top-1 / top-5 after every epoch. Returns final (``top1``, ``top5``) and best
    over epochs (``best_top1``, ``best_top5``, what the references print), the per-epoch
    history and the final test predictions."""
    g = torch.Generator().manual_seed(seed)
    net = _FrozenLinear(model, num_classes, g).to(device)
    opt = torch.optim.SGD(net.head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=g
    )
    test_loader = torch.utils.data.DataLoader(
        test_set, batch_size=batch_size, num_workers=num_workers
    )
    history: list[dict[str, float]] = []
    best = {"top1": 0.0, "top5": 0.0}
    pred = labels = torch.empty(0)
    for epoch in _bar(range(epochs), "linear (reference)", unit="epoch"):
        net.train()
        for x, y in _bar(train_loader, f"epoch {epoch + 1}/{epochs}", unit="batch"):
            loss = F.cross_entropy(net(x.to(device)), torch.as_tensor(y).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        preds, ys = [], []
        with torch.no_grad():
            for x, y in test_loader:
                preds.append(_predict(net, x.to(device)).cpu())
                ys.append(torch.as_tensor(y))
        pred, labels = torch.cat(preds), torch.cat(ys)
        acc = topk_accuracy(pred, labels)
        best = {k: max(best[k], acc[k]) for k in best}
        history.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **acc})
        sched.step()
    final = history[-1] if history else {"top1": 0.0, "top5": 0.0}
    metrics = {
        "top1": final["top1"],
        "top5": final["top5"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
    }
    return {"metrics": metrics, "history": history, "predictions": pred, "labels": labels}


# --------------------------------------------------------------------------------------------
# Semi-supervised: fixed class-balanced label subsets
# --------------------------------------------------------------------------------------------


def subset_file(
    folder: str | os.PathLike, dataset: str, split: str, fraction: float, seed: int
) -> Path:
    """Where the index file of a label subset lives (one training index per line)."""
    return Path(folder) / f"{dataset}_{split}_{fraction:g}_seed{seed}.txt"


def fix_subset(path: str | os.PathLike, indices: Sequence[int]) -> list[int]:
    """Record the label subset ``indices`` in ``path`` (written atomically), or, when the file
    exists, check that it holds exactly these indices: the saved file pins the subset, as the
    references ship theirs (SimCLR's 1 % / 10 % ImageNet lists)."""
    path = Path(path)
    indices = sorted(int(i) for i in indices)
    if path.is_file():
        try:
            saved = [int(line) for line in path.read_text().split()]
        except ValueError as e:
            raise EvalError(f"{path} must hold one integer index per line ({e}).") from e
        if saved != indices:
            raise EvalError(
                f"{path} holds a different label subset ({len(saved)} indices) than this "
                f"dataset, fraction and seed give ({len(indices)}); the data changed. Delete "
                "the file to record the new subset, or restore the data it was drawn from."
            )
        return saved
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{i}\n" for i in indices))
    return indices


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown_table(result: dict[str, Any]) -> str:
    """A small markdown report of one evaluation result."""
    variant = result["settings"].get("protocol")
    lines = [
        f"## {result['protocol']}{f' ({variant})' if variant else ''} on {result['dataset']}",
        "",
        f"Model: `{result['checkpoint']}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in result["metrics"].items():
        lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if "knn" in result:  # transfer: k-NN on all training images
        lines += [f"| knn_{k} | {v:.2f} |" for k, v in result["knn"].items()]
    per_class = result.get("per_class")
    if per_class:
        lines += ["", "| class | top-1 |", "|---|---|"]
        lines += [
            f"| {name} | {acc:.1f} |"
            for name, acc in zip(per_class["classes"], per_class["top1"], strict=True)
        ]
    settings = ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    lines += ["", f"Settings: {settings}", ""]
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``result`` as JSON to ``out`` and its markdown table next to it (``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(result))
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_shots(values: list[str]) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for v in values:
        if v == "all":
            out.append(None)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise EvalError(f"--shots takes positive integers or 'all', got {v!r}.")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a backbone: k-NN, linear probes, transfer, semi-supervised.",
    )
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument(
        "--protocol",
        dest="recipe",
        choices=LINEAR_PROTOCOLS,
        default=None,
        help="linear: fast (cached standardized features; default) or the barlow_twins / "
        "vicreg reference evaluation; semisup: whose fine-tuning settings (default vicreg)",
    )
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="training checkpoint (.pt)")
    src.add_argument(
        "--weights", help="weights folder, or a registry name / HF id for smi_hub.load"
    )
    src.add_argument("--run-dir", help="training run: newest checkpoint; results to eval/")
    src.add_argument("--config", help="training YAML (architecture for --random-init)")
    src.add_argument(
        "--random-init", action="store_true", help="evaluate a randomly initialised backbone"
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        "--data",
        dest="dataset",
        default="fashion_mnist",
        help="fashion_mnist | imagefolder | hf | digits (scikit-learn's 8x8 digits)",
    )
    data.add_argument("--data-path", help="ImageFolder root or datasets folder")
    data.add_argument("--train-split", default="train")
    data.add_argument("--test-split", default="test")
    data.add_argument("--image-key", default="image")
    data.add_argument("--label-key", default="label")
    data.add_argument("--train-subset", type=int, help="use this many training images")
    data.add_argument("--test-subset", type=int, help="use this many test images")
    data.add_argument(
        "--resize-ratio",
        type=float,
        default=None,
        help="resize the short side to ratio x size, then center-crop (default: the model's "
        "preprocessing, 256/224 for 224 px models, 1.0 for small ones)",
    )
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--device", default="cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cache-dir", help="feature cache (default <run-dir>/eval/features)")
    run.add_argument("--out", help="result JSON (default <run-dir>/eval/<protocol>.json)")
    knn = p.add_argument_group("k-NN")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    lin = p.add_argument_group("linear probe / transfer / semisup")
    lin.add_argument(
        "--epochs", type=int, default=None, help="default: 100 (linear, transfer), 20 (semisup)"
    )
    lin.add_argument(
        "--lr", type=float, nargs="+", default=None, help="default: the protocol's (fast: 0.1)"
    )
    lin.add_argument(
        "--weight-decay", type=float, nargs="+", default=None, help="default: the protocol's"
    )
    lin.add_argument("--shots", nargs="+", default=["1", "5", "10", "all"])
    lin.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lin.add_argument("--classifier", choices=("linear", "knn"), default="linear")
    semi = p.add_argument_group("semisup")
    semi.add_argument("--fraction", type=float, default=0.01, help="labelled fraction (0.01, 0.1)")
    semi.add_argument(
        "--subset-dir", help="folder of label-subset index files (default <out folder>/subsets)"
    )
    return p


def _class_names(args: argparse.Namespace) -> list[str]:
    source = build_eval_source(
        args.dataset, args.data_path, args.test_split, args.image_key, args.label_key
    )
    return [str(c) for c in getattr(source, "classes", [])]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one protocol from parsed CLI arguments; returns (and writes) the result dict."""
    if args.recipe is not None and args.protocol not in ("linear", "semisup"):
        raise EvalError("--protocol applies to linear and semisup only.")
    shots = _parse_shots(args.shots) if args.protocol == "transfer" else ()
    model_config = None
    if args.config:
        from training.config import load_config

        model_config = load_config(args.config).to_dict()["model"]
    model, origin = load_model(
        args.checkpoint, args.weights, args.run_dir, args.random_init, model_config, args.seed
    )
    ratio = args.resize_ratio if args.resize_ratio is not None else default_resize_ratio(model)
    out = args.out or (
        str(Path(args.run_dir) / "eval" / f"{args.protocol}.json") if args.run_dir else None
    )
    t0 = time.time()
    settings: dict[str, Any] = {
        "train_split": args.train_split,
        "test_split": args.test_split,
        "image_size": model.image_size,
        "resize_ratio": ratio,
        "resize": int(round(model.image_size * ratio)),
    }
    extra: dict[str, Any] = {}
    if args.protocol == "semisup":
        metrics = _run_semisup(args, model, ratio, out, settings, extra)
    elif args.protocol == "linear" and args.recipe in REFERENCE_LINEAR:
        metrics = _run_reference_linear(args, model, ratio, settings, extra)
    else:
        metrics = _run_on_features(args, model, ratio, shots, settings, extra)
    settings["seconds"] = round(time.time() - t0, 2)
    dataset = args.dataset if not args.data_path else f"{args.dataset}:{args.data_path}"
    result = {
        "protocol": args.protocol,
        "dataset": dataset,
        "metrics": metrics,
        "settings": settings,
        "checkpoint": origin,
        **extra,
    }
    if out:
        write_result(result, out)
    print(markdown_table(result))
    return result


def _run_on_features(
    args: argparse.Namespace,
    model: SMIModel,
    ratio: float,
    shots: tuple[int | None, ...],
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """knn, linear --protocol fast and transfer: all on cached centre-image features."""
    cache_dir = args.cache_dir or (
        str(Path(args.run_dir) / "eval" / "features") if args.run_dir else None
    )
    common = {
        "source": args.dataset,
        "path": args.data_path,
        "cache_dir": cache_dir,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "resize_ratio": ratio,
        "image_key": args.image_key,
        "label_key": args.label_key,
        "device": args.device,
        "seed": args.seed,
    }
    x_tr, y_tr = cached_features(model, split=args.train_split, subset=args.train_subset, **common)
    x_te, y_te = cached_features(model, split=args.test_split, subset=args.test_subset, **common)
    c = int(max(y_tr.max(), y_te.max())) + 1
    settings.update(
        train_images=int(x_tr.shape[0]), test_images=int(x_te.shape[0]),
        feature_dim=int(x_tr.shape[1]),
    )  # fmt: skip
    epochs = args.epochs if args.epochs is not None else 100
    if args.protocol == "knn":
        pred = knn_predict(x_tr, y_tr, x_te, args.k, args.temperature, c, device=args.device)
        metrics = topk_accuracy(pred, y_te)
        settings.update(k=args.k, temperature=args.temperature)
        extra["per_class"] = per_class_report(pred, y_te, c, _class_names(args))
        return metrics
    if args.protocol == "linear":
        res = linear_probe(
            x_tr, y_tr, x_te, y_te, tuple(args.lr or [0.1]), tuple(args.weight_decay or [0.0]),
            epochs, seed=args.seed, device=args.device,
        )  # fmt: skip
        settings.update(protocol="fast", epochs=epochs, **res["best"])
        extra["sweep"] = res["sweep"]
        extra["per_class"] = per_class_report(res["predictions"], y_te, c, _class_names(args))
        return res["metrics"]
    # transfer: linear probes on k shots per class (metrics) + k-NN on all training images
    extra["knn"] = knn_classify(
        x_tr, y_tr, x_te, y_te, args.k, args.temperature, c, device=args.device
    )
    lr = (args.lr or [0.1])[0]
    wd = (args.weight_decay or [5e-4])[0]
    res = low_shot(
        x_tr, y_tr, x_te, y_te, shots, tuple(args.seeds), args.classifier, epochs, lr, wd,
        args.k, args.temperature,
    )  # fmt: skip
    metrics = res["metrics"]
    settings.update(
        shots=args.shots, seeds=args.seeds, classifier=args.classifier, epochs=epochs, lr=lr,
        weight_decay=wd, k=args.k, temperature=args.temperature,
    )  # fmt: skip
    extra["runs"] = res["runs"]
    return metrics


def _run_reference_linear(
    args: argparse.Namespace,
    model: SMIModel,
    ratio: float,
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """``linear --protocol barlow_twins|vicreg``: the references' evaluation on images."""
    ref = REFERENCE_LINEAR[args.recipe]
    lr = (args.lr or [ref["lr"]])[0]
    wd = (args.weight_decay or [ref["weight_decay"]])[0]
    epochs = args.epochs if args.epochs is not None else ref["epochs"]
    train_base = labelled_source(
        args.dataset, args.data_path, args.train_split, args.train_subset, args.seed,
        args.image_key, args.label_key,
    )  # fmt: skip
    test_base = labelled_source(
        args.dataset, args.data_path, args.test_split, args.test_subset, args.seed,
        args.image_key, args.label_key,
    )  # fmt: skip
    train_tf, test_tf = reference_transforms(model.image_size, model.mean, model.std, ratio)
    labels = list(getattr(train_base, "targets", None) or [y for _, y in train_base])
    c = int(max(labels)) + 1
    res = reference_linear(
        model, Transformed(train_base, train_tf), Transformed(test_base, test_tf), c, lr, wd,
        epochs, ref["batch_size"], args.num_workers, args.device, args.seed,
    )  # fmt: skip
    settings.update(
        protocol=args.recipe, lr=lr, weight_decay=wd, epochs=epochs,
        batch_size=ref["batch_size"], train_images=len(train_base), test_images=len(test_base),
        train_transform="RandomResizedCrop(size) + flip, bilinear",
        test_transform=f"Resize({settings['resize']}) + CenterCrop({model.image_size}), bilinear",
    )  # fmt: skip
    extra["history"] = res["history"]
    extra["per_class"] = per_class_report(res["predictions"], res["labels"], c, _class_names(args))
    return res["metrics"]


def _run_semisup(
    args: argparse.Namespace,
    model: SMIModel,
    ratio: float,
    out: str | None,
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """``semisup``: fine-tune backbone + head on a fixed class-balanced label subset, with the
    references' settings, through ``training.finetune`` (the one fine-tuning loop)."""
    from smi_hub.weights import save_weights_folder
    from training.finetune import FinetuneConfig, finetune, select_label_subset

    recipe = args.recipe or "vicreg"
    if recipe == "fast":
        raise EvalError("semisup --protocol takes barlow_twins or vicreg (whose settings).")
    if not out:
        raise EvalError("semisup needs --out FILE.json or --run-dir (where it writes its runs).")
    if args.dataset == "digits":  # training.finetune reads training.data's sources only
        raise EvalError(
            "semisup fine-tunes through training.finetune, which reads fashion_mnist, "
            "imagefolder and hf data; digits is an evaluation-only source (use transfer)."
        )
    key = (recipe, float(args.fraction))
    if key not in REFERENCE_SEMISUP and not (args.lr and len(args.lr) == 2):
        known = ", ".join(f"{r} {f:g}" for r, f in REFERENCE_SEMISUP)
        raise EvalError(
            f"No published {recipe} fine-tuning setting for --fraction {args.fraction:g} "
            f"(published: {known}); pass --lr BACKBONE HEAD to choose one."
        )
    if args.lr and len(args.lr) != 2:
        raise EvalError("semisup --lr takes two values: BACKBONE HEAD.")
    ref = {**SEMISUP_COMMON, **REFERENCE_SEMISUP.get(key, {})}
    lr_backbone, lr_head = args.lr if args.lr else (ref["lr_backbone"], ref["lr_head"])
    wd = (args.weight_decay or [ref["weight_decay"]])[0]
    epochs = args.epochs if args.epochs is not None else ref["epochs"]

    # the subset finetune will draw (same source, subset and seed), pinned by an index file
    train = build_eval_source(
        args.dataset, args.data_path, args.train_split, args.image_key, args.label_key
    )
    positions = subset_indices(len(train), args.train_subset, args.seed)
    split_index = positions if positions is not None else list(range(len(train)))
    if positions is not None:
        train = IndexedSubset(train, positions)
    labels = [int(t) for t in (getattr(train, "targets", None) or [y for _, y in train])]
    chosen = select_label_subset(labels, fraction=args.fraction, seed=args.seed)
    folder = args.subset_dir or str(Path(out).parent / "subsets")
    index_file = subset_file(folder, args.dataset, args.train_split, args.fraction, args.seed)
    indices = fix_subset(index_file, [split_index[i] for i in chosen])

    stem = Path(out).with_suffix("")
    base = Path(f"{stem}_base")
    save_weights_folder(model.cpu(), base, with_projector=False)  # what is fine-tuned
    cfg = FinetuneConfig(
        model=str(base), data=args.dataset, out=f"{stem}_finetuned", data_path=args.data_path,
        train_split=args.train_split, test_split=args.test_split, image_key=args.image_key,
        label_key=args.label_key, train_subset=args.train_subset, test_subset=args.test_subset,
        label_fraction=args.fraction, val_fraction=0.0, epochs=epochs,
        batch_size=ref["batch_size"], optimizer="sgd", lr=lr_head, backbone_lr=lr_backbone,
        weight_decay=wd, momentum=0.9, warmup_steps=0, label_smoothing=0.0,
        crop_scale=(0.08, 1.0), hflip_prob=0.5, device=args.device,
        num_workers=args.num_workers, seed=args.seed,
    )  # fmt: skip
    res = finetune(cfg)
    used = json.loads((Path(cfg.out) / "labels.json").read_text())["train_indices"]
    if sorted(used) != indices:
        raise EvalError(f"finetune trained on other images than {index_file} records.")
    settings.update(
        protocol=recipe, fraction=args.fraction, labelled_images=len(indices),
        lr_backbone=lr_backbone, lr_head=lr_head, weight_decay=wd, epochs=epochs,
        batch_size=ref["batch_size"], subset_file=str(index_file), finetuned=cfg.out,
        test_images=res["metrics"].get("test_images"),
    )  # fmt: skip
    extra["history"] = res.get("history", [])
    return {k: float(res["metrics"][k]) for k in ("top1", "top5")}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (EvalError, DataError, CheckpointError, SMIHubError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
