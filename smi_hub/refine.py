"""Exact re-ranking of an approximate index's short list on the stored float vectors.

An ``EmbeddingIndex`` with ``refine=F`` (the *k factor*) asks its approximate index for
``k * F`` candidates, then scores those candidates exactly (float32 inner products of the
normalized vectors) and keeps the best ``k``, as faiss' ``IndexRefineFlat`` does. The float
vectors live in ``vectors.npy`` beside ``index.faiss`` and are memory-mapped on load, so only
the pages of the candidates a query touches come into memory: the compressed codes pay for
RAM, the vectors for disk.

``refine="auto"`` (the default) turns re-ranking on only for ``kind="auto"``, when the kind it
picked stores lossy codes (``ivfpq``, or ``ivfsq`` with 8-bit codes: the float vectors did
not fit the memory budget) and the float vectors (``4 * n * dim`` bytes) fit ``disk_budget``;
the k factor starts at :data:`DEFAULT_K_FACTOR` and :meth:`EmbeddingIndex.build` doubles it
(after tuning ``nprobe``) while recall@10 is below its target and still rising.

Kinds that keep the float vectors (:data:`FLOAT_KINDS`: ``flat``, ``ivf``, ``hnsw``) score
their candidates exactly already, so re-ranking them changes nothing: an explicit ``refine=N``
with such an explicit kind is refused (:func:`refine_conflict`), and with ``kind="auto"``
that picks one of them it is dropped with a warning naming the kind picked.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

VECTORS_NAME = "vectors.npy"
DEFAULT_K_FACTOR = 8
DEFAULT_DISK_BUDGET = 64 << 30
MAX_K_FACTOR = 1024
FLOAT_KINDS = {
    "flat": "searches exactly",
    "ivf": "scores its candidates on the float vectors already",
    "hnsw": "scores its candidates on the float vectors already (raise ef_search for recall)",
}  # kinds with nothing to re-rank, and why


def check_refine(refine: Any) -> int | str:
    """``"auto"``, or a k factor: an int >= 0 (0: no re-ranking); anything else is refused."""
    if refine is None:
        return 0
    if refine == "auto":
        return "auto"
    if isinstance(refine, bool) or not isinstance(refine, int | np.integer):
        raise ValueError(
            f"refine must be 'auto' or a whole number of candidates per result (k factor, e.g. "
            f"8; 0 turns re-ranking off), got {refine!r}."
        )
    if not 0 <= refine <= MAX_K_FACTOR:
        raise ValueError(
            f"refine (the k factor) must be between 0 (off) and {MAX_K_FACTOR}, got {refine}; "
            f"{DEFAULT_K_FACTOR} re-ranks 8 candidates per result."
        )
    return int(refine)


def refine_conflict(kind: str, refine: Any) -> str | None:
    """Why an explicit k factor ``refine`` (> 0) means nothing for an explicit ``kind``, or
    None (``auto`` kinds are resolved later: :func:`resolve_refine`)."""
    if kind not in FLOAT_KINDS or refine in (0, None, "auto"):
        return None
    return f"a k factor of {refine} has nothing to re-rank: kind {kind!r} {FLOAT_KINDS[kind]}"


def resolve_refine(
    refine: int | str, was_auto: bool, kind: str, factory: str, n: int, dim: int, disk_budget: int
) -> int:
    """The k factor an index of ``kind`` / ``factory`` uses (see the module docstring); a k
    factor asked for with ``kind="auto"`` that picked a :data:`FLOAT_KINDS` kind is dropped
    with a ``UserWarning``."""
    if kind in FLOAT_KINDS:
        if refine not in (0, "auto"):
            warnings.warn(
                f"refine={refine} dropped: kind='auto' picked {factory} for {n:,} vectors of "
                f"{dim} dimensions, which {FLOAT_KINDS[kind]}: re-ranking would change nothing, "
                "so no float vectors are saved for it. Pass refine='auto' or 0 (CLI: --refine "
                "auto) to build without this warning.",
                stacklevel=4,
            )
        return 0
    if refine != "auto":
        return int(refine)
    lossy = kind == "ivfpq" or factory.endswith("SQ8")
    return DEFAULT_K_FACTOR if was_auto and lossy and 4 * n * dim <= disk_budget else 0


def tune_k_factor(
    recall_of: Callable[[int], float], factor: int, recall: float, target: float
) -> tuple[int, float]:
    """Double the k factor while recall@10 (``recall_of(factor)``) is below ``target`` and
    still rising, up to 8 x :data:`DEFAULT_K_FACTOR`; the factor kept and its recall."""
    while recall < target and factor * 2 <= 8 * DEFAULT_K_FACTOR:
        r = recall_of(factor * 2)
        if r < recall + 0.002:
            break
        factor, recall = factor * 2, r
    return factor, recall


class RefineVectors:
    """The normalized float32 vectors of an index (N x D), memory-mapped or in memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @classmethod
    def empty(cls, n: int, dim: int) -> RefineVectors:
        """N x D vectors on a temporary, already unlinked file, to be filled by :meth:`write`
        (so that building never holds all of them in memory)."""
        return cls(np.memmap(tempfile.TemporaryFile(), np.float32, "w+", shape=(n, dim)))

    def write(self, start: int, rows: np.ndarray) -> None:
        self.array[start : start + len(rows)] = rows

    @staticmethod
    def extend(vectors: RefineVectors | None, rows: np.ndarray) -> RefineVectors:
        """``vectors`` (or none) followed by ``rows``, in memory (a mapped file cannot grow)."""
        old = [] if vectors is None else [np.asarray(vectors.array)]
        return RefineVectors(np.concatenate([*old, rows.astype(np.float32)]))

    def __len__(self) -> int:
        return self.array.shape[0]

    def rerank(
        self, queries: np.ndarray, candidates: np.ndarray, k: int, block: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of each query among its candidate rows (-1: none); Q x k scores
        (descending) and rows, -1 / -inf where fewer than ``k`` candidates exist."""
        q_all, c_all = queries.shape[0], candidates.shape[1]
        k = min(k, c_all)
        scores = np.full((q_all, k), -np.inf, np.float32)
        rows = np.full((q_all, k), -1, np.int64)
        for lo in range(0, q_all, block):
            cand = candidates[lo : lo + block]
            vecs = self.array[np.maximum(cand, 0).reshape(-1)].reshape(*cand.shape, -1)
            s = np.einsum("qcd,qd->qc", vecs, queries[lo : lo + block])
            s[cand < 0] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[lo : lo + block] = np.take_along_axis(s, top, 1)
            rows[lo : lo + block] = np.take_along_axis(cand, top, 1)
        rows[~np.isfinite(scores)] = -1
        return scores, rows

    def save(self, path: Path) -> None:
        """Write a ``.npy`` file, copied in blocks (never all rows in memory at once)."""
        out = np.lib.format.open_memmap(path, "w+", np.float32, self.array.shape)
        for lo in range(0, len(self), 65536):
            out[lo : lo + 65536] = self.array[lo : lo + 65536]
        out.flush()
        del out

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> RefineVectors:
        return cls(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
