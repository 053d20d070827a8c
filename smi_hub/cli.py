"""``smi-hub`` command line: list, info, extract, index, search, export, predict, serve,
demo, quickstart."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import smi_hub
from smi_hub.argtypes import count as _count
from smi_hub.argtypes import memory_size, printable, probability
from smi_hub.argtypes import port as _port
from smi_hub.argtypes import positive_int as _positive_int
from smi_hub.cli_format import ArgumentParser
from smi_hub.errors import SMIHubError


class UsageError(SMIHubError):
    """A command-line argument that cannot work (exit status 2, before any work is done)."""


def _refine(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be auto, 0 (off) or a k factor >= 1, got {text!r}")
    return value


def check_device(device: str) -> None:
    """``UsageError`` unless ``device`` names a device that exists here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"--device {device!r} is not a device name ({e}); use cpu, cuda, cuda:N or mps."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(
                f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                "False); use --device cpu, or install a CUDA build of PyTorch on a GPU machine."
            )
        if dev.index is not None and dev.index >= count:
            raise UsageError(
                f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to "
                f"cuda:{count - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: smi-hub runs on cpu, cuda or mps.")


OUTPUT_KINDS = {"extract": "features", "index": "index", "export": "weights"}


def check_output(path: str, flag: str, kind: str | None = None, overwrite: bool = False) -> None:
    """``UsageError`` unless an output folder can be created or replaced at ``path`` under the
    output policy of ``kind`` (``smi_hub.outputs``): checked before any work so that a bad
    ``-o`` does not throw away a long computation."""
    import tempfile

    from smi_hub.outputs import OutputFolderError, folder_mode, resolve_output

    if not path.strip():
        raise UsageError(f"{flag} is empty; give the folder to write, e.g. {flag} out/.")
    try:
        out = resolve_output(path, flag)
        if kind is not None and out.is_dir():
            folder_mode(out, kind, overwrite, flag)
    except OutputFolderError as e:
        raise UsageError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{flag} {out} exists and is not a folder; pick another path or remove the file."
        )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is a file, so no folder can be created there.")
    for where in [out] * out.is_dir() + [parent]:
        try:
            Path(tempfile.mkdtemp(dir=where, prefix=".smi-hub-write-test.")).rmdir()
        except OSError as e:
            raise UsageError(
                f"{flag} {out}: cannot write in {where} ({e.strerror or e}); pick a folder you "
                "can write to."
            ) from None


def check_args(args: argparse.Namespace) -> None:
    """Checks every argument that can be checked before the work starts (``UsageError``)."""
    for attr in ("input", "folder", "index_dir", "checkpoint", "model"):
        if getattr(args, attr, None) == "":
            raise UsageError(f"the {attr.upper()} argument is empty; give a path or name.")
    for attr in ("query", "images"):
        values = getattr(args, attr, None)
        if isinstance(values, list) and any(not v.strip() for v in values):
            raise UsageError(f"an {attr.upper()} argument is empty; give image paths.")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    for attr, flag in (("out", "-o/--out"), ("out_dir", "OUT_DIR")):
        if getattr(args, attr, None) is not None:
            kind = OUTPUT_KINDS.get(args.command)
            check_output(getattr(args, attr), flag, kind, getattr(args, "overwrite", False))


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="registry name, weights folder, Hugging Face repo id or URL "
        "(default: the embedded smi_resnet18_fmnist)",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=_count, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``smi-hub``."""
    parser = ArgumentParser(
        prog="smi-hub", description="SMI self-supervised models: weights, features, retrieval."
    )
    parser.add_argument("--version", action="version", version=f"smi-hub {smi_hub.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="registered models and their status")

    p = sub.add_parser("info", help="metadata of a registered model")
    p.add_argument("name", help="registry name (smi-hub list shows them)")

    p = sub.add_parser("extract", help="features of many images -> a sharded feature store")
    p.add_argument(
        "input",
        help="folder of images, one image, a list file (.txt, one path per line) or a dataset "
        "folder written by datasets' save_to_disk",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="feature store folder: new, empty or an earlier store (replaced as a whole)",
    )
    _model_arg(p)
    p.add_argument(
        "--layer",
        default="pooled",
        choices=["pooled", "spatial", "layer1", "layer2", "layer3", "layer4", "projector"],
        help="pooled backbone features, the last spatial map, a stage's map, or the projector "
        "embedding",
    )
    _run_args(p)
    p.add_argument("--shard-size", type=_positive_int, default=65536, help="inputs per shard")
    p.add_argument("--split", default=None, help="split of a DatasetDict input (e.g. train)")
    p.add_argument("--npy", action="store_true", help="also write features.npy into the store")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files (only smi-hub's own files are replaced)",
    )

    p = sub.add_parser("index", help="build a nearest-neighbour index of images or features")
    p.add_argument("folder", help="folder of images, or a feature store (smi-hub extract)")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="index folder: new, empty or an earlier index (replaced as a whole)",
    )
    _model_arg(p)
    _run_args(p)
    p.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "ivf", "ivfsq", "ivfpq", "hnsw"],
        help="auto: exact flat up to 100k vectors, else the IVF kind that fits --memory-budget",
    )
    p.add_argument(
        "--memory-budget", type=memory_size, default="2GB", help="memory for the vectors (auto)"
    )
    p.add_argument("--target-recall", type=probability, default=0.95, help="recall@10 to tune for")
    p.add_argument("--nprobe", type=_positive_int, default=None, help="IVF cells searched")
    p.add_argument("--ef-search", type=_positive_int, default=None, help="HNSW efSearch")
    p.add_argument(
        "--refine",
        type=_refine,
        default="auto",
        help="re-rank k x N candidates exactly on the float vectors, memory-mapped from the "
        "index folder (0: off; auto: N=8 when auto picks lossy codes and they fit --disk-budget)",
    )
    p.add_argument(
        "--disk-budget", type=memory_size, default="64GB", help="disk for the float vectors"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files (only smi-hub's own files are replaced)",
    )

    p = sub.add_parser("search", help="nearest neighbours of an image in an index")
    p.add_argument("index_dir", help="index folder (smi-hub index)")
    p.add_argument("query", nargs="+", help="query image(s)")
    p.add_argument("-k", type=_positive_int, default=5, help="neighbours per query")
    _model_arg(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument(
        "--nprobe", type=_positive_int, default=None, help="IVF cells searched (more: exacter)"
    )
    p.add_argument(
        "--ef-search", type=_positive_int, default=None, help="HNSW efSearch (more: exacter)"
    )

    p = sub.add_parser("export", help="training checkpoint -> weights folder")
    p.add_argument("checkpoint", help="training checkpoint (.pt) of python -m training.pretrain")
    p.add_argument("out_dir", help="weights folder to write (safetensors, config.json, card)")
    p.add_argument("--with-projector", action="store_true", help="keep projector.* tensors")
    p.add_argument("--name", help="model name for the model card (default: folder name)")
    p.add_argument("--results", nargs="+", default=[], help="extra evaluation result JSONs")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files (only smi-hub's own files are replaced)",
    )

    p = sub.add_parser(
        "export-features",
        help="feature store -> embeddings.npy + metadata.parquet (autofaiss, datasets, numpy)",
    )
    p.add_argument("store", help="feature store folder (smi-hub extract -o)")
    p.add_argument("--to", required=True, dest="out_dir", help="new or empty output folder")
    p.add_argument(
        "--shards", action="store_true", help="also img_emb/*.npy + metadata/*.parquet per shard"
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export there")

    p = sub.add_parser("predict", help="top classes of images with a fine-tuned classifier")
    p.add_argument("model", help="classifier weights folder (python -m training.finetune), repo id")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-k", "--top", type=_positive_int, default=5, help="classes to print per image")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument(
        "--index",
        default=None,
        help="index folder of the images the model should know: flags images unlike them "
        "(out of domain) with their nearest-neighbour percentile",
    )

    p = sub.add_parser("serve", help="JSON search API over an index folder (FastAPI + uvicorn)")
    p.add_argument("index_dir", help="index folder (smi-hub index)")
    p.add_argument(
        "--model", default=None, help="model that embeds queries (default: the index's own)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on")
    p.add_argument("--workers", type=_positive_int, default=1, help="server processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="query size limit")

    p = sub.add_parser("demo", help="start the Gradio demo (needs a source checkout)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model the page offers (registry name, weights folder, repo id or URL); repeat "
        "to offer several, the first is loaded (default: the embedded smi_resnet18_fmnist)",
    )
    p.add_argument(
        "--allow-any-model",
        action="store_true",
        help="let visitors load any folder, repo id or URL on this machine (off by default)",
    )
    p.add_argument("--gallery", default=None, help="folder of images (default: Fashion-MNIST)")
    p.add_argument("--index", default=None, help="index folder (smi-hub index) to search instead")
    p.add_argument("--port", type=_port, default=None, help="port (default: 7860 or the next free)")
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="query size limit")

    p = sub.add_parser(
        "quickstart", help="index the default gallery, search held-out images, report k-NN"
    )
    _model_arg(p)
    p.add_argument("--per-class", type=_positive_int, default=30, help="gallery images per class")
    p.add_argument("--queries", type=_count, default=3, help="queries to print")
    p.add_argument(
        "--eval", type=_positive_int, default=500, help="held-out images for k-NN accuracy"
    )
    p.add_argument("-k", type=_positive_int, default=5, help="neighbours per query")
    return parser


def _amp(args: argparse.Namespace) -> Any:
    import torch

    return torch.bfloat16 if getattr(args, "bf16", False) else None


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


def _extract_input(path: str, split: str | None) -> Any:
    """The ``extract`` input: a dataset folder (``save_to_disk``) is loaded, a DatasetDict
    split chosen; anything else goes to ``extract_features`` as a path."""
    folder = Path(path)
    if not any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):
        if split is not None:
            raise SMIHubError(f"--split is for dataset folders; {path} is not one.")
        return path
    import datasets

    ds = datasets.load_from_disk(path)
    if split is None:
        return ds  # a DatasetDict is refused by extract_features, naming its splits
    if not isinstance(ds, datasets.DatasetDict) or split not in ds:
        splits = sorted(ds) if isinstance(ds, datasets.DatasetDict) else "none (one dataset)"
        raise SMIHubError(f"{path} has no split {split!r}; its splits: {splits}.")
    return ds[split]


@contextlib.contextmanager
def _torchrun(device: str | None) -> Iterator[str | None]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on GPUs, else gloo),
    one GPU per local rank; yields the device to use."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    import datetime

    import torch
    import torch.distributed as dist

    cuda = device is not None and device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def cmd_extract(args: argparse.Namespace) -> int:
    import os

    from smi_hub.features import extract_features
    from smi_hub.registry import DEFAULT_MODEL

    data = _extract_input(args.input, args.split)
    rank = int(os.environ.get("RANK", "0"))
    with _torchrun(args.device) as device:
        store = extract_features(
            args.model or DEFAULT_MODEL,
            data,
            layer=args.layer,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=device,
            channels_last=args.channels_last,
            amp_dtype=_amp(args),
            progress=rank == 0,
            out=args.out,
            shard_size=args.shard_size,
            npy=args.npy,
            overwrite=args.overwrite,
        )
    if rank != 0:
        return 0
    skipped = f"; {len(store.failed)} unreadable input(s) skipped" if store.failed else ""
    print(
        f"{len(store)} feature rows {tuple(store.row_shape)} in {store.num_shards} shard(s) "
        f"-> {args.out}{skipped}"
    )
    if len(store) == 0:
        print(f"smi-hub extract: error: no input could be read ({skipped[2:]}).", file=sys.stderr)
        return 1
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from smi_hub.feature_store import MANIFEST, FeatureStore
    from smi_hub.features import extract_features
    from smi_hub.hub import load
    from smi_hub.index import EmbeddingIndex

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
            amp_dtype=_amp(args),
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


def cmd_export_features(args: argparse.Namespace) -> int:
    from smi_hub.store_export import export_store

    out = export_store(
        args.store,
        args.out_dir,
        shards=args.shards,
        normalize=args.normalize,
        overwrite=args.overwrite,
    )
    info = json.loads((out / "export.json").read_text())
    print(f"Exported {info['rows']} x {info['dim']} features of {args.store} -> {out}")
    print(f"  {out / 'embeddings.npy'}, {out / 'metadata.parquet'}")
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


def demo_app_path() -> Path:
    """``demo/app.py`` of the source checkout this package was imported from."""
    import smi_hub

    return Path(smi_hub.__file__).resolve().parents[1] / "demo" / "app.py"


def cmd_demo(args: argparse.Namespace) -> int:
    path = demo_app_path()
    if not path.is_file():
        raise SMIHubError(
            f"The demo needs a source checkout: {path} does not exist. Clone the smi-hub "
            "repository, `pip install -e '.[demo]'` in it, and run `smi-hub demo` there."
        )
    spec = importlib.util.spec_from_file_location("smi_hub_demo_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv: list[str] = []
    for model in args.model or []:
        argv += ["--model", model]
    for flag in ("gallery", "index", "port", "host", "max_pixels"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.allow_any_model:
        argv.append("--allow-any-model")
    return int(module.main(argv) or 0)


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from smi_hub import fashion_mnist
    from smi_hub.features import extract_features
    from smi_hub.gallery import default_gallery, gallery_indices, label_of
    from smi_hub.hub import load
    from smi_hub.index import EmbeddingIndex

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load(args.model)
    gallery = default_gallery(per_class=args.per_class)
    print(f"Gallery: {gallery} (Fashion-MNIST test split, {args.per_class} images per class)")
    result = extract_features(model, gallery, progress=False)
    index = EmbeddingIndex().add(result.features, labels=[label_of(p) for p in result.paths])
    print(f"Indexed {len(index)} images with {args.model or 'smi_resnet18_fmnist'}.")

    # Held-out queries: test images of each class not in the gallery.
    images, labels = fashion_mnist.load_arrays("test")
    per_class_eval = max(1, -(-args.eval // len(fashion_mnist.CLASSES)))
    held_out = gallery_indices(labels, per_class_eval, offset=args.per_class)[: args.eval]
    from PIL import Image

    pils = [Image.fromarray(images[i], mode="L") for i in held_out]
    q = extract_features(model, pils, progress=False)
    found = index.search(q.features, k=args.k)
    truth = [fashion_mnist.CLASSES[int(labels[i])] for i in held_out]
    step = max(1, len(held_out) // max(1, args.queries))
    for n, j in enumerate(range(0, len(held_out), step)):
        if n >= args.queries:
            break
        print(f"\nquery: test image {held_out[j]} ({truth[j]})")
        for rank, (s, lab) in enumerate(
            zip(found.scores[j].tolist(), found.labels[j], strict=True)
        ):
            mark = "ok" if lab == truth[j] else "  "
            print(f"  {rank + 1}. {s:.3f}  {lab:<12} {mark}")
    votes = [Counter(row).most_common(1)[0][0] for row in found.labels]
    acc = 100.0 * sum(v == t for v, t in zip(votes, truth, strict=True)) / len(truth)
    top1 = 100.0 * sum(r[0] == t for r, t in zip(found.labels, truth, strict=True)) / len(truth)
    print(
        f"\n{args.k}-NN majority-vote accuracy on {len(truth)} held-out Fashion-MNIST test "
        f"images: {acc:.1f}% (nearest neighbour: {top1:.1f}%; chance 10%). "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    return 0


COMMANDS = {
    "list": cmd_list,
    "info": cmd_info,
    "extract": cmd_extract,
    "index": cmd_index,
    "search": cmd_search,
    "export": cmd_export,
    "export-features": cmd_export_features,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smi-hub``; returns the exit status (2: bad arguments, checked before
    any work; 1: the work failed, with the reason)."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except UsageError as e:
        print(f"smi-hub {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except (SMIHubError, KeyError, OSError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"smi-hub {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
