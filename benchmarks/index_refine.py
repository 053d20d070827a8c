"""Refine: recall@10 and queries/s of an approximate index with and without exact re-ranking.

One index is built with ``EmbeddingIndex.build(..., refine=max(factors))`` (``nprobe`` tuned
with that refine), saved and loaded back (``index.faiss`` and ``vectors.npy`` memory-mapped),
then searched at each ``nprobe`` x k factor (0: no re-ranking, the approximate index alone).
Recall@10 is against exact float32 search; queries/s is the best of 3 batched searches of
all queries, single-threaded unless OMP_NUM_THREADS says otherwise.

Real features (a feature store: the last ``--queries`` rows are the queries, the rest the
index; both are real images):

    python benchmarks/index_refine.py --store STORE --out benchmarks/results/refine_fmnist10k.json

Clustered synthetic vectors (written shard by shard, fresh queries from the same clusters):

    python benchmarks/index_refine.py --vectors 200000 --dim 512 \\
        --out benchmarks/results/refine_200k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import ground_truth, measure, synthetic_data  # noqa: E402

from smi_hub import EmbeddingIndex, FeatureStore  # noqa: E402


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()  # a shared machine: the load beside the timings
    if args.store:
        store = FeatureStore.open(args.store)
        allv = store.to_tensor().reshape(len(store), -1).float()
        vectors, queries = allv[: -args.queries], allv[-args.queries :]
        data = f"real store {args.store}: {len(vectors)} indexed x {store.dim}, last {args.queries} rows as queries"
        truth = ground_truth(queries, [vectors])
    else:
        vectors, queries, data = synthetic_data(args, work)
        truth = ground_truth(queries, vectors)
    factors = [int(f) for f in args.factors.split(",")]
    t0 = time.perf_counter()
    built = EmbeddingIndex.build(
        vectors,
        kind=args.kind,
        memory_budget=args.memory_budget,
        refine=max(factors),
        labels=list(range(len(vectors))),
    )
    build_s = time.perf_counter() - t0
    report = built.metadata["build"]
    print(json.dumps(report), flush=True)
    built.save(work / "index")
    del built
    sizes = {p.name: p.stat().st_size for p in (work / "index").iterdir()}
    before = rss_mb()
    index = EmbeddingIndex.load(work / "index")
    nprobes = sorted({report.get("nprobe", 1), *(int(v) for v in args.nprobes.split(","))})
    rows = []
    for nprobe in nprobes:
        base_qps = None
        for f in factors:
            row = {"nprobe": nprobe, "k_factor": f}
            row |= measure(
                lambda q, n=nprobe, f=f: index.search(q, 10, nprobe=n, refine=f).indices,
                queries,
                truth,
            )
            base_qps = base_qps or row["queries_per_s"]
            row["qps_vs_no_refine"] = round(row["queries_per_s"] / base_qps, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {
        "benchmark": "index_refine",
        "data": data,
        "queries": int(queries.shape[0]),
        "kind": args.kind,
        "factory": report["factory"],
        "build": report,
        "build_s": round(build_s, 1),
        "files_bytes": sizes,
        "peak_rss_mb_before_load": before,
        "peak_rss_mb_after_searches": rss_mb(),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15_min": {"start": load_start, "end": os.getloadavg()},
        "machine": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| nprobe | k factor | recall@10 | queries/s | x no refine |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f = r["k_factor"] or "off"
        lines.append(
            f"| {r['nprobe']} | {f} | {r['recall_at_10']:.3f} | {r['queries_per_s']:,.0f} "
            f"| {r['qps_vs_no_refine']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="a real feature store (else synthetic vectors)")
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kind", default="ivfpq")
    p.add_argument("--memory-budget", default="2GB")
    p.add_argument("--factors", default="0,2,4,8,16", help="k factors (0: no re-ranking)")
    p.add_argument("--nprobes", default="4,16", help="nprobe values besides the tuned one")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "smi_index_refine"))
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = run(args)
    print(f"{result['factory']}, files {result['files_bytes']}\n{table(result)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
