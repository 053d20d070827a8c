"""Where is SMI efficient? SMI vs Barlow Twins vs VICReg over batch size, projector width and
synchronization, with one pretraining budget and one evaluation for every cell.

    python benchmarks/efficiency_study.py --out benchmarks/results/efficiency            # CPU
    python benchmarks/efficiency_study.py --out DIR --preset gpu                         # 1 GPU
    python benchmarks/efficiency_study.py --out DIR --report                # tables + plots

Every cell pretrains with ``training.pretrain`` (the Fashion-MNIST ResNet-18 recipes in
``training/configs/``, only the studied setting overridden) for the preset's epochs over the
same fixed subset of the training split, then evaluates the frozen backbone with ``training.probes``:
k-NN (k 20, T 0.07), the fast linear probe, and 1-shot / 5-shot linear probes over 5 seeds.
Learning rate: the recipe's ``lr`` per 256 images, scaled linearly with the batch
(``lr_scale_batch``: the references' rule ``lr = base x batch / 256``), the same for all three.

Tables: ``batch`` (batch sizes at one projector width), ``width`` (projector output widths at
batch 256) and ``sync`` (two processes under ``torchrun``, gloo: SMI's loss on each process's
local batch vs on the gathered global batch, and Barlow Twins / VICReg gathered). Each cell
records the median step time (from the run's ``metrics.jsonl``), the peak resident memory of
the training process(es) (``getrusage`` maxrss), the parameter count, and, under torchrun, the
bytes each process hands to collectives per step: the loss's (counted while the loss runs)
and DDP's gradient all-reduce (a DDP communication hook). ``results.json`` is rewritten after
every cell; a rerun skips the finished cells and redoes an interrupted one. ``--shard K/N``
runs every N-th cell (N processes share one results file under a lock: one per core).
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smi_hub.fileio import atomic_write_text  # noqa: E402
from smi_hub.script_modules import load_file_module  # noqa: E402

LOSSES = ("smi", "barlow_twins", "vicreg")
TABLES = {"cpu": ["random", "sync", "width", "batch"], "gpu": ["random", "width", "batch"]}
PRESETS: dict[str, dict[str, Any]] = {
    # CPU, embedded model size (ResNet-18 at base width 16, 28 px): 3 epochs over 8,192 images
    # (24,576 two-view samples a cell, the budget of the recipe's short check, where SMI and
    # Barlow Twins beat random init); the grid takes about 50 minutes on 2 cores (--shard).
    "cpu": {
        "images": 8192,
        "epochs": 3,
        "batches": [32, 64, 128, 256, 512],
        "batch_width": 2048,
        "widths": [512, 2048, 8192],
        "hidden": 1024,
        "sync_width": 2048,
        "sync_batch": 256,
        "eval_train": 5000,
        "eval_test": 2000,
        "device": "cpu",
        "num_workers": 0,
    },
    # One GPU (H200-class), same model, the full shape: projector W-W-W.
    "gpu": {
        "images": 8192,
        "epochs": 1,
        "batches": [32, 64, 128, 256, 512],
        "batch_width": 8192,
        "widths": [512, 2048, 8192],
        "hidden": None,
        "sync_width": 8192,
        "sync_batch": 256,
        "eval_train": 10000,
        "eval_test": 5000,
        "device": "cuda",
        "num_workers": 4,
    },
}


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def projector(width: int, hidden: int | None) -> list[int]:
    """Projector dims: three layers of ``width`` (``hidden`` None) or ``hidden``-``hidden``-
    ``width`` (the loss sees ``width``; the CPU preset keeps the recipe's 1024 hidden layers)."""
    return [width] * 3 if hidden is None else [hidden, hidden, width]


def plan(p: dict[str, Any], seeds: list[int], tables: list[str]) -> list[dict[str, Any]]:
    """All cells, in the order they run: random init, sync (its bytes are the cheapest
    result), then the small-hardware questions first (batch 256 and 64, the widest projector,
    batch 128), then the other batch sizes and widths. A cell in two tables (batch 256 at the
    batch table's width) runs once; the report picks each table's cells by their settings."""
    cells: list[dict[str, Any]] = []

    def add(table: str, loss: str, batch: int, width: int, sync: str, seed: int) -> None:
        nproc = 1 if sync == "single" else 2
        cid = f"{loss}-b{batch}-w{width}-{sync}-s{seed}"
        if all(c["id"] != cid for c in cells):
            cells.append(
                {"id": cid, "table": table, "loss": loss, "batch": batch, "width": width,
                 "sync": sync, "nproc": nproc, "seed": seed}
            )  # fmt: skip

    bw = p["batch_width"]
    batch = [(b, bw) for b in p["batches"]] if "batch" in tables else []
    width = [(256, w) for w in p["widths"]] if "width" in tables else []
    first = [s for s in [(256, bw), (64, bw), (256, max(p["widths"])), (128, bw)]
             if s in batch + width]  # fmt: skip
    for seed in seeds:
        if "random" in tables and seed == seeds[0]:
            cells.append(
                {"id": "random-init", "table": "random", "loss": "none", "batch": 0,
                 "width": bw, "sync": "single", "nproc": 1, "seed": 0}
            )  # fmt: skip
        if "sync" in tables:
            add("sync", "smi", p["sync_batch"], p["sync_width"], "local", seed)
            for loss in LOSSES:
                add("sync", loss, p["sync_batch"], p["sync_width"], "gathered", seed)
        for b, w in first + batch + width:
            for loss in LOSSES:
                add("batch" if (b, w) in batch else "width", loss, b, w, "single", seed)
    return cells


def overrides(cell: dict[str, Any], p: dict[str, Any], run_dir: Path) -> list[str]:
    """``training.pretrain`` overrides of the cell on top of the loss's recipe."""
    dims = projector(cell["width"], p["hidden"])
    out = [
        f"output_dir={run_dir}",
        f"seed={cell['seed']}",
        f"device={p['device']}",
        f"data.subset={p['images']}",
        f"data.num_workers={p['num_workers']}",
        f"train.epochs={p['epochs']}",
        f"train.batch_size={cell['batch']}",
        f"model.projector_dims=[{','.join(map(str, dims))}]",
        "log.every_steps=1",
        "log.monitor_samples=0",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.keep_last=1",
    ]
    if p["device"] == "cuda":
        out.append("train.precision=bf16")
    if cell["sync"] == "local":
        out.append("loss.kwargs.gather=false")
    return out


# --------------------------------------------------------------------------------------------
# Worker: one pretraining run with counters (runs in each training process)
# --------------------------------------------------------------------------------------------


def install_counters(counts: dict[str, int]) -> None:
    """Count bytes handed to collectives: ``loss`` (while a loss module runs), ``control``
    (other Python-level collectives: step flags, barriers) and ``ddp_grad`` (DDP's gradient
    buckets, through a communication hook)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import training.pretrain as pretrain

    state = {"in_loss": False, "in_hook": False}

    def nbytes(t: Any) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        return sum(nbytes(x) for x in t)

    def counted(fn, arg_index: int):
        def wrapper(*args, **kwargs):
            if not state["in_hook"]:  # the hook counts DDP's own all_reduce
                key = "loss" if state["in_loss"] else "control"
                counts[key] = counts.get(key, 0) + nbytes(args[arg_index])
            return fn(*args, **kwargs)

        return wrapper

    dist.all_gather = counted(dist.all_gather, 1)  # bytes this process contributes
    dist.all_reduce = counted(dist.all_reduce, 0)

    real_build_loss = pretrain.build_loss

    def build_loss(name: str, **kw: Any) -> torch.nn.Module:
        module = real_build_loss(name, **kw)
        module.register_forward_pre_hook(lambda *_: state.update(in_loss=True))
        module.register_forward_hook(lambda *_: state.update(in_loss=False))
        return module

    pretrain.build_loss = build_loss

    def hook(_state: Any, bucket: Any):
        counts["ddp_grad"] = counts.get("ddp_grad", 0) + nbytes(bucket.buffer())
        state["in_hook"] = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            state["in_hook"] = False

    # DDP checks the hook's annotations as objects (this module's are strings)
    hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}

    class CountingDDP(pretrain.DistributedDataParallel):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.register_comm_hook(None, hook)

    pretrain.DistributedDataParallel = CountingDDP


def worker(stats: Path, argv: list[str]) -> int:
    """Run ``training.pretrain.main(argv)`` with counters; write this rank's stats to
    ``stats`` (suffixed with the rank)."""
    import training.pretrain as pretrain

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    counts: dict[str, int] = {}
    install_counters(counts)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    rc = pretrain.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    out = {
        "rc": rc,
        "rank": rank,
        "seconds": time.time() - t0,
        "bytes": counts,
        "rss_start_mb": rss0 / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    stats.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stats}.rank{rank}").write_text(json.dumps(out))
    return rc


# --------------------------------------------------------------------------------------------
# One cell: pretrain (subprocess, torchrun when nproc > 1), then evaluate
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_cell(cell: dict[str, Any], p: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Pretrain one cell from scratch (an interrupted cell's folder is discarded, so that its
    times and byte counts cover one whole run); returns timing, memory and bytes."""
    config = ROOT / "training" / "configs" / f"fmnist_resnet18_{cell['loss']}.yaml"
    shutil.rmtree(run_dir, ignore_errors=True)
    stats = run_dir / "study_stats.json"
    args = [str(Path(__file__).resolve()), "worker", "--stats", str(stats), "--"]
    args += ["--config", str(config), *overrides(cell, p, run_dir)]
    if cell["nproc"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(cell["nproc"]), "--master-port", str(_free_port()), *args]  # fmt: skip
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining {cell['id']} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(run_dir.glob("study_stats.json.rank*"))]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    train = [r for r in records if r.get("type") == "train"]
    steps = max(r["step"] for r in train)
    step_s = [cell["batch"] / r["images_per_s"] for r in train[1:] or train]
    keys = {k for r in ranks for k in r["bytes"]}
    return {
        "steps": steps,
        "num_params": start["num_params"],
        "peak_lr": start["peak_lr"],
        "step_ms": 1000 * statistics.median(step_s),
        "pretrain_s": max(r["seconds"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "final_loss": train[-1]["loss"],
        # per process per step (rank 0's counts; every rank sends the same)
        "bytes_per_step": {k: ranks[0]["bytes"].get(k, 0) / steps for k in sorted(keys)},
    }


def evaluate_cell(
    cell: dict[str, Any], p: dict[str, Any], run_dir: Path | None, model_config: dict[str, Any]
) -> dict[str, float]:
    """k-NN, fast linear and 1/5-shot (5 seeds) on fixed subsets of Fashion-MNIST."""
    from training.eval_data import cached_features, load_model
    from training.probes import knn_classify, linear_probe, low_shot

    if run_dir is None:
        model, _ = load_model(random_init=True, model_config=model_config, seed=cell["seed"])
    else:
        model, _ = load_model(run_dir=str(run_dir))
    dev = p["device"]
    common = {"source": "fashion_mnist", "path": None, "device": dev, "seed": 0}
    x_tr, y_tr = cached_features(model, split="train", subset=p["eval_train"], **common)
    x_te, y_te = cached_features(model, split="test", subset=p["eval_test"], **common)
    knn = knn_classify(x_tr, y_tr, x_te, y_te, 20, 0.07, 10, device=dev)
    lin = linear_probe(x_tr, y_tr, x_te, y_te, epochs=100, seed=0, device=dev, progress=False)
    shots = low_shot(x_tr, y_tr, x_te, y_te, shots=(1, 5), seeds=(0, 1, 2, 3, 4))["metrics"]
    return {"knn_top1": knn["top1"], "linear_top1": lin["metrics"]["top1"], **shots}


def model_config(p: dict[str, Any], width: int) -> dict[str, Any]:
    from training.config_load import load_config

    cfg = load_config(str(ROOT / "training/configs/fmnist_resnet18_smi.yaml")).to_dict()["model"]
    return {**cfg, "projector_dims": projector(width, p["hidden"])}


def run_cell(cell: dict[str, Any], p: dict[str, Any], runs: Path) -> dict[str, Any]:
    run_dir = runs / cell["id"]
    t0 = time.time()
    row: dict[str, Any] = dict(cell)
    if cell["loss"] == "none":
        row.update(evaluate_cell(cell, p, None, model_config(p, cell["width"])))
    else:
        row.update(pretrain_cell(cell, p, run_dir))
        row.update(evaluate_cell(cell, p, run_dir, {}))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep metrics, drop weights
    row["cell_s"] = time.time() - t0
    return row


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"settings": {}, "cells": {}}


def save_cell(path: Path, settings: dict[str, Any], row: dict[str, Any]) -> None:
    """Merge one finished cell into ``results.json`` (re-read under a lock: shards share it)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results["settings"] = settings
        results["cells"][row["id"]] = row
        atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Run every cell (of this shard, matching ``--match``) that ``results.json`` lacks,
    saving it after each."""
    p = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in PRESETS["cpu"]
                                     and v is not None}}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = load_results(path)
    if results["settings"] and results["settings"]["preset"] != p:
        raise SystemExit(
            f"{path} was made with other settings ({results['settings']['preset']}); use "
            "another --out, or delete it to start over."
        )
    settings = {
        "preset": p,
        "torch": torch.__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "host_cpus": os.cpu_count(),
    }
    shard, shards = args.shard
    cells = plan(p, args.seeds, args.tables or TABLES[args.preset])
    for i, cell in enumerate(cells):
        if i % shards != shard or not any(fnmatch.fnmatch(cell["id"], m) for m in args.match):
            continue
        if cell["id"] in load_results(path)["cells"]:
            continue
        print(f"[{i + 1}/{len(cells)}] {cell['id']} ...", flush=True)
        row = run_cell(cell, p, Path(args.runs_dir) if args.runs_dir else out / "runs")
        save_cell(path, settings, row)
        print(
            f"    knn {row['knn_top1']:.2f} linear {row['linear_top1']:.2f} 1-shot "
            f"{row['1shot_top1']:.2f} 5-shot {row['5shot_top1']:.2f}  "
            f"step {row.get('step_ms', 0):.0f} ms  {row['cell_s']:.0f} s",
            flush=True,
        )
    return load_results(path)


def shard_arg(text: str) -> tuple[int, int]:
    """``K/N`` (0 <= K < N): this process runs cells K, K+N, K+2N, ..."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/2)") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: K must be in 0..N-1")
    return k, n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        w = argparse.ArgumentParser()
        w.add_argument("--stats", required=True)
        w.add_argument("rest", nargs=argparse.REMAINDER)
        a = w.parse_args(argv[1:])
        rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
        return worker(Path(a.stats), rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results folder (results.json, runs/, report)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--tables", nargs="+", choices=["random", "sync", "width", "batch"],
        help="default: the preset's (gpu: no sync; its bytes do not depend on the device, and "
        "two processes would share one GPU)",
    )  # fmt: skip
    ap.add_argument("--shard", type=shard_arg, default=(0, 1), help="K/N: every N-th cell")
    ap.add_argument("--match", nargs="+", default=["*"], help="only cells whose id matches")
    ap.add_argument("--images", type=int, help="pretraining images (the subset of each epoch)")
    ap.add_argument("--epochs", type=int, help="epochs over that subset")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--widths", type=int, nargs="+")
    ap.add_argument("--batch-width", type=int)
    ap.add_argument("--sync-width", type=int)
    ap.add_argument("--sync-batch", type=int)
    ap.add_argument("--eval-train", type=int)
    ap.add_argument("--eval-test", type=int)
    ap.add_argument("--runs-dir", help="the cells' pretraining folders (default: OUT/runs)")
    ap.add_argument("--report", action="store_true", help="only write tables and plots")
    ap.add_argument("--images-dir", help="where --report writes the PNGs (default: --out)")
    args = ap.parse_args(argv)
    if args.report:
        report = load_file_module(
            "smi_efficiency_report", ROOT / "benchmarks" / "efficiency_report.py", register=False
        )
        report.write_report(Path(args.out), args.images_dir)
        return 0
    run_grid(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
