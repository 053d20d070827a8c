"""The demo gallery's index: its embeddings under one model, reused from the cache while the
weights, config and files match (else computed and cached), its class labels and probe."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

import smi_hub
from smi_hub.errors import SMIHubError
from smi_hub.features import weights_digest
from smi_hub.gallery import label_of
from smi_hub.ood import PROFILE_QUERIES, neighbour_profile

CACHE_FORMAT = 1


class CachedIndex(NamedTuple):
    """A gallery's index, whether it came from the cache, and the files skipped (name, why)."""

    index: smi_hub.EmbeddingIndex
    cache_hit: bool
    skipped: list[tuple[str, str]]


def model_sha256(model: torch.nn.Module) -> str:
    """The weights' sha256: ``weights_sha256`` of the folder the model was loaded from, else
    the state dict's digest a feature store records (:func:`smi_hub.features.weights_digest`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("weights_sha256"):
        return str(cfg["weights_sha256"])
    return weights_digest(model)


def gallery_signature(gallery: Path, files: Sequence[Path]) -> str:
    """sha256 of the gallery's file list with sizes and modification times."""
    rows = []
    for p in files:
        st = p.stat() if p.exists() else p.lstat()  # a broken link is listed, and skipped
        rows.append([p.relative_to(gallery).as_posix(), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def class_label(path: Path, gallery: Path) -> str:
    """Class of a gallery image: its folder (Fashion-MNIST folders mapped back to class names);
    empty for images at the top of the gallery."""
    return "" if path.parent == gallery else label_of(path)


def cache_folder(cache_root: Path, model_key: str, gallery: Path) -> Path:
    """The cache entry of a model (its weights sha256 ``model_key``) and a gallery folder."""
    where = hashlib.sha256(str(gallery).encode()).hexdigest()[:12]
    return cache_root / f"{model_key[:16]}-{where}"


def cached_index(
    model: torch.nn.Module,
    model_key: str,
    gallery: Path,
    files: Sequence[Path],
    folder: Path,
    progress: bool,
) -> CachedIndex:
    """The gallery's embeddings from the cache ``folder`` when model and gallery files match,
    else computed (tqdm bar if ``progress``) and cached there."""
    signature = gallery_signature(gallery, files)
    config_digest = hashlib.sha256(
        json.dumps(getattr(model, "config", {}), sort_keys=True, default=str).encode()
    ).hexdigest()
    meta = {
        "cache_format": CACHE_FORMAT,
        "model_sha256": model_key,
        "model_config_sha256": config_digest,
        "gallery": str(gallery),
        "gallery_signature": signature,
        "layer": "pooled",
    }
    if (folder / "index.json").is_file():
        try:
            cached = smi_hub.EmbeddingIndex.load(folder)
            if {k: cached.metadata.get(k) for k in meta} == meta:
                skipped = [tuple(x) for x in cached.metadata.get("skipped", [])]
                return CachedIndex(cached, True, skipped)
        except SMIHubError:
            pass  # unreadable cache: rebuild it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped files: returned in skipped
        result = smi_hub.extract_features(model, [str(p) for p in files], progress=progress)
    skipped = [(Path(p).name, reason) for p, reason in result.failed]
    rel = [Path(p).relative_to(gallery).as_posix() for p in result.paths]
    index = smi_hub.EmbeddingIndex(metadata={**meta, "skipped": skipped})
    if len(rel):
        index.add(result.features, labels=rel)
        try:
            index.save(folder)
        except OSError as e:  # a read-only cache costs time, not the demo
            print(f"smi-hub demo: embeddings not cached ({e})", file=sys.stderr)
    return CachedIndex(index, False, skipped)


def gallery_profile(index: smi_hub.EmbeddingIndex) -> dict[str, Any]:
    """The gallery's own nearest-neighbour scores (:mod:`smi_hub.ood`) of a sample of its
    images (a flat index: its stored vectors)."""
    assert index.embeddings is not None
    ids = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))
    ids = ids[:PROFILE_QUERIES].sort().values
    return neighbour_profile(index, index.embeddings[ids], ids)


def class_probe(
    index: smi_hub.EmbeddingIndex, gallery: Path | None
) -> tuple[torch.nn.Linear, list[str]]:
    """A linear probe for Grad-CAM, the normalized mean embedding of each gallery class, and
    the classes (its outputs); ``gallery`` None: the labels are the index's paths."""
    assert index.embeddings is not None
    if gallery is not None:
        labels = [class_label(gallery / p, gallery) for p in index.labels]
    else:
        labels = [label_of(str(p)) for p in index.labels]
    classes = sorted(set(labels))
    rows = torch.tensor([classes.index(x) for x in labels])
    means = torch.zeros(len(classes), index.embeddings.shape[1])
    means.index_add_(0, rows, index.embeddings)
    probe = torch.nn.Linear(means.shape[1], len(classes), bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.nn.functional.normalize(means, dim=1))
    return probe.eval(), classes
