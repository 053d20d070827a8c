"""One markdown table from the evaluation results of several models.

    python -m training.report "SMI=runs/fmnist_resnet18_smi/eval" \
        "random init=runs/random_init/eval" --out results_table.md

Each ``LABEL=FOLDER`` names a folder holding the ``knn.json``, ``linear.json`` and
``transfer.json`` written by ``python -m training.evaluate``; missing files give empty cells.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=FOLDER of evaluation JSONs")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    models = {}
    for item in args.models:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            parser.error(f"expected LABEL=FOLDER, got {item!r}")
        models[label] = folder
    table = results_table(models)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
