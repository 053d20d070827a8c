"""Tables and plots of ``benchmarks/efficiency_study.py``'s ``results.json``.

    python benchmarks/efficiency_study.py --out benchmarks/results/efficiency --report \
        [--images-dir docs/images]

Writes ``report.md`` (the batch, width and sync tables) next to ``results.json`` and three PNGs
(``efficiency_batch.png``, ``efficiency_width.png``, ``efficiency_sync.png``). Cells run with
several seeds show the mean, and the half range over seeds after ``±``; their step time is the
fastest seed's (wall-clock depends on the machine's load, the fastest run the least).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LOSS_NAMES = {"smi": "SMI", "barlow_twins": "Barlow Twins", "vicreg": "VICReg"}
ACC = ("knn_top1", "linear_top1", "1shot_top1", "5shot_top1")


def grouped(cells: dict[str, dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Cells with the same settings (all but the seed) together."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells.values():
        out.setdefault((c["loss"], c["batch"], c["width"], c["sync"]), []).append(c)
    return out


def mean_spread(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), 0.0
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def fastest_step_ms(rows: list[dict[str, Any]]) -> float:
    """The step time of the least loaded seed: load only ever slows a run down."""
    return min(r["step_ms"] for r in rows)


def fmt(rows: list[dict[str, Any]], key: str, digits: int = 1) -> str:
    m, s = mean_spread(rows, key)
    if len(rows) > 1:
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    return f"{m:.{digits}f}"


def _shots(rows: list[dict[str, Any]], n: int) -> str:
    m, _ = mean_spread(rows, f"{n}shot_top1")
    s, _ = mean_spread(rows, f"{n}shot_top1_std")
    return f"{m:.1f} (±{s:.1f})"


def _acc_cells(rows: list[dict[str, Any]]) -> str:
    return f"{fmt(rows, 'knn_top1')} | {fmt(rows, 'linear_top1')} | {_shots(rows, 1)} | " + _shots(
        rows, 5
    )


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def bytes_reference_bt(width: int) -> int:
    """Bytes per step per process of the Barlow Twins reference's ``all_reduce`` of its D x D
    float32 cross-correlation (computed, not measured: our Barlow Twins gathers instead)."""
    return width * width * 4


def _table(title: str, header: str, rows: list[str]) -> list[str]:
    """A titled markdown table, or nothing for a table none of whose cells were run."""
    if not rows:
        return []
    return [f"\n{title}\n", header, "|---" * header.count(" | ") + "|---|", *rows]


def tables(results: dict[str, Any]) -> str:
    """The three markdown tables (and the random-init reference row)."""
    p = results["settings"]["preset"]
    g = grouped(results["cells"])
    seeds = sorted({c["seed"] for c in results["cells"].values()})
    head = (
        f"Budget per cell: {p.get('epochs', 1)} epoch(s) over {p['images']} Fashion-MNIST "
        "training images; "
        f"evaluation on {p['eval_train']} train / {p['eval_test']} test images; seeds "
        f"{', '.join(map(str, seeds))}; device {p['device']}.\n"
    )
    out = [head]
    rand = g.get(("none", 0, p["batch_width"], "single"))
    if rand:
        out.append(f"Random initialisation: k-NN {fmt(rand, 'knn_top1')}, linear "
                   f"{fmt(rand, 'linear_top1')}, 1-shot {_shots(rand, 1)}, 5-shot "
                   f"{_shots(rand, 5)}.\n")  # fmt: skip
    acc_head = "k-NN | linear | 1-shot (±sd over 5) | 5-shot (±sd over 5)"
    rows = []
    for b in sorted(p["batches"]):
        for loss in LOSS_NAMES:
            if cells := g.get((loss, b, p["batch_width"], "single")):
                step = fastest_step_ms(cells)
                rows.append(
                    f"| {b} | {LOSS_NAMES[loss]} | {cells[0]['steps']} | "
                    f"{cells[0]['peak_lr']:g} | {_acc_cells(cells)} | {step:.0f} | "
                    f"{step / b:.1f} | {mean_spread(cells, 'peak_rss_mb')[0]:.0f} |"
                )
    out += _table(f"**Batch size** (projector output {p['batch_width']}):",
                  f"| batch | loss | steps | peak lr | {acc_head} | step ms | ms/image | "
                  "peak RSS MB |", rows)  # fmt: skip
    rows = []
    for w in sorted(p["widths"]):
        for loss in LOSS_NAMES:
            if cells := g.get((loss, 256, w, "single")):
                rows.append(
                    f"| {w} | {LOSS_NAMES[loss]} | {cells[0]['num_params'] / 1e6:.2f} | "
                    f"{_acc_cells(cells)} | {fastest_step_ms(cells):.0f} | "
                    f"{mean_spread(cells, 'peak_rss_mb')[0]:.0f} |"
                )
    hidden = p["hidden"]
    shape = "W-W-W" if hidden is None else f"{hidden}-{hidden}-W"
    out += _table(f"**Projector width** W (projector {shape}, batch 256):",
                  f"| W | loss | parameters (M) | {acc_head} | step ms | peak RSS MB |",
                  rows)  # fmt: skip
    w, b = p["sync_width"], p["sync_batch"]
    rows = []
    for loss, sync in (("smi", "local"), ("smi", "gathered"), ("barlow_twins", "gathered"),
                       ("vicreg", "gathered")):  # fmt: skip
        if cells := g.get((loss, b, w, sync)):
            by = cells[0]["bytes_per_step"]
            where = "local batch" if sync == "local" else "gathered global batch"
            rows.append(
                f"| {LOSS_NAMES[loss]} | {where} | {_mib(by.get('loss', 0))} | "
                f"{_mib(by.get('ddp_grad', 0))} | {_acc_cells(cells)} | "
                f"{fastest_step_ms(cells):.0f} | "
                f"{mean_spread(cells, 'peak_rss_mb')[0]:.0f} |"
            )
    out += _table(
        f"**Synchronization** (2 processes, gloo, global batch {b} = 2 x {b // 2}, projector "
        f"output {w}); MiB each process hands to collectives per step:",
        f"| loss | loss computed on | loss MiB/step | DDP gradient MiB/step | {acc_head} "
        "| step ms | peak RSS MB |",
        rows,
    )
    if rows:
        out.append(
            f"\nBarlow Twins' reference all-reduces its D x D cross-correlation instead of "
            f"gathering the embeddings: {_mib(bytes_reference_bt(w))} MiB per step at D = {w}, "
            f"{_mib(bytes_reference_bt(8192))} MiB at D = 8192 (computed: D x D x 4 bytes)."
        )
    return "\n".join(out) + "\n"


def plots(results: dict[str, Any], images: Path) -> list[Path]:
    """accuracy vs batch, accuracy vs width, loss bytes vs accuracy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = results["settings"]["preset"]
    g = grouped(results["cells"])
    rand = g.get(("none", 0, p["batch_width"], "single"))
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xs, key_of, xlabel in (
        ("batch", sorted(p["batches"]), lambda loss, x: (loss, x, p["batch_width"], "single"),
         f"batch size (projector output {p['batch_width']})"),
        ("width", sorted(p["widths"]), lambda loss, x: (loss, 256, x, "single"),
         "projector output width (batch 256)"),
    ):  # fmt: skip
        if not any(key_of(loss, x) in g for loss in LOSS_NAMES for x in xs):
            continue  # a table none of whose cells were run has no plot
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, metric, title in zip(
            axes, ("knn_top1", "linear_top1"), ("k-NN", "linear"), strict=True
        ):
            for loss, label in LOSS_NAMES.items():
                pts = [(x, *mean_spread(g[key_of(loss, x)], metric)) for x in xs
                       if key_of(loss, x) in g]  # fmt: skip
                if pts:
                    x, m, s = zip(*pts, strict=True)
                    ax.errorbar(x, m, yerr=s, marker="o", ms=4, capsize=2, label=label)
            if rand:
                ax.axhline(mean_spread(rand, metric)[0], color="gray", ls="--", lw=1,
                           label="random init")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_title(f"{title} top-1 (%)", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = images / f"efficiency_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    synced = {k: rows for k, rows in g.items() if k[3] != "single" and k[0] != "none"}
    if not synced:
        return paths
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for (loss, _, _, sync), rows in synced.items():
        total = rows[0]["bytes_per_step"].get("loss", 0) + rows[0]["bytes_per_step"].get(
            "ddp_grad", 0
        )
        m, s = mean_spread(rows, "linear_top1")
        label = f"{LOSS_NAMES[loss]} ({sync})"
        ax.errorbar(total / 2**20, m, yerr=s, marker="o" if sync == "gathered" else "s",
                    capsize=2, ls="none", label=label)  # fmt: skip
    ax.set_xlabel("MiB per process per step (loss + DDP gradients)", fontsize=8)
    ax.set_ylabel("linear top-1 (%)", fontsize=8)
    ax.set_title(f"2 processes, global batch {p['sync_batch']}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = images / "efficiency_sync.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
    return paths


def write_report(out: Path, images: Path | None = None) -> Path:
    """``report.md`` and the plots of the results in ``out``."""
    results = json.loads((Path(out) / "results.json").read_text())
    path = Path(out) / "report.md"
    path.write_text(tables(results))
    for png in plots(results, Path(images) if images else Path(out)):
        print(png)
    print(path)
    return path
