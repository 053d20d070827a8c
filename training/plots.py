"""Training curves of one or more runs as a PNG: loss and the per-epoch collapse monitors.

    python -m training.plots runs/fmnist_resnet18_smi runs/fmnist_resnet18_barlow_twins \
        --out docs/images/fmnist_curves.png

Reads each run's ``metrics.jsonl``; needs matplotlib (in the ``dev`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smi_hub.cli_format import ArgumentParser

MONITORS = (
    ("projector_effective_rank", "projector effective rank (RankMe)"),
    ("projector_alignment", "alignment (lower: views closer)"),
    ("projector_uniformity", "uniformity (lower: more spread)"),
)


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``train`` rows and the ``epoch`` rows of a run's ``metrics.jsonl``.

    When the run was resumed, rows logged before the resume point and logged again after it
    appear twice; the later row wins.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in rows if r.get("type") == "train"}
    epochs = {r["epoch"]: r for r in rows if r.get("type") == "epoch"}
    return [train[k] for k in sorted(train)], [epochs[k] for k in sorted(epochs)]


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Write a PNG: the loss of each run (own axis, losses have different scales) on the top
    row, the collapse monitors of all runs per epoch on the bottom row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs.")
    data = [read_metrics(r) for r in run_dirs]
    cols = max(len(run_dirs), len(MONITORS))
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 5.6), squeeze=False)
    for ax, label, (train, _) in zip(axes[0], labels, data, strict=False):
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        ax.set_title(f"{label}: loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[0][len(run_dirs) :]:
        ax.axis("off")
    for ax, (key, title) in zip(axes[1], MONITORS, strict=False):
        for label, (_, epochs) in zip(labels, data, strict=True):
            pts = [(r["epoch"], r[key]) for r in epochs if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    axes[1][0].legend(fontsize=7)
    for ax in axes[1][len(MONITORS) :]:
        ax.axis("off")
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run")
    args = parser.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
