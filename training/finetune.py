"""Fine-tune smi-hub weights into an image classifier (head + full backbone).

    python -m training.finetune --model smi_resnet18_fmnist --data fashion_mnist --out runs/ft
    python -m training.finetune --model weights/my_r50 --data imagefolder \
        --data-path /data/flowers --out runs/flowers --epochs 30 --backbone-lr 0.01
    python -m training.finetune ... --label-fraction 0.01      # 1% of the labels per class
    torchrun --nproc-per-node 4 -m training.finetune ...        # DDP, same arguments

Public API (``training.evaluate semisup`` builds on it)::

    finetune(cfg: FinetuneConfig) -> dict  (FinetuneConfig: training.finetune_data)
        Train, select the best epoch on a validation split carved from the labelled training
        images, test it once, write ``cfg.out`` as a weights folder (``smi_hub.load(out)``
        gives the classifier) plus ``metrics.json`` and ``labels.json``; returns the
        ``metrics.json`` dict ({"protocol": "finetune", "metrics": {"top1", "top5",
        "val_top1", ...}, "settings": {...}, ...}).
    training.finetune_data.select_label_subset(labels, fraction=None, per_class=None, seed=0)
        Class-balanced, seeded choice of labelled training indices.

The data and its checks live in ``training.finetune_data``, the run in
``training.finetune_loop``; this module is the entry point (``finetune`` and the CLI).

``--resume auto`` continues from ``<out>/checkpoints`` exactly (data order, augmentations,
optimizer, schedule, RNG states and the best epoch so far).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from smi_hub.cli_format import ArgumentParser
from smi_hub.errors import SMIHubError
from smi_hub.outputs import claim_output_dir
from training import distributed as D
from training.checkpoint import CheckpointError
from training.data import DataError
from training.finetune_data import (
    OPTIMIZERS,
    PRECISIONS,
    FinetuneConfig,
    FinetuneError,
    check_config,
)
from training.finetune_loop import run_finetune


def _main_process() -> bool:
    """Rank 0 of torchrun (or a single process), known before the process group starts."""
    return os.environ.get("RANK", "0") == "0"


def finetune(cfg: FinetuneConfig, resume: str = "none", overwrite: bool = False) -> dict[str, Any]:
    """Run the fine-tuning ``cfg`` describes (see the module docstring); returns the metrics
    dict also written to ``<out>/metrics.json``. Under torchrun, every rank calls it.

    ``cfg.out`` must be new, empty, or a folder fine-tuning or export wrote; ``overwrite``
    writes beside other files, replacing only the weights folder's own (``smi_hub.outputs``).
    The folder stays locked while the run lasts."""
    check_config(cfg)
    claim = claim_output_dir(cfg.out, "weights", overwrite, "--out") if _main_process() else None
    try:
        return run_finetune(cfg, resume, claim)
    finally:
        if claim is not None:
            claim.release()


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
