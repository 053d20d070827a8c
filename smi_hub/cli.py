"""``smi-hub`` command line: list, info, extract, index, search, export, predict, serve,
demo, quickstart.

This module builds the parser and dispatches; the argument checks are in ``cli_args``, the
commands in ``cli_weights`` (list, info, export), ``cli_features`` (extract,
export-features), ``cli_search`` (index, search, predict, serve) and ``cli_demo`` (demo,
quickstart)."""

from __future__ import annotations

import argparse
import sys

import smi_hub
from smi_hub.argtypes import count as _count
from smi_hub.argtypes import memory_size, probability
from smi_hub.argtypes import port as _port
from smi_hub.argtypes import positive_int as _positive_int
from smi_hub.cli_args import UsageError, check_args
from smi_hub.cli_demo import cmd_demo, cmd_quickstart
from smi_hub.cli_features import cmd_export_features, cmd_extract
from smi_hub.cli_format import ArgumentParser
from smi_hub.cli_search import cmd_index, cmd_predict, cmd_search, cmd_serve
from smi_hub.cli_weights import cmd_export, cmd_info, cmd_list
from smi_hub.errors import SMIHubError


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
        "--decode",
        default="auto",
        choices=["auto", "cpu", "device"],
        help="where JPEG files are decoded: device (workers read the bytes, the batch is "
        "decoded and preprocessed on --device, nvjpeg on CUDA; other files on the CPU), cpu "
        "(in the workers), auto (device on CUDA)",
    )
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
        "index folder (0: off; auto: N=8 when auto picks lossy codes and they fit --disk-budget)."
        " Only compressed codes (ivfsq, ivfpq) are re-ranked: refused with --kind flat, ivf or "
        "hnsw (exact scores already); dropped with a warning when --kind auto picks one of them",
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
