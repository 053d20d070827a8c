"""Cosine-similarity nearest-neighbour index over embeddings (torch, or faiss if asked).

Saved as a folder: ``embeddings.safetensors`` (the L2-normalized vectors) and ``index.json``
(labels, dimension, metadata). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from smi_hub.errors import SMIHubError

INDEX_FORMAT = 1
EMBEDDINGS_NAME = "embeddings.safetensors"
INDEX_NAME = "index.json"


class SearchResult(NamedTuple):
    """``scores`` (Q x k cosine similarities, descending), ``indices`` (Q x k rows of the
    index) and ``labels`` (Q lists of k labels: paths, class names or row numbers)."""

    scores: torch.Tensor
    indices: torch.Tensor
    labels: list[list[Any]]


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    if hasattr(x, "features") and isinstance(x.features, torch.Tensor):
        x = x.features  # a FeatureResult
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be N x D vectors, got shape {tuple(x.shape)}; pool spatial features "
            "first (extract_features(..., layer='pooled'))."
        )
    return x.detach().to("cpu", torch.float32)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


class EmbeddingIndex:
    """Exact cosine top-k search.

    Args:
        dim: vector dimension (taken from the first ``add`` when None).
        backend: ``torch`` (matrix product + top-k) or ``faiss`` (``IndexFlatIP`` on the
            normalized vectors; needs ``pip install faiss-cpu``). Both return the same results.
        metadata: free-form JSON-able information saved with the index (model name, layer...).
    """

    def __init__(
        self,
        dim: int | None = None,
        backend: str = "torch",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}.")
        self.dim = dim
        self.backend = backend
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.embeddings = torch.empty(0, dim or 0)
        self.labels: list[Any] = []
        self._faiss: Any = None
        if backend == "faiss":
            _import_faiss()

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(n={len(self)}, dim={self.dim}, backend={self.backend!r})"

    def add(self, embeddings: Any, labels: list[Any] | None = None) -> EmbeddingIndex:
        """Append N vectors (N x D tensor/array or a ``FeatureResult``) with optional labels
        (defaults: a FeatureResult's paths, else row numbers)."""
        if labels is None and hasattr(embeddings, "paths"):
            labels = list(embeddings.paths)
        x = _as_matrix(embeddings, "embeddings")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"This index holds {self.dim}-d vectors, got {x.shape[1]}-d.")
        if labels is None:
            labels = list(range(len(self), len(self) + x.shape[0]))
        labels = list(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} vectors but {len(labels)} labels.")
        x = _normalize(x)
        if self.embeddings.shape[1] != self.dim:  # still the placeholder of an empty index
            self.embeddings = torch.empty(0, self.dim)
        self.embeddings = torch.cat([self.embeddings, x])
        self.labels.extend(labels)
        if self._faiss is not None:
            self._faiss.add(x.numpy())
        return self

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            faiss = _import_faiss()
            self._faiss = faiss.IndexFlatIP(self.dim)
            if len(self):
                self._faiss.add(self.embeddings.numpy())
        return self._faiss

    def search(self, queries: Any, k: int = 5) -> SearchResult:
        """The ``k`` most cosine-similar stored vectors of each query (k is capped at len)."""
        if len(self) == 0:
            raise ValueError("The index is empty; add() embeddings first.")
        q = _normalize(_as_matrix(queries, "queries"))
        if q.shape[1] != self.dim:
            raise ValueError(f"This index holds {self.dim}-d vectors, queries are {q.shape[1]}-d.")
        k = max(1, min(int(k), len(self)))
        if self.backend == "faiss":
            scores_np, idx_np = self._faiss_index().search(q.numpy(), k)
            scores, indices = torch.from_numpy(scores_np), torch.from_numpy(idx_np).long()
        else:
            parts = [torch.topk(chunk @ self.embeddings.T, k, dim=1) for chunk in q.split(1024)]
            scores = torch.cat([p.values for p in parts])
            indices = torch.cat([p.indices for p in parts])
        labels = [[self.labels[j] for j in row] for row in indices.tolist()]
        return SearchResult(scores, indices, labels)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``embeddings.safetensors`` and ``index.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{EMBEDDINGS_NAME}.tmp"
        save_file({"embeddings": self.embeddings.contiguous()}, str(tmp))
        os.replace(tmp, folder / EMBEDDINGS_NAME)
        info = {
            "format": "smi-hub-index",
            "format_version": INDEX_FORMAT,
            "dim": self.dim,
            "count": len(self),
            "metric": "cosine",
            "labels": self.labels,
            "metadata": self.metadata,
        }
        tmp_json = folder / f".{INDEX_NAME}.tmp"
        tmp_json.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp_json, folder / INDEX_NAME)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str = "torch") -> EmbeddingIndex:
        """Read an index written by :meth:`save`."""
        folder = Path(folder)
        meta_path, emb_path = folder / INDEX_NAME, folder / EMBEDDINGS_NAME
        if not meta_path.is_file() or not emb_path.is_file():
            raise SMIHubError(
                f"{folder} is not an index folder (needs {INDEX_NAME} and {EMBEDDINGS_NAME}); "
                "build one with `smi-hub index FOLDER -o INDEX_DIR` or EmbeddingIndex.save()."
            )
        try:
            info = json.loads(meta_path.read_text())
            embeddings = load_file(str(emb_path))["embeddings"]
        except Exception as e:
            raise SMIHubError(f"{folder}: unreadable index ({type(e).__name__}: {e}).") from e
        if info.get("format") != "smi-hub-index" or info.get("format_version", 0) > INDEX_FORMAT:
            raise SMIHubError(
                f"{meta_path} is not an smi-hub index this version reads "
                f"(format {info.get('format')!r} version {info.get('format_version')!r})."
            )
        if embeddings.shape != (info["count"], info["dim"]) or len(info["labels"]) != info["count"]:
            raise SMIHubError(f"{folder}: {INDEX_NAME} and {EMBEDDINGS_NAME} disagree; rebuild it.")
        index = cls(dim=info["dim"], backend=backend, metadata=info.get("metadata"))
        index.embeddings = embeddings.float()
        index.labels = list(info["labels"])
        return index


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "backend='faiss' needs faiss: pip install faiss-cpu (or smi-hub[faiss]); the "
            "default backend='torch' gives the same results."
        ) from e
    return faiss
