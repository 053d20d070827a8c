"""``smi-hub index``, ``search``, ``predict`` and ``serve``: indexes and what answers from them;
each command imports what it runs (start-up time)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from smi_hub.argtypes import printable
from smi_hub.cli_args import amp_dtype
from smi_hub.errors import SMIHubError


def cmd_index(args: argparse.Namespace) -> int:
    from smi_hub.feature_store import FeatureStore
    from smi_hub.features import extract_features
    from smi_hub.hub import load
    from smi_hub.index import EmbeddingIndex
    from smi_hub.store_manifest import MANIFEST

    vectors: Any
    if (Path(args.folder) / MANIFEST).is_file():
        vectors = store = FeatureStore.open(args.folder)
        if len(store.row_shape) != 1:
            raise SMIHubError(
                f"{args.folder} holds {store.manifest.get('layer')} maps {store.row_shape}; index "
                "pooled features (smi-hub extract --layer pooled)."
            )
        labels, failed = [str(p) for p in store.paths], store.failed
        meta = {"model": store.manifest.get("model"), "layer": store.manifest.get("layer")}
    else:
        model = load(args.model, device=args.device)
        result = extract_features(
            model,
            args.folder,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            channels_last=args.channels_last,
            amp_dtype=amp_dtype(args),
        )
        vectors, labels, failed = result.features, [str(p) for p in result.paths], result.failed
        meta = {"model": args.model, "layer": "pooled"}
    if len(labels) == 0:
        shown = "; ".join(reason for _, reason in failed[:3])
        raise SMIHubError(f"no image in {args.folder} could be read ({shown}); nothing indexed.")
    meta["cwd"] = str(Path.cwd())  # relative gallery paths are relative to it (smi-hub serve)
    index = EmbeddingIndex.build(
        vectors,
        labels=labels,
        kind=args.kind,
        memory_budget=args.memory_budget,
        metadata=meta,
        target_recall=args.target_recall,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        refine=args.refine,
        disk_budget=args.disk_budget,
    )
    index.save(args.out, overwrite=args.overwrite)
    skipped = f"; {len(failed)} unreadable file(s) skipped" if failed else ""
    report = index.metadata["build"]
    how = report["factory"] + (f", refine k x {index.refine}" if index.refine else "")
    if "recall_at_10" in report:
        knob = "nprobe" if "nprobe" in report else "efSearch"
        how += (
            f", recall@10 {report['recall_at_10']:.3f} vs exact on {report['queries']} "
            f"held-out queries at {knob}={report[knob]}"
        )
    print(f"Indexed {len(index)} images ({index.dim}-d, {how}) -> {args.out}{skipped}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from smi_hub.features import extract_features
    from smi_hub.hub import load
    from smi_hub.index import EmbeddingIndex

    index = EmbeddingIndex.load(args.index_dir)
    model = load(args.model or index.metadata.get("model"), device=args.device)
    result = extract_features(model, list(args.query), progress=False)
    for path, reason in result.failed:
        print(f"{path}: skipped ({reason})", file=sys.stderr)
    if len(result) == 0:
        return 1
    found = index.search(result.features, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search)
    for q, scores, labels in zip(result.paths, found.scores, found.labels, strict=True):
        print(f"query: {printable(q)}")
        for rank, (s, label) in enumerate(zip(scores.tolist(), labels, strict=True), 1):
            print(f"  {rank:2d}. {s:.4f}  {printable(label)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from smi_hub.hub import load
    from smi_hub.images import load_image
    from smi_hub.transforms import get_transforms

    model = load(args.model, device=args.device)
    if not model.num_classes:
        raise SMIHubError(
            f"{args.model} has no classifier head (num_classes is 0): it gives features, not "
            "classes. Fine-tune it first: python -m training.finetune --model "
            f"{args.model} --data SOURCE --out DIR, then smi-hub predict DIR IMAGE..."
        )
    transform = get_transforms(model)
    device = next(model.parameters()).device
    service = None
    if args.index:
        from smi_hub.search_service import SearchService

        service = SearchService(args.index, device=args.device)
    status = 0
    for path in args.images:
        try:
            x = transform(load_image(path)).unsqueeze(0).to(device)
        except (SMIHubError, OSError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
            status = 1
            continue
        with torch.no_grad():
            probs = model(x).float().softmax(dim=1)[0]
        top = probs.topk(min(args.top, model.num_classes))
        print(printable(path))
        if service is not None:
            answer = service.search_vector(service.embed(load_image(path)), k=1)
            if answer["in_domain"] is False:
                print(
                    f"  OUT OF DOMAIN: unlike the images of {args.index} (top similarity "
                    f"{answer['top_score']:.3f}, percentile {answer['percentile']:.1f} of their "
                    "own nearest-neighbour scores); the classes below are not to be trusted"
                )
            elif answer["in_domain"]:
                print(f"  in domain (percentile {answer['percentile']:.1f})")
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {p:7.2%}  {printable(model.class_names[i])}")
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    try:
        from smi_hub.serve import run
    except ImportError as e:
        raise SMIHubError(
            f"smi-hub serve needs FastAPI and uvicorn ({e}): pip install 'smi-hub[serve]'."
        ) from e

    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.bind((args.host, args.port))
    except OSError as e:
        print(
            f"smi-hub serve: error: cannot listen on {args.host}:{args.port} "
            f"({e.strerror or e}); pick another --port or --host.",
            file=sys.stderr,
        )
        return 2
    print(f"Serving {args.index_dir} on http://{args.host}:{args.port}/v1/ (docs: /v1/docs)")
    run(
        args.index_dir,
        model=args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        device=args.device,
        max_pixels=args.max_pixels,
    )
    return 0
