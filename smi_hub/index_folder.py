"""The index folder on disk: written as a whole by :meth:`~smi_hub.EmbeddingIndex.save`
(``index.json``, the vectors file, ``vectors.npy``), read and checked by ``load``."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from smi_hub.errors import SMIHubError
from smi_hub.fileio import recover_folder
from smi_hub.index_format import (
    EMBEDDINGS_NAME,
    FAISS_NAME,
    INDEX_FORMAT,
    INDEX_NAME,
    check_index_info,
    load_vectors,
    sha256_file,
)
from smi_hub.index_kinds import import_faiss
from smi_hub.index_vectors import check_finite
from smi_hub.mmap_tensors import mmap_tensor
from smi_hub.outputs import claim_output_dir, commit_folder
from smi_hub.refine import FLOAT_KINDS, VECTORS_NAME


def write_index_folder(index: Any, folder: str | os.PathLike, overwrite: bool) -> Path:
    """Write ``index``'s folder (see :meth:`~smi_hub.EmbeddingIndex.save`); returns it."""
    claim = claim_output_dir(folder, "index", overwrite)
    folder = claim.path
    with contextlib.ExitStack() as stack:
        stack.callback(claim.release)
        tmp = stack.enter_context(commit_folder(claim))
        if index.kind == "flat":
            assert index.embeddings is not None
            vec = index.embeddings.contiguous()
            if vec.shape[1] != (index.dim or 0):
                vec = torch.empty(0, index.dim or 0)
            name = EMBEDDINGS_NAME
            save_file({"embeddings": vec}, str(tmp / name))
        else:
            name = FAISS_NAME
            import_faiss().write_index(index._faiss, str(tmp / name))
        files = {name: sha256_file(tmp / name)}
        if index._vectors is not None:
            index._vectors.save(tmp / VECTORS_NAME)
            files[VECTORS_NAME] = sha256_file(tmp / VECTORS_NAME)
        info = {
            "format": "smi-hub-index",
            "format_version": INDEX_FORMAT,
            "kind": index.kind,
            "factory": index.factory,
            "dim": index.dim,
            "count": len(index),
            "metric": "cosine",
            "nprobe": index.nprobe,
            "ef_search": index.ef_search,
            "refine": index.refine if index._vectors is not None else 0,
            "files": files,
            "labels": index.labels,
            "metadata": index.metadata,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(info, indent=1) + "\n")
    return folder


def read_index_folder(
    make: Callable[..., Any], folder: str | os.PathLike, backend: str, mmap: bool
) -> Any:
    """The index ``make`` (the class) builds from a folder written by
    :func:`write_index_folder`, every file checked (see :meth:`~smi_hub.EmbeddingIndex.load`)."""
    folder = Path(folder)
    with contextlib.suppress(OSError):  # a swap killed between its renames
        recover_folder(folder)
    meta_path = folder / INDEX_NAME
    if not meta_path.is_file():
        raise SMIHubError(
            f"{folder} is not an index folder (needs {INDEX_NAME}); build one with "
            "`smi-hub index FOLDER -o INDEX_DIR` or EmbeddingIndex.save()."
        )
    try:
        info = json.loads(meta_path.read_text())
    except Exception as e:
        raise SMIHubError(f"{folder}: unreadable index ({type(e).__name__}: {e}).") from e
    kind, name = check_index_info(info, meta_path)
    path = folder / name
    if not path.is_file():
        raise SMIHubError(f"{folder} is not a complete index ({name} is missing); rebuild it.")
    if info["files"][name] != sha256_file(path):
        raise SMIHubError(
            f"{path}: sha256 differs from {INDEX_NAME}'s record; the index folder is "
            "damaged or mixed with another index's files. Rebuild it."
        )
    index = make(
        dim=info["dim"],
        backend=backend,
        metadata=info.get("metadata"),
        kind=kind,
        nprobe=info.get("nprobe"),
        ef_search=info.get("ef_search"),
        # an ivf / hnsw folder built with refine before it was refused for them: the
        # re-ranking changed nothing there, so its vectors.npy is not read
        refine=0 if kind in FLOAT_KINDS else info.get("refine", 0),
    )
    index.factory = info["factory"]
    index.labels = list(info["labels"])
    try:
        if kind == "flat":
            mapped = mmap_tensor(path, "embeddings") if mmap else None  # shared pages
            index.embeddings = (
                mapped if mapped is not None else load_file(str(path))["embeddings"].float()
            )
            check_finite(index.embeddings, f"vectors of {folder}")
            count = index.embeddings.shape
            ok = count == (info["count"], info["dim"] or 0)  # an empty index may have no dim
        else:
            faiss = import_faiss()
            flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
            index._faiss = faiss.read_index(str(path), flag)
            index._mapped = bool(mmap)
            index.embeddings = None
            ok = index._faiss.ntotal == info["count"] and index._faiss.d == info["dim"]
            if index.refine:
                index._vectors = load_vectors(folder, info, mmap)
                ok = ok and index._vectors.array.shape == (info["count"], info["dim"])
    except SMIHubError:
        raise
    except Exception as e:
        raise SMIHubError(f"{folder}: unreadable index ({type(e).__name__}: {e}).") from e
    if not ok or len(index.labels) != info["count"]:
        raise SMIHubError(f"{folder}: {INDEX_NAME} and {name} disagree; rebuild it.")
    return index
