"""Classifiers on frozen features: DINO's weighted k-NN, linear probes (minibatch SGD on
standardized features), low-shot sampling, top-k accuracy and per-class reports.

Pure functions on N x C tensors, usable on any features; ``training.evaluate`` runs them on a
model's cached features (``python -m training.evaluate knn|linear|transfer``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class EvalError(ValueError):
    """Evaluation was asked for something impossible; the message says how to fix it."""


def progress_bar(iterable: Iterable, desc: str, total: int | None = None, **kw: Any) -> tqdm:
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
    for start in progress_bar(starts, "k-NN", unit="chunk", disable=len(starts) < 4):
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
    for _ in progress_bar(range(epochs), desc or "linear", unit="epoch", disable=desc is None):
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
    for s, seed in progress_bar(jobs, "low-shot", unit="fit"):
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
