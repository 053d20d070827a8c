"""Fine-tuning with few labels: the embedded default vs random init vs a frozen linear probe.

For each label fraction (default 1% and 10% of Fashion-MNIST's 60,000 training labels, class
balanced) and seed, three models are trained on the same labelled images and tested once on
the 10,000 test images:

- ``pretrained``: ``training.finetune`` from the embedded default (head + full backbone);
- ``random-init``: the same command with ``--random-init``;
- ``linear-probe``: ``training.evaluate``'s linear probe on the frozen default's pooled
  features of the same labelled images (train + validation indices of the fine-tuning run).

Every run writes ``<out>/<method>_f<fraction>_s<seed>.json``; existing files are reused, so an
interrupted sweep resumes. The table (mean ± std over seeds) goes to ``<out>/table.md``.

    nice -n 10 env OMP_NUM_THREADS=1 python -m benchmarks.finetune_few_labels \
        --out benchmarks/results/finetune_few_labels --max-steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from training.eval_data import cached_features
from training.finetune import finetune
from training.finetune_data import FinetuneConfig
from training.probes import linear_probe


def run_finetune(out: Path, fraction: float, seed: int, random_init: bool, args) -> dict:
    cfg = FinetuneConfig(
        out=str(out),
        label_fraction=fraction,
        random_init=random_init,
        epochs=10_000,  # the step budget ends the run
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        seed=seed,
        progress=False,
    )
    resume = "auto" if (out / "checkpoints").exists() else "none"
    return finetune(cfg, resume=resume)


def run_probe(run_dir: Path, features, seed: int, args) -> dict:
    """Linear probe on the frozen default's features of the run's labelled images."""
    x_tr, y_tr, x_te, y_te = features
    chosen = json.loads((run_dir / "labels.json").read_text())
    idx = torch.as_tensor(sorted(chosen["train_indices"] + chosen["val_indices"]))
    res = linear_probe(x_tr[idx], y_tr[idx], x_te, y_te, lrs=(0.1,), weight_decays=(5e-4,),
                       epochs=100, batch_size=256, seed=seed)  # fmt: skip
    return {"metrics": res["metrics"], "labelled_images": len(idx)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/finetune_few_labels")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backbone-lr", type=float, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import smi_hub

    default = smi_hub.load()
    cache = out / "features"
    features = (
        *cached_features(default, "fashion_mnist", None, "train", cache_dir=cache),
        *cached_features(default, "fashion_mnist", None, "test", cache_dir=cache),
    )
    rows: dict[tuple[str, float], list[float]] = {}
    for fraction in args.fractions:
        for seed in args.seeds:
            for method in ("pretrained", "random-init", "linear-probe"):
                path = out / f"{method}_f{fraction}_s{seed}.json"
                if not path.is_file():
                    t0 = time.time()
                    run_dir = out / "runs" / f"f{fraction}_s{seed}_{method}"
                    if method == "linear-probe":
                        result = run_probe(out / "runs" / f"f{fraction}_s{seed}_pretrained",
                                           features, seed, args)  # fmt: skip
                    else:
                        result = run_finetune(run_dir, fraction, seed, method == "random-init",
                                              args)  # fmt: skip
                    result["wall_s"] = round(time.time() - t0, 1)
                    path.write_text(json.dumps(result, indent=1) + "\n")
                result = json.loads(path.read_text())
                top1 = float(result["metrics"]["top1"])
                print(f"{method:13s} fraction {fraction:<5} seed {seed}: top-1 {top1:.2f} "
                      f"({result['wall_s']} s)", flush=True)  # fmt: skip
                rows.setdefault((method, fraction), []).append(top1)
    lines = ["| method | " + " | ".join(f"{f:.0%} labels" for f in args.fractions) + " |",
             "|---|" + "---|" * len(args.fractions)]  # fmt: skip
    for method in ("pretrained", "random-init", "linear-probe"):
        cells = []
        for f in args.fractions:
            v = np.array(rows[(method, f)])
            cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
