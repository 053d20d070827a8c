"""``smi-hub list``, ``info`` and ``export``: the registry and weights folders; each command
imports what it runs (start-up time)."""

from __future__ import annotations

import argparse
import json


def cmd_list(args: argparse.Namespace) -> int:
    from smi_hub.registry import REGISTRY, list_models

    rows = [("name", "status", "dataset", "arch", "weights")]
    for name in list_models():
        e = REGISTRY[name]
        avail = "available" if e.available else "missing" if e.status == "embedded" else "-"
        rows.append((name, e.status, e.dataset, e.model_config["arch"], avail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from smi_hub.hub import entry_info
    from smi_hub.registry import get_entry

    print(json.dumps(entry_info(get_entry(args.name)), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from smi_hub.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        with_projector=args.with_projector,
        name=args.name,
        results_files=args.results,
        overwrite=args.overwrite,
    )
    cfg = json.loads((out / "config.json").read_text())
    print(f"Exported {args.checkpoint} -> {out}")
    print(f"  sha256 {cfg['weights_sha256']}  params {cfg['num_params']:,}")
    print(f"  results {cfg['results'] or '(none found)'}")
    return 0
