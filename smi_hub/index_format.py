"""The index folder's record, ``index.json``: its format version, its files and their
sha256, and the check of every field on load. Nothing in an index folder is pickled."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from smi_hub.errors import SMIHubError
from smi_hub.index_kinds import KINDS
from smi_hub.refine import VECTORS_NAME, RefineVectors

INDEX_FORMAT = 2
EMBEDDINGS_NAME = "embeddings.safetensors"
FAISS_NAME = "index.faiss"
INDEX_NAME = "index.json"


def load_vectors(folder: Path, info: dict[str, Any], mmap: bool) -> RefineVectors:
    """The float vectors a refined index re-ranks on, checked against ``index.json``."""
    path = folder / VECTORS_NAME
    if not path.is_file() or info["files"].get(VECTORS_NAME) != sha256_file(path):
        raise SMIHubError(
            f"{path} is missing or its sha256 differs from {INDEX_NAME}'s record (this index "
            "re-ranks on it: refine); the index folder is damaged. Rebuild it."
        )
    return RefineVectors.load(path, mmap)


def _fail(meta_path: Path, field: str, problem: str) -> SMIHubError:
    return SMIHubError(
        f"{meta_path}: {field} {problem}; the file is damaged or was edited by hand. Rebuild the "
        "index with `smi-hub index FOLDER -o INDEX_DIR` (or EmbeddingIndex.save())."
    )


def check_index_info(info: Any, meta_path: Path) -> tuple[str, str]:
    """Check every field of an ``index.json`` (any format version: none switches a check off,
    and every version must record the sha256 of its vectors file); returns the kind and the
    vectors file name. Raises :class:`SMIHubError` naming the field."""
    if not isinstance(info, dict):
        raise _fail(meta_path, "the top level", f"is a JSON {type(info).__name__}, not an object")
    version = info.get("format_version")
    if info.get("format") != "smi-hub-index" or not (
        isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= INDEX_FORMAT
    ):
        raise SMIHubError(
            f"{meta_path} is not an smi-hub index this version reads (format "
            f"{info.get('format')!r} version {version!r}; this smi-hub reads versions 1 to "
            f"{INDEX_FORMAT})."
        )
    kind = info.get("kind")
    if kind not in KINDS or kind == "auto":
        raise _fail(meta_path, "kind", f"is {kind!r}, not one of {list(KINDS[:-1])}")
    count, dim = info.get("count"), info.get("dim")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise _fail(meta_path, "count", f"is {count!r}, not a number of vectors")
    if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1) and not (
        count == 0 and dim in (None, 0)
    ):
        raise _fail(meta_path, "dim", f"is {dim!r}, not a vector length >= 1")
    if not isinstance(info.get("labels"), list) or len(info["labels"]) != count:
        raise _fail(meta_path, "labels", f"is not a list of {count} labels: it and count disagree")
    if not isinstance(info.get("factory"), str):
        raise _fail(meta_path, "factory", f"is {info.get('factory')!r}, not a faiss factory string")
    for knob in ("nprobe", "ef_search"):
        value = info.get(knob)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 1):  # fmt: skip
            raise _fail(meta_path, knob, f"is {value!r}, not null or an integer >= 1")
    refine = info.get("refine", 0)
    if not (isinstance(refine, int) and not isinstance(refine, bool) and refine >= 0):
        raise _fail(meta_path, "refine", f"is {refine!r}, not an integer >= 0 (0: off)")
    if not isinstance(info.get("metadata", {}), dict | None):
        raise _fail(meta_path, "metadata", "is not an object")
    name = EMBEDDINGS_NAME if kind == "flat" else FAISS_NAME
    files = info.get("files")
    digest = files.get(name) if isinstance(files, dict) else None
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise _fail(
            meta_path, f"files[{name!r}]", "does not hold the sha256 of the vectors file, so "
            "they cannot be verified (every index version records one)",
        )  # fmt: skip
    return kind, name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
