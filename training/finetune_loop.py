"""The fine-tuning run itself: the classifier and its parameter groups, the training and
validation loop (resumable from checkpoints, DDP under torchrun), the final test and the
weights folder + ``metrics.json`` it writes."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import smi_hub
from smi_hub.fileio import atomic_write_text
from smi_hub.models import SMIModel
from smi_hub.outputs import Claim, resolve_output
from smi_hub.plan import TIMED_BATCH, TRAIN_FACTOR, print_plan, seconds_per_image
from training import distributed as D
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from training.data import (
    IndexedSubset,
    ResumableSampler,
    build_source,
    eval_transform,
    subset_indices,
    view_transform,
)
from training.eval_data import default_resize_ratio
from training.finetune_data import (
    FinetuneConfig,
    FinetuneError,
    MappedDataset,
    build_test_dataset,
    check_classes,
    dataset_name,
    dataset_targets,
    select_label_subset,
    split_validation,
)
from training.label_lists import LabelListError, label_list_indices, read_label_list
from training.optim import WarmupCosine

log = logging.getLogger("training.finetune")


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


def run_finetune(cfg: FinetuneConfig, resume: str, claim: Claim | None) -> dict[str, Any]:
    """The run of ``finetune`` once ``cfg`` is checked and ``cfg.out`` claimed (``claim`` on
    rank 0, None on the other ranks)."""
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
    labels = dataset_targets(base)
    if not labels or min(labels) < 0:
        raise FinetuneError(
            f"{dataset_name(cfg)} {cfg.train_split} has unlabelled images; fine-tuning needs "
            "class subfolders (ImageFolder) or a label column."
        )
    classes = list(getattr(base, "classes", []) or [])
    num_classes = max(len(classes), max(labels) + 1)
    class_names = classes if len(classes) == num_classes else [str(c) for c in range(num_classes)]
    check_classes(cfg, labels, class_names)
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
    train_ds = MappedDataset(IndexedSubset(base, train_idx), augment, seed=cfg.seed)
    val_ds = MappedDataset(IndexedSubset(base, val_idx), evaluation) if val_idx else None
    test_ds = build_test_dataset(cfg, model) if cfg.test_every_epoch else None

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text(
            json.dumps(
                {
                    "dataset": dataset_name(cfg),
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
            f"{TRAIN_FACTOR:g} x the forward of 1 timed batch of {TIMED_BATCH}; data loading and evaluation "
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
        test = build_test_dataset(cfg, model)
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
        "dataset": dataset_name(cfg),
        "split": cfg.train_split,
        **{k: v for k, v in cfg.to_dict().items() if k not in ("model", "data", "out", "name")},
        **settings,
        "best_epoch": metrics["best_epoch"],
        "evaluation_datasets": {"finetune": dataset_name(cfg)},
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
        "dataset": dataset_name(cfg),
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "settings": {**cfg.to_dict(), **settings},
        "checkpoint": cfg.model if not cfg.random_init else "random-init",
        "history": history,
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result
