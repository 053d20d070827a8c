"""Evaluation of frozen backbone features: weighted k-NN, linear probe, low-shot transfer.

    python -m training.evaluate knn --run-dir runs/fmnist_resnet18_smi --dataset fashion_mnist
    python -m training.evaluate linear --checkpoint runs/.../checkpoints/last.pt --dataset ...
    python -m training.evaluate transfer --weights path/to/weights_folder --dataset imagefolder \
        --data-path /data/flowers --shots 1 5 10 all --seeds 0 1 2
    python -m training.evaluate knn --random-init --config training/configs/X.yaml ...

Features (pooled backbone output, ``SMIModel.embed``) are extracted once per model, dataset
and split and cached (``--cache-dir``; by default ``<run-dir>/eval/features``), so sweeping
probe settings is cheap. Results go to ``<out>.json`` (``eval/<protocol>.json`` under
``--run-dir``) and a markdown table next to it.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smi_hub.errors import SMIHubError
from smi_hub.models import SMIModel
from training.checkpoint import CheckpointError, find_latest, load_checkpoint
from training.data import DataError, IndexedSubset, build_source, eval_transform, subset_indices

log = logging.getLogger("training.evaluate")
PROTOCOLS = ("knn", "linear", "transfer")


class EvalError(ValueError):
    """Evaluation was asked for something impossible; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Protocols on features (pure functions, usable on any N x C tensors)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
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
    """Weighted k-NN (Wu et al. 2018; DINO's protocol): cosine similarity to the ``k`` nearest
    training features, votes weighted by ``exp(sim / temperature)``. Returns top-1 and top-5
    accuracy in percent. ``device``: where the similarity search runs (e.g. ``cuda``)."""
    if k < 1 or temperature <= 0:
        raise EvalError(f"k must be >= 1 and temperature > 0, got k={k}, T={temperature}.")
    train = F.normalize(train_features.float().to(device), dim=1)
    test = F.normalize(test_features.float().to(device), dim=1)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long().to(device)
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    k = min(k, train.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        pred = votes.topk(min(5, c), dim=1).indices
        target = test_labels[start : start + chunk_size, None]
        correct1 += int((pred[:, :1] == target).any(dim=1).sum())
        correct5 += int((pred == target).any(dim=1).sum())
    n = test.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


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
) -> nn.Linear:
    """Fit a linear classifier (SGD with momentum 0.9, cosine schedule, cross-entropy) on the
    device the features are on."""
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
    for _ in range(epochs):
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
def _accuracy(clf: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = clf(features)
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    target = labels[:, None]
    n = max(1, labels.shape[0])
    return {
        "top1": 100.0 * float((pred[:, :1] == target).any(dim=1).sum()) / n,
        "top5": 100.0 * float((pred == target).any(dim=1).sum()) / n,
    }


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
) -> dict[str, Any]:
    """Linear probe on frozen (standardized) features. With several ``lrs`` x ``weight_decays``
    the best pair is chosen on a held-out ``val_fraction`` of the training features, then the
    classifier is refit on all of them; the test set is used once."""
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
        for lr, wd in grid:
            clf = train_linear(x_tr[fit], y_tr[fit], c, epochs, lr, wd, batch_size, seed)
            acc = _accuracy(clf, x_tr[val], y_tr[val])["top1"]
            sweep.append({"lr": lr, "weight_decay": wd, "val_top1": acc})
            if acc > best_acc:
                best, best_acc = (lr, wd), acc
    clf = train_linear(x_tr, y_tr, c, epochs, best[0], best[1], batch_size, seed)
    metrics = _accuracy(clf, x_te, y_te)
    metrics["train_top1"] = _accuracy(clf, x_tr, y_tr)["top1"]
    return {"metrics": metrics, "best": {"lr": best[0], "weight_decay": best[1]}, "sweep": sweep}


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
    for s in shots:
        name = "all" if s is None else str(s)
        accs = []
        for seed in seeds if s is not None else seeds[:1]:
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
                    batch_size=256, num_classes=c, seed=seed,
                )["metrics"]["top1"]  # fmt: skip
            accs.append(acc)
        runs[name] = accs
        metrics[f"{name}shot_top1"] = float(np.mean(accs))
        metrics[f"{name}shot_top1_std"] = float(np.std(accs))
    return {"metrics": metrics, "runs": runs}


# --------------------------------------------------------------------------------------------
# Models, datasets and cached features
# --------------------------------------------------------------------------------------------


def load_model(
    checkpoint: str | None = None,
    weights: str | None = None,
    run_dir: str | None = None,
    random_init: bool = False,
    model_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[SMIModel, str]:
    """The model to evaluate and a description of where it came from.

    Exactly one source of weights: a training ``checkpoint``, a ``weights`` folder, a
    ``run_dir`` (its newest checkpoint) or ``random_init`` (architecture from the other
    arguments or ``model_config``: the random-initialisation baseline).
    """
    from smi_hub.weights import load_weights_folder, read_config

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
            cfg = {k: v for k, v in read_config(weights).items() if k in _MODEL_KEYS}
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
        return load_weights_folder(weights, device="cpu"), str(weights)
    raise EvalError(
        "No model given: pass --checkpoint PATH, --weights FOLDER, --run-dir DIR or "
        "--random-init (with an architecture source)."
    )


_MODEL_KEYS = ("arch", "base_width", "small_stem", "projector_dims", "image_size", "mean", "std")


def model_fingerprint(model: SMIModel) -> str:
    """sha256 over the backbone tensors and architecture (names the feature cache)."""
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for k, v in model.backbone_state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
    from tqdm import tqdm

    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, file=sys.stderr):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        feats.append(model.embed(x).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def cached_features(
    model: SMIModel,
    source: str,
    path: str | None,
    split: str,
    subset: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    resize_ratio: float = 1.0,
    image_key: str = "image",
    label_key: str = "label",
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split, read from / written to ``cache_dir`` when given."""
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
    base = build_source(source, path, split, image_key, label_key)
    idx = subset_indices(len(base), subset, seed)
    if idx is not None:
        base = IndexedSubset(base, idx)
    labels = getattr(base, "targets", None)
    if labels is not None and min(labels) < 0:
        raise EvalError(
            f"{source} {split} has unlabelled images; evaluation needs class subfolders "
            "(ImageFolder) or a label column."
        )
    transform = eval_transform(model.image_size, model.mean, model.std, resize_ratio)
    feats, labels_t = extract(
        model, _Transformed(base, transform), batch_size, num_workers, device, f"{split} features"
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        torch.save({"features": feats, "labels": labels_t}, tmp)
        os.replace(tmp, cache)
    return feats, labels_t


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown_table(result: dict[str, Any]) -> str:
    """A small markdown report of one evaluation result."""
    lines = [
        f"## {result['protocol']} on {result['dataset']}",
        "",
        f"Model: `{result['checkpoint']}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in result["metrics"].items():
        lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    settings = ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    lines += ["", f"Settings: {settings}", ""]
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``result`` as JSON to ``out`` and its markdown table next to it (``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
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
        description="Evaluate frozen backbone features: k-NN, linear probe, low-shot transfer.",
    )
    p.add_argument("protocol", choices=PROTOCOLS)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="training checkpoint (.pt)")
    src.add_argument("--weights", help="weights folder (model.safetensors + config.json)")
    src.add_argument("--run-dir", help="training run: newest checkpoint; results to eval/")
    src.add_argument("--config", help="training YAML (architecture for --random-init)")
    src.add_argument(
        "--random-init", action="store_true", help="evaluate a randomly initialised backbone"
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist|imagefolder|hf")
    data.add_argument("--data-path", help="ImageFolder root or datasets folder")
    data.add_argument("--train-split", default="train")
    data.add_argument("--test-split", default="test")
    data.add_argument("--image-key", default="image")
    data.add_argument("--label-key", default="label")
    data.add_argument("--train-subset", type=int, help="use this many training images")
    data.add_argument("--test-subset", type=int, help="use this many test images")
    data.add_argument(
        "--resize-ratio", type=float, default=1.0, help="resize to ratio x size then center-crop"
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
    lin = p.add_argument_group("linear probe / transfer")
    lin.add_argument("--epochs", type=int, default=100)
    lin.add_argument("--lr", type=float, nargs="+", default=[0.1])
    lin.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
    lin.add_argument("--shots", nargs="+", default=["1", "5", "10", "all"])
    lin.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lin.add_argument("--classifier", choices=("linear", "knn"), default="linear")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one protocol from parsed CLI arguments; returns (and writes) the result dict."""
    shots = _parse_shots(args.shots) if args.protocol == "transfer" else ()
    model_config = None
    if args.config:
        from training.config import load_config

        model_config = load_config(args.config).to_dict()["model"]
    model, origin = load_model(
        args.checkpoint, args.weights, args.run_dir, args.random_init, model_config, args.seed
    )
    cache_dir = args.cache_dir or (
        str(Path(args.run_dir) / "eval" / "features") if args.run_dir else None
    )
    common = {
        "source": args.dataset,
        "path": args.data_path,
        "cache_dir": cache_dir,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "resize_ratio": args.resize_ratio,
        "image_key": args.image_key,
        "label_key": args.label_key,
        "device": args.device,
        "seed": args.seed,
    }
    t0 = time.time()
    x_tr, y_tr = cached_features(model, split=args.train_split, subset=args.train_subset, **common)
    x_te, y_te = cached_features(model, split=args.test_split, subset=args.test_subset, **common)
    settings: dict[str, Any] = {
        "train_split": args.train_split,
        "test_split": args.test_split,
        "train_images": int(x_tr.shape[0]),
        "test_images": int(x_te.shape[0]),
        "feature_dim": int(x_tr.shape[1]),
        "image_size": model.image_size,
        "resize_ratio": args.resize_ratio,
    }
    extra: dict[str, Any] = {}
    if args.protocol == "knn":
        metrics = knn_classify(x_tr, y_tr, x_te, y_te, args.k, args.temperature, device=args.device)
        settings.update(k=args.k, temperature=args.temperature)
    elif args.protocol == "linear":
        res = linear_probe(
            x_tr, y_tr, x_te, y_te, tuple(args.lr), tuple(args.weight_decay), args.epochs,
            seed=args.seed, device=args.device,
        )  # fmt: skip
        metrics = res["metrics"]
        settings.update(epochs=args.epochs, **res["best"])
        extra["sweep"] = res["sweep"]
    else:
        res = low_shot(
            x_tr, y_tr, x_te, y_te, shots, tuple(args.seeds), args.classifier, args.epochs,
            args.lr[0], args.weight_decay[0], args.k, args.temperature,
        )  # fmt: skip
        metrics = res["metrics"]
        settings.update(
            shots=args.shots, seeds=args.seeds, classifier=args.classifier, epochs=args.epochs
        )
        extra["runs"] = res["runs"]
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
    out = args.out or (
        str(Path(args.run_dir) / "eval" / f"{args.protocol}.json") if args.run_dir else None
    )
    if out:
        write_result(result, out)
    print(markdown_table(result))
    return result


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
