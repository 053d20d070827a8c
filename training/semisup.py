"""Semi-supervised evaluation (``python -m training.evaluate semisup``): fixed, seeded,
class-balanced label subsets pinned by index files, and fine-tuning on them with the references'
settings through ``training.finetune``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smi_hub.fileio import atomic_write_text
from smi_hub.models import SMIModel
from smi_hub.weights import save_weights_folder
from training.data import IndexedSubset, subset_indices
from training.eval_data import build_eval_source
from training.finetune import finetune
from training.finetune_data import FinetuneConfig, select_label_subset
from training.label_lists import LabelListError, label_list_indices, read_label_list
from training.probes import EvalError

# Their semi-supervised fine-tuning (README commands): 20 epochs, weight decay 0, SGD momentum
# 0.9, cosine per epoch, batch 256. Barlow Twins publishes only the 1 % setting.
REFERENCE_SEMISUP = {
    ("barlow_twins", 0.01): {"lr_backbone": 0.005, "lr_head": 0.5},
    ("vicreg", 0.01): {"lr_backbone": 0.03, "lr_head": 0.08},
    ("vicreg", 0.1): {"lr_backbone": 0.01, "lr_head": 0.1},
}
SEMISUP_COMMON = {"epochs": 20, "weight_decay": 0.0, "batch_size": 256}


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


def run_semisup(
    args: argparse.Namespace,
    model: SMIModel,
    out: str | None,
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """``semisup``: fine-tune backbone + head on a fixed class-balanced label subset, with the
    references' settings, through ``training.finetune`` (the one fine-tuning loop)."""
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

    train = build_eval_source(
        args.dataset, args.data_path, args.train_split, args.image_key, args.label_key
    )
    if args.subset_file:  # a published list (SimCLR's 1percent.txt format): its files
        if not hasattr(train, "samples") or args.train_subset:
            raise EvalError("--subset-file names files: use --dataset imagefolder, no subset.")
        index_file = Path(args.subset_file)
        try:
            indices = label_list_indices(train.samples, read_label_list(index_file))
        except LabelListError as e:
            raise EvalError(f"{index_file}: {e}") from e
    else:  # the subset finetune will draw (same source, subset, seed), pinned by a file
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
        label_fraction=None if args.subset_file else args.fraction,
        label_list=args.subset_file, val_fraction=0.0, epochs=epochs,
        batch_size=ref["batch_size"], optimizer="sgd", lr=lr_head, backbone_lr=lr_backbone,
        weight_decay=wd, momentum=0.9, warmup_steps=0, label_smoothing=0.0,
        crop_scale=(0.08, 1.0), hflip_prob=0.5, device=args.device,
        num_workers=args.num_workers, seed=args.seed, keep_last_batch=True,
        test_every_epoch=True,
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
    m = res["metrics"]  # final, and the best epoch's (as the references print best_acc)
    return {
        "top1": float(m["top1"]), "top5": float(m["top5"]),
        "best_top1": float(m["best_test_top1"]), "best_top5": float(m["best_test_top5"]),
        "best_epoch": int(m["best_test_epoch"]),
    }  # fmt: skip
