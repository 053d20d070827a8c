"""A feature store as plain numpy + parquet files, for tools that read those directly.

``export_store(store, out)`` writes::

    OUT/embeddings.npy               all rows, float32 N x D (numpy.load, mmap_mode="r")
    OUT/metadata.parquet             one row per embedding: id, input_index, path, label
    OUT/export.json                  what was exported (source store, rows, dim, sha256s)

and with ``shards=True`` also the layout of clip-retrieval / autofaiss (embedding-reader's
``parquet_npy`` format: files of one shard share a number, read in name order)::

    OUT/img_emb/img_emb_00000.npy    rows of store shard 0, float32
    OUT/metadata/metadata_00000.parquet

``datasets.load_dataset("parquet", data_files="OUT/metadata.parquet")`` reads the metadata;
``autofaiss build_index --embeddings OUT/img_emb`` the vectors. Rows keep the store's order
(input order, unreadable inputs left out); ``id`` is the row number, ``input_index`` the
input position. Memory is bounded by one shard. The folder is built aside and swapped in
whole; an existing folder is replaced only if it is an earlier export (``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from smi_hub.errors import SMIHubError
from smi_hub.feature_store import FeatureStore
from smi_hub.fileio import atomic_folder

MARKER = "export.json"
FORMAT = "smi-hub-feature-export"


def _metadata_table(ids: np.ndarray, index: np.ndarray, paths: list[Any], labels: Any) -> Any:
    """The parquet table of some rows: id, input_index, path (string), label (int or string,
    null where unknown; absent when the store has no labels)."""
    import pyarrow as pa

    columns = {
        "id": pa.array(ids, type=pa.int64()),
        "input_index": pa.array(index, type=pa.int64()),
        "path": pa.array([str(p) for p in paths], type=pa.string()),
    }
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    return pa.table(columns)


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise SMIHubError(f"{out} is a file; export into a new or empty folder.")
    if not (out / MARKER).is_file():
        raise SMIHubError(
            f"{out} is not empty and holds no {MARKER}: it was not written by export_store, so "
            "nothing in it is replaced. Choose a new or empty folder."
        )
    if not overwrite:
        raise SMIHubError(
            f"{out} holds an earlier export; pass overwrite=True (CLI: --overwrite) to replace it."
        )


def export_store(
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    shards: bool = False,
    normalize: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``store``'s rows as ``embeddings.npy`` + ``metadata.parquet`` (see the module
    docstring) into the folder ``out``; returns it.

    Args:
        store: a :class:`~smi_hub.FeatureStore` or its folder (pooled vectors; spatial maps
            are flattened to one vector per row).
        out: a new or empty folder, or an earlier export with ``overwrite``.
        shards: also write ``img_emb/`` + ``metadata/`` (one npy + parquet per store shard),
            the layout clip-retrieval and autofaiss read.
        normalize: L2-normalize the vectors (for inner-product / cosine indexes).
        overwrite: replace an earlier export in ``out`` (never a folder it did not write).
    """
    import pyarrow.parquet as pq

    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    labels = store.labels()
    paths = store.paths
    digest = hashlib.sha256()
    with atomic_folder(out) as tmp:
        array = np.lib.format.open_memmap(
            tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(len(store), store.dim)
        )
        tables = []
        if shards:
            (tmp / "img_emb").mkdir()
            (tmp / "metadata").mkdir()
        for k in range(store.num_shards):
            lo, hi = store.offsets[k], store.offsets[k + 1]
            if hi == lo:
                continue
            shard = store.shard(k)
            feats = shard["features"].float().reshape(hi - lo, -1).numpy()
            if normalize:
                feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            feats = np.ascontiguousarray(feats, dtype=np.float32)
            if not np.isfinite(feats).all():
                raise SMIHubError(
                    f"{store.folder} shard {k} holds non-finite values; extract again (a NaN "
                    "weight or input gives NaN rows, which no index can rank)."
                )
            array[lo:hi] = feats
            digest.update(feats.tobytes())
            table = _metadata_table(
                np.arange(lo, hi),
                shard["input_index"].numpy(),
                paths[lo:hi],
                labels[lo:hi].numpy() if labels is not None else None,
            )
            tables.append(table)
            if shards:
                np.save(tmp / "img_emb" / f"img_emb_{k:05d}.npy", feats)
                pq.write_table(table, tmp / "metadata" / f"metadata_{k:05d}.parquet")
        array.flush()
        del array
        if tables:
            import pyarrow as pa

            pq.write_table(pa.concat_tables(tables), tmp / "metadata.parquet")
        else:
            pq.write_table(
                _metadata_table(np.zeros(0), np.zeros(0), [], None), tmp / "metadata.parquet"
            )
        info = {
            "format": FORMAT,
            "format_version": 1,
            "source": str(store.folder),
            "model": store.manifest.get("model"),
            "layer": store.manifest.get("layer"),
            "rows": len(store),
            "dim": store.dim,
            "normalized": normalize,
            "shards": shards,
            "embeddings_sha256": digest.hexdigest(),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out
