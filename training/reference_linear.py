"""The references' linear evaluation (facebookresearch/barlowtwins and vicreg ``evaluate.py``):
a frozen backbone in eval mode sees freshly augmented images every epoch, and a linear head on
its raw pooled features is trained with SGD; ``python -m training.evaluate linear --protocol
barlow_twins|vicreg`` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from smi_hub.models import SMIModel
from training.probes import _predict, progress_bar, topk_accuracy

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
    for epoch in progress_bar(range(epochs), "linear (reference)", unit="epoch"):
        net.train()
        for x, y in progress_bar(train_loader, f"epoch {epoch + 1}/{epochs}", unit="batch"):
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
