"""SMI (or Barlow Twins / VICReg) pretraining, from one CPU to many GPU nodes.

    python -m training.pretrain --config training/configs/fmnist_resnet18_smi.yaml [key=value ...]
    torchrun --nproc-per-node 8 -m training.pretrain --config ... [--resume auto]

Writes ``<output_dir>/config.yaml``, ``metrics.jsonl``, ``tb/`` and ``checkpoints/`` (see
docs/training.md). ``--resume auto`` continues from the newest checkpoint exactly: same data
order and augmentations, optimizer, schedule, scaler and RNG states.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from smi_hub.cli_format import ArgumentParser
from smi_hub.models import SMIModel
from smi_hub.outputs import OutputFolderError, claim_output_dir, resolve_output
from smi_hub.plan import TIMED_BATCH, TRAIN_FACTOR, print_plan, seconds_per_image
from training import distributed as D
from training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    load_checkpoint,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from training.config import ConfigError, PretrainConfig
from training.config_checks import check_runtime
from training.config_load import load_config, save_config
from training.data import DataError, ResumableSampler
from training.losses import build_loss
from training.optim import WarmupCosine, build_optimizer
from training.pretrain_data import (
    augment_on_device,
    build_monitor_dataset,
    build_train_dataset,
    view_preparer,
)
from training.train_monitor import (
    MetricsLogger,
    TrainingDiverged,
    diverged_message,
    fmt_time,
    monitor_embeddings,
)

log = logging.getLogger("training.pretrain")
EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED = 2, 3, 4
RESUME_KEYS = ("model", "model_config", "optimizer", "scheduler", "scaler", "rng", "epoch", "step")


def backward_scale(loss_fn: nn.Module) -> int:
    """The factor on the loss before ``backward`` under DDP, which averages gradients over
    ranks. A gathered (global-batch) loss is the same on every rank, and each rank
    backpropagates only through its own rows: x world size restores the global gradient. A
    local loss (``loss.kwargs.gather: false``) is each rank's own term: x 1, and the average is
    the gradient of the mean of the local losses."""
    return D.world_size() if getattr(loss_fn, "gather", True) else 1


def _unwrap(model: nn.Module) -> SMIModel:
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]


def train(cfg: PretrainConfig, resume: str = "none") -> dict[str, Any]:
    """Run pretraining described by ``cfg``; returns the final metrics. Call
    :func:`training.distributed.setup_distributed` first under torchrun (``main`` does)."""
    check_runtime(cfg)
    device = D.setup_distributed(cfg.device)
    is_main = D.rank() == 0
    # the output policy (smi_hub.outputs): new, empty or a training run folder; locked for
    # as long as this function runs, released however it ends
    claim = claim_output_dir(cfg.output_dir, "pretrain", flag="output_dir") if is_main else None
    try:
        out = claim.path if claim is not None else resolve_output(cfg.output_dir)
        return _train_into(cfg, resume, device, out)
    finally:
        if claim is not None:
            claim.release()


def _train_into(
    cfg: PretrainConfig, resume: str, device: torch.device, out: Path
) -> dict[str, Any]:
    """``train``'s body, writing into the claimed folder ``out``."""
    ws, rk = D.world_size(), D.rank()
    is_main = rk == 0
    ckpt_dir = out / "checkpoints"
    if cfg.train.batch_size % ws or cfg.train.batch_size < 2 * ws:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (global) must be a multiple of the {ws} "
            f"processes giving each at least 2 images (the losses and BatchNorm need 2); pick "
            f"a multiple of {ws} of at least {2 * ws}."
        )
    local_bs = cfg.train.batch_size // ws
    resume_path = resolve_resume(
        resume,
        ckpt_dir,
        error=ConfigError,
        new_run_hint="choose another output_dir=...",
        accept_folder=True,
    )
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    D.barrier()

    torch.manual_seed(cfg.seed)
    batched = augment_on_device(cfg, device)
    dataset = build_train_dataset(cfg, batched)
    prepare = view_preparer(cfg, device, batched)
    sampler = ResumableSampler(len(dataset), local_bs, ws, rk, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
    )
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    model: nn.Module = SMIModel(**dataclass_dict(cfg.model)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ws > 1 and cfg.train.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif ws > 1 and cfg.train.sync_bn and is_main:
        log.info("SyncBatchNorm needs GPUs; on CPU each process normalizes its own batch.")
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.kwargs)
    grad_scale = backward_scale(loss_fn)
    peak_lr = cfg.train.lr * (cfg.train.batch_size / 256 if cfg.train.lr_scale_batch else 1.0)
    optimizer = build_optimizer(
        model,
        cfg.train.optimizer,
        lr=peak_lr,
        weight_decay=cfg.train.weight_decay,
        momentum=cfg.train.momentum,
        lars_eta=cfg.train.lars_eta,
        exclude_bias_bn=cfg.train.exclude_bias_bn,
        bias_bn_lr_ratio=cfg.train.bias_bn_lr_ratio,
    )
    scheduler = WarmupCosine(
        optimizer,
        total_steps,
        int(round(cfg.train.warmup_epochs * steps_per_epoch)),
        cfg.train.min_lr_ratio,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    start_epoch, step, start_batch = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location="cpu")  # RNG states must stay on CPU
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"{resume_path} lacks {', '.join(missing)}, so training cannot continue from it "
                "(export it, or start a new run)."
            )
        base_model = _unwrap(model)
        if state["model_config"] != base_model.config:
            raise CheckpointError(
                f"{resume_path} was trained with model {state['model_config']}, the config asks "
                f"for {base_model.config}; resume with the run's own config.yaml."
            )
        saved = state.get("config", {})
        changed = [
            f"{section}.{k}: {v!r} -> {getattr(getattr(cfg, section), k)!r}"
            for section in ("train", "data", "loss")
            for k, v in saved.get(section, {}).items()
            if isinstance(saved.get(section), dict)
            and hasattr(getattr(cfg, section), k)
            and dataclass_plain(getattr(getattr(cfg, section), k)) != v
        ]
        if changed and is_main:
            log.warning(
                "Resuming with a config that differs from the checkpoint's (%s); the LR schedule "
                "keeps the checkpoint's length (%d steps).",
                "; ".join(changed),
                int(state["scheduler"]["total_steps"]),
            )
        start_epoch, step, start_batch = restore_training_state(
            state, base_model, optimizer, scheduler, scaler
        )
        if is_main:
            log.info("Resumed from %s: epoch %d, step %d.", resume_path, start_epoch, step)
    if is_main:
        per_image = seconds_per_image(model, cfg.model.image_size, device, train=True)
        print_plan(
            f"pretrain {cfg.loss.name} on {len(dataset):,} images x {cfg.train.epochs} epochs = "
            f"{total_steps:,} steps of {cfg.train.batch_size} ({total_steps - step:,} to go) on "
            f"{ws} x {device} -> {out}",
            per_image * 2 * local_bs * (total_steps - step),
            f"{TRAIN_FACTOR:g} x the forward of 1 timed batch of {TIMED_BATCH} x 2 views; data loading and the "
            "loss not included",
        )
    if ws > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics = MetricsLogger(out, is_main, cfg.log.tensorboard, purge_step=step or None)
    if resume_path is not None:
        metrics.write({"type": "event", "event": "resume", "step": step, "epoch": start_epoch})
    else:
        metrics.write(
            {
                "type": "event",
                "event": "start",
                "step": 0,
                "world_size": ws,
                "device": str(device),
                "augment_device": "batched on " + device.type if batched else "cpu workers",
                "dataset_size": len(dataset),
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "peak_lr": peak_lr,
                "num_params": sum(p.numel() for p in model.parameters()),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    monitor_ds = build_monitor_dataset(cfg, dataset)

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        nonlocal saved
        saved = ckpt_dir / checkpoint_name(step)
        if is_main:
            base_model = _unwrap(model)
            path = save_checkpoint(
                training_state(
                    base_model,
                    optimizer,
                    scheduler,
                    scaler,
                    epoch=epoch,
                    step=step,
                    step_in_epoch=step_in_epoch,
                    config=cfg.to_dict(),
                ),
                ckpt_dir,
                keep_last=cfg.checkpoint.keep_last,
            )
            log.debug("Saved %s", path)
        D.barrier()

    saved = resume_path  # the newest checkpoint of this run, if any
    nonfinite = 0
    skipped_total = 0
    last: dict[str, Any] = {}
    run_start = time.time()
    steps_at_start = step
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if step >= total_steps:
                break
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            dataset.set_epoch(epoch)
            step_in_epoch = start_batch if epoch == start_epoch else 0
            model.train()
            bar = None
            if is_main and cfg.log.progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=steps_per_epoch,
                    initial=step_in_epoch,
                    desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0,  # short logs under nohup
                )
            window_t, window_n = time.time(), 0
            epoch_loss, epoch_n, epoch_skipped = 0.0, 0, 0
            for a, b, skipped in loader:
                a, b = prepare(a), prepare(b)
                n_skipped = int(skipped.sum())
                epoch_skipped += n_skipped
                with D.autocast(device, cfg.train.precision):
                    z_a, z_b = model(a), model(b)
                finite = torch.isfinite(z_a).all() & torch.isfinite(z_b).all()
                loss = loss_fn(z_a, z_b) if bool(D.all_reduce_min_flag(finite)) else None
                ok = loss is not None and bool(D.all_reduce_min_flag(torch.isfinite(loss)))
                if ok:
                    scaler.scale(loss * grad_scale).backward()
                    scaler.unscale_(optimizer)
                    params = [p for p in model.parameters() if p.grad is not None]
                    max_norm = math.inf if cfg.train.grad_clip is None else cfg.train.grad_clip
                    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                    if scaler.is_enabled():
                        scaler.step(optimizer)  # skips by itself on inf gradients
                        scaler.update()
                    elif bool(D.all_reduce_min_flag(torch.isfinite(gnorm))):
                        optimizer.step()
                    else:
                        ok = False
                optimizer.zero_grad(set_to_none=True)
                if not ok:
                    nonfinite += 1
                    msg = (
                        f"Non-finite loss or gradient at step {step} (epoch {epoch}); step "
                        f"skipped ({nonfinite} in a row, limit {cfg.train.max_nonfinite})."
                    )
                    log.warning(msg)
                    metrics.write({"type": "event", "event": "nonfinite", "step": step})
                    if nonfinite >= cfg.train.max_nonfinite:
                        raise TrainingDiverged(diverged_message(nonfinite, step, saved, cfg))
                    continue
                nonfinite = 0
                scheduler.step()
                step += 1
                step_in_epoch += 1
                window_n += 1
                loss_value = float(loss.detach())
                epoch_loss += loss_value
                epoch_n += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log.every_steps == 0 or step_in_epoch == steps_per_epoch:
                    elapsed = time.time() - window_t
                    ips = window_n * cfg.train.batch_size / max(elapsed, 1e-9)
                    lr = optimizer.param_groups[0]["lr"]
                    rate = (step - steps_at_start) / max(time.time() - run_start, 1e-9)
                    eta = (total_steps - step) / max(rate, 1e-9)
                    last = {
                        "type": "train",
                        "step": step,
                        "epoch": epoch + step_in_epoch / steps_per_epoch,
                        "loss": loss_value,
                        "lr": lr,
                        "images_per_s": ips,
                        "grad_norm": float(gnorm),
                        "skipped_images": epoch_skipped,
                    }
                    metrics.write(last)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{loss_value:.4g}",
                            lr=f"{lr:.3g}",
                            img_s=f"{ips:.0f}",
                            eta=fmt_time(eta),
                        )
                    window_t, window_n = time.time(), 0
                if step % cfg.checkpoint.every_steps == 0 and step_in_epoch < steps_per_epoch:
                    checkpoint(epoch, step_in_epoch)
                if step >= total_steps:
                    break
            if bar is not None:
                bar.close()
            seen = max(1, step_in_epoch - (start_batch if epoch == start_epoch else 0))
            skipped_all = int(D.all_reduce_sum(torch.tensor([epoch_skipped], device=device)).item())
            skipped_total += skipped_all
            frac = skipped_all / (seen * cfg.train.batch_size)
            if frac > cfg.data.max_bad_fraction:
                raise DataError(
                    f"{skipped_all} unreadable images were skipped in epoch {epoch} "
                    f"({frac:.1%} of those drawn, limit data.max_bad_fraction="
                    f"{cfg.data.max_bad_fraction}); the dataset is mostly unreadable. Fix or "
                    "remove the files named in the warnings above."
                )
            epoch_done = step_in_epoch >= steps_per_epoch
            record: dict[str, Any] = {
                "type": "epoch",
                "step": step,
                "epoch": epoch + 1 if epoch_done else epoch + step_in_epoch / steps_per_epoch,
                "loss": epoch_loss / max(1, epoch_n),
                "skipped_images": skipped_all,
                "elapsed_s": time.time() - run_start,
            }
            if monitor_ds is not None and is_main:
                record.update(
                    monitor_embeddings(
                        _unwrap(model), monitor_ds, device, cfg.train.precision, local_bs, prepare
                    )
                )
            metrics.write(record)
            if is_main:
                log.info(
                    "epoch %s: %s",
                    epoch + 1,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
                )
            last = record
            if epoch_done:
                checkpoint(epoch + 1, 0)
            else:
                checkpoint(epoch, step_in_epoch)
    finally:
        metrics.close()
    return last


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def dataclass_plain(value: Any) -> Any:
    """A config value as the plain type stored in checkpoints (dataclasses -> dicts)."""
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m training.pretrain",
        description="Self-supervised pretraining (SMI, Barlow Twins or VICReg) of an SMIModel.",
    )
    p.add_argument("--config", help="YAML config (see training/configs/).")
    p.add_argument(
        "--resume",
        default="none",
        help="'auto': continue from the newest checkpoint in output_dir (start fresh if none); "
        "a checkpoint path; 'none' (default): refuse to overwrite an existing run.",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. train.epochs=5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        train(cfg, resume=args.resume)
    except (ConfigError, OutputFolderError) as e:
        print(f"Config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, CheckpointError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_DATA
    except TrainingDiverged as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        D.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
