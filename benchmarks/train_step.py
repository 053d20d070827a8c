"""Training-step throughput of SMI vs Barlow Twins vs VICReg with the same backbone and batch.

    python benchmarks/train_step.py --out results/train_step.json                # CPU, small
    python benchmarks/train_step.py --arch resnet50 --image-size 224 --batch-size 256 \
        --device cuda --precision bf16 --out train_step_h100.json                 # one GPU

One process, one model architecture (ResNet + the 8192-8192-8192 projector by default), one
batch of real Fashion-MNIST images (resized to ``--image-size``, gray replicated to RGB) for
every objective; each measures a full optimizer step (two views forward, loss, backward, LARS
step) after warm-up. Also times the loss alone (forward + backward on the projector outputs),
which is where the objectives differ: SMI is O(N^2 D), Barlow Twins O(N D^2). Prints a
markdown table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smi_hub.fashion_mnist import load_arrays  # noqa: E402
from smi_hub.models import SMIModel  # noqa: E402
from training.losses import build_loss  # noqa: E402
from training.optim import build_optimizer  # noqa: E402


def real_batch(batch_size: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """``batch_size`` Fashion-MNIST test images as a normalized B x 3 x S x S float batch."""
    images, _ = load_arrays("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=g)[:batch_size]
    x = torch.from_numpy(images[idx.numpy()]).float().div(255.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    return ((x - 0.286) / 0.353).expand(-1, 3, -1, -1).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One objective's model, optimizer and step function on the shared batch."""

    def __init__(self, args: argparse.Namespace, name: str, device: torch.device) -> None:
        torch.manual_seed(args.seed)  # same initial weights for every objective
        model = SMIModel(
            arch=args.arch,
            base_width=args.base_width,
            small_stem=args.small_stem,
            projector_dims=args.projector,
            image_size=args.image_size,
        ).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.name = name
        self.loss_fn = build_loss(name)
        self.opt = build_optimizer(model, "lars", lr=0.1, weight_decay=1.5e-6)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.device = device

    def step(self, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss_fn(self.model(a), self.model(b))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def loss_only(self, z_a: torch.Tensor, z_b: torch.Tensor) -> None:
        self.loss_fn(z_a, z_b).backward()


def run_benchmark(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time every objective, interleaved step by step so that a change in machine load
    affects all of them alike; returns one row per objective (medians)."""
    x = real_batch(args.batch_size, args.image_size, args.seed).to(device)
    a, b = x, torch.flip(x, dims=[3])  # second view: the mirrored images
    if args.channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(args.seed)
    d = args.projector[-1]
    z_a = torch.randn(args.batch_size, d, generator=g).to(device).requires_grad_()
    z_b = torch.randn(args.batch_size, d, generator=g).to(device).requires_grad_()
    runners = [Runner(args, name, device) for name in args.losses]
    step_t: dict[str, list[float]] = {r.name: [] for r in runners}
    loss_t: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(args.warmup + args.steps):
        for r in runners:
            _sync(device)
            t = time.perf_counter()
            r.step(a, b)
            _sync(device)
            t1 = time.perf_counter()
            r.loss_only(z_a, z_b)
            _sync(device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                step_t[r.name].append(t1 - t)
                loss_t[r.name].append(t2 - t1)
    rows = []
    for r in runners:
        step_s = statistics.median(step_t[r.name])
        rows.append(
            {
                "loss": r.name,
                "images_per_s": args.batch_size / step_s,
                "step_ms": 1000 * step_s,
                "step_ms_min": 1000 * min(step_t[r.name]),
                "loss_ms": 1000 * statistics.median(loss_t[r.name]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--projector", type=int, nargs="+", default=[8192, 8192, 8192])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--losses", nargs="+", default=["smi", "barlow_twins", "vicreg"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run_benchmark(args, device)
    meta = {
        "benchmark": "train_step",
        "data": "Fashion-MNIST test images (real), resized",
        "arch": args.arch,
        "base_width": args.base_width,
        "small_stem": args.small_stem,
        "image_size": args.image_size,
        "projector": args.projector,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(
        f"{args.arch} (base width {args.base_width}) {args.image_size}px, batch {args.batch_size}, "
        f"projector {'-'.join(map(str, args.projector))}, {args.precision}, {meta['device']}, "
        f"{meta['torch_threads']} threads"
    )
    print("| loss | images/s | step ms (median) | loss fwd+bwd ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['loss']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['loss_ms']:.1f} |"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
