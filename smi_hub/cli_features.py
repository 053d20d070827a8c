"""``smi-hub extract`` (also under torchrun) and ``export-features``: feature stores; each
command imports what it runs (start-up time)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smi_hub.cli_args import amp_dtype
from smi_hub.errors import SMIHubError


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
            amp_dtype=amp_dtype(args),
            progress=rank == 0,
            out=args.out,
            shard_size=args.shard_size,
            npy=args.npy,
            overwrite=args.overwrite,
            decode=args.decode,
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
