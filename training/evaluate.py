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
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from smi_hub.cli_format import ArgumentParser
from smi_hub.errors import SMIHubError
from smi_hub.fileio import atomic_write_text
from smi_hub.models import SMIModel
from training.checkpoint import CheckpointError
from training.config_load import load_config
from training.data import DataError
from training.eval_data import (
    Transformed,
    build_eval_source,
    cached_features,
    default_resize_ratio,
    labelled_source,
    load_model,
)
from training.probes import (
    EvalError,
    knn_classify,
    knn_predict,
    linear_probe,
    low_shot,
    per_class_report,
    topk_accuracy,
)
from training.reference_linear import reference_linear, reference_transforms
from training.semisup import run_semisup

log = logging.getLogger("training.evaluate")
PROTOCOLS = ("knn", "linear", "transfer", "semisup")
LINEAR_PROTOCOLS = ("fast", "barlow_twins", "vicreg")

# The references' linear evaluation (barlowtwins@8e8d284 / vicreg@4e12602 evaluate.py + README)
REFERENCE_LINEAR = {
    "barlow_twins": {"lr": 0.3, "weight_decay": 1e-6, "batch_size": 256, "epochs": 100},
    "vicreg": {"lr": 0.02, "weight_decay": 1e-6, "batch_size": 256, "epochs": 100},
}


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
    p = ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a backbone: k-NN, linear probes, transfer, semi-supervised.",
    )
    p.add_argument("protocol", choices=PROTOCOLS, help="evaluation to run")
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
    data.add_argument("--train-split", default="train", help="split to train on")
    data.add_argument("--test-split", default="test", help="split to report on")
    data.add_argument("--image-key", default="image", help="image column (--dataset hf)")
    data.add_argument("--label-key", default="label", help="label column (--dataset hf)")
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
    run.add_argument("--batch-size", type=int, default=256, help="images per batch")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    run.add_argument("--seed", type=int, default=0, help="subsets, label subsets, init")
    run.add_argument("--cache-dir", help="feature cache (default <run-dir>/eval/features)")
    run.add_argument("--out", help="result JSON (default <run-dir>/eval/<protocol>.json)")
    knn = p.add_argument_group("k-NN")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote")
    knn.add_argument(
        "--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)"
    )
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
    lin.add_argument(
        "--shots", nargs="+", default=["1", "5", "10", "all"],
        help="transfer: labelled images per class (all: every one)",
    )  # fmt: skip
    lin.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="transfer: seeds of the shots"
    )
    lin.add_argument(
        "--classifier", choices=("linear", "knn"), default="linear",
        help="transfer: the few-shot classifier",
    )  # fmt: skip
    semi = p.add_argument_group("semisup")
    semi.add_argument("--fraction", type=float, default=0.01, help="labelled fraction (0.01, 0.1)")
    semi.add_argument(
        "--subset-dir", help="folder of label-subset index files (default <out folder>/subsets)"
    )
    semi.add_argument(
        "--subset-file",
        help="the labelled images as a list of file names, one per line, as SimCLR's "
        "1percent.txt / 10percent.txt (--dataset imagefolder); instead of a drawn subset",
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
        metrics = run_semisup(args, model, out, settings, extra)
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
