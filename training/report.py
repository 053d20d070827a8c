"""One markdown table from the evaluation results of several models.

    python -m training.report "SMI=runs/fmnist_resnet18_smi/eval" \
        "random init=runs/random_init/eval" --out results_table.md

Each ``LABEL=FOLDER`` names a folder holding the ``knn.json``, ``linear.json`` and
``transfer.json`` written by ``python -m training.evaluate``; missing files give empty cells.
``--table transfer|fine_grained|semisup`` build the other tables of docs/results.md from the
same folders (``transfer_digits.json``, per-class ``linear.json``, ``semisup_<fraction>.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smi_hub.cli_format import ArgumentParser


def read_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{protocol: result JSON}`` for the protocols present in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of evaluation results.")
    out = {}
    for protocol in ("knn", "linear", "transfer"):
        path = folder / f"{protocol}.json"
        if path.is_file():
            out[protocol] = json.loads(path.read_text())
    return out


def shot_counts(results: list[dict[str, dict[str, Any]]]) -> list[str]:
    """Shot counts present in any transfer result, in increasing order (``all`` last)."""
    names = {
        key[: -len("shot_top1")]
        for r in results
        for key in r.get("transfer", {}).get("metrics", {})
        if key.endswith("shot_top1")
    }
    return sorted(names, key=lambda n: (n == "all", int(n) if n.isdigit() else 0))


def results_table(models: dict[str, str | Path]) -> str:
    """Markdown table: k-NN top-1, linear top-1, low-shot mean +- std per shot count."""
    results = {label: read_results(folder) for label, folder in models.items()}
    shots = shot_counts(list(results.values()))
    header = ["model", "k-NN top-1", "linear top-1"] + [f"{s}-shot top-1" for s in shots]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        row = [label]
        for protocol in ("knn", "linear"):
            top1 = r.get(protocol, {}).get("metrics", {}).get("top1")
            row.append("" if top1 is None else f"{top1:.1f}")
        metrics = r.get("transfer", {}).get("metrics", {})
        for s in shots:
            mean, std = metrics.get(f"{s}shot_top1"), metrics.get(f"{s}shot_top1_std")
            row.append("" if mean is None else f"{mean:.1f} ± {std:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


CONFUSABLE = ("T-shirt/top", "Pullover", "Coat", "Shirt")


def _read(folder: str | Path, name: str) -> dict[str, Any]:
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def transfer_table(models: dict[str, str | Path], name: str = "transfer_digits.json") -> str:
    """Transfer results (``evaluate transfer``): k-NN on all training images, then the linear
    probe per shot count as mean ± std over the sampling seeds."""
    results = {label: _read(folder, name) for label, folder in models.items()}
    shots = shot_counts([{"transfer": r} for r in results.values()])
    header = ["model", "k-NN top-1"] + [f"{s}-shot top-1" for s in shots]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        knn = r.get("knn", {}).get("top1")
        row = [label, "" if knn is None else f"{knn:.1f}"]
        for s in shots:
            mean, std = (
                r.get("metrics", {}).get(f"{s}shot_top1"),
                r.get("metrics", {}).get(f"{s}shot_top1_std"),
            )
            row.append("" if mean is None else f"{mean:.1f} ± {std:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def fine_grained_table(models: dict[str, str | Path], name: str = "linear.json") -> str:
    """Per-class top-1 of the confusable Fashion-MNIST classes and how often each of them is
    taken for another of them (rows of the confusion matrix, percent of the class)."""
    header = ["model", "overall top-1"] + [f"{c} top-1" for c in CONFUSABLE]
    header += ["confused within the four", "Shirt as T-shirt / Pullover / Coat"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, folder in models.items():
        r = _read(folder, name)
        pc = r.get("per_class")
        if not pc:
            lines.append(f"| {label} |" + " |" * (len(header) - 1))
            continue
        idx = [pc["classes"].index(c) for c in CONFUSABLE]
        cm = pc["confusion"]
        within = sum(cm[i][j] for i in idx for j in idx if i != j)
        total = sum(sum(cm[i]) for i in idx)
        shirt = idx[3]
        n_shirt = max(1, sum(cm[shirt]))
        as_other = " / ".join(f"{100 * cm[shirt][j] / n_shirt:.1f}" for j in idx[:3])
        row = [label, f"{r['metrics']['top1']:.1f}"]
        row += [f"{pc['top1'][i]:.1f}" for i in idx]
        row += [f"{100 * within / max(1, total):.1f} %", as_other]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def semisup_table(
    models: dict[str, str | Path], fractions: tuple[str, ...] = ("0.01", "0.1")
) -> str:
    """Semi-supervised fine-tuning top-1 / top-5 (``evaluate semisup``) per label fraction."""
    header = ["model"] + [f"{float(f) * 100:g} % labels top-1 / top-5" for f in fractions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, folder in models.items():
        row = [label]
        for f in fractions:
            m = _read(folder, f"semisup_{f}.json").get("metrics", {})
            row.append(f"{m['top1']:.1f} / {m['top5']:.1f}" if m else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


TABLES = {
    "main": results_table,
    "transfer": transfer_table,
    "fine_grained": fine_grained_table,
    "semisup": semisup_table,
}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=FOLDER of evaluation JSONs")
    parser.add_argument(
        "--table",
        choices=tuple(TABLES),
        default="main",
        help="main: knn/linear/transfer.json; transfer: transfer_digits.json; fine_grained: "
        "per-class linear.json; semisup: semisup_<fraction>.json",
    )
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    models = {}
    for item in args.models:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            parser.error(f"expected LABEL=FOLDER, got {item!r}")
        models[label] = folder
    for folder in models.values():
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of evaluation results.")
    table = TABLES[args.table](models)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
