"""Cosine-similarity nearest-neighbour index: exact (torch or faiss) or approximate (faiss).

The kinds (``flat``, ``ivf``, ``ivfsq``, ``ivfpq``, ``hnsw``, ``auto``) and how ``auto`` picks
one from the vector count and a memory budget: :mod:`smi_hub.index_kinds`.

Approximate indexes are built from a :class:`~smi_hub.FeatureStore` (or a tensor) shard by
shard with :meth:`EmbeddingIndex.build` (:mod:`smi_hub.index_build`): trained on a sample,
vectors added in chunks, then the search knob (``nprobe`` / ``efSearch``) is tuned to a target
recall@10 against exact search on a held-out sample of queries, and that recall is recorded in
``metadata["build"]``.

Saved as a folder (:mod:`smi_hub.index_folder`), replaced as a whole
(``fileio.atomic_folder``): ``index.json`` (labels, kind, metadata, sha256 of every other file,
checked on load: :mod:`smi_hub.index_format`) and ``embeddings.safetensors`` (``flat``) or
``index.faiss`` (approximate kinds, memory-mapped on load), and ``vectors.npy`` when the index
re-ranks on the float vectors (``refine``, :mod:`smi_hub.refine`). Nothing is pickled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from smi_hub.argtypes import in_range, parse_bytes
from smi_hub.index_build import fill_index, vector_source
from smi_hub.index_folder import read_index_folder, write_index_folder
from smi_hub.index_kinds import (
    DEFAULT_BUDGET,
    KINDS,
    PQ_MIN_TRAIN,
    check_knob,
    factory_string,
    import_faiss,
    kind_of,
    warn_unused_knobs,
)
from smi_hub.index_vectors import as_matrix, check_finite, normalize
from smi_hub.refine import (
    DEFAULT_DISK_BUDGET,
    FLOAT_KINDS,
    RefineVectors,
    check_refine,
    refine_conflict,
    resolve_refine,
)


class SearchResult(NamedTuple):
    """``scores`` (Q x k cosine similarities, descending), ``indices`` (Q x k rows of the
    index; -1 where an approximate index found fewer than k) and ``labels`` (Q lists of k
    labels: paths, class names or row numbers; None for -1)."""

    scores: torch.Tensor
    indices: torch.Tensor
    labels: list[list[Any]]


class EmbeddingIndex:
    """Cosine top-k search, exact or approximate.

    Args:
        dim: vector dimension (taken from the first ``add`` when None).
        backend: for ``kind="flat"``: ``torch`` (matrix product + top-k) or ``faiss``
            (``IndexFlatIP``; ``pip install faiss-cpu``). Both return the same results.
            Approximate kinds always use faiss.
        metadata: free-form JSON-able information saved with the index (model name, layer...).
        kind: ``flat`` (default, exact), ``ivf``, ``ivfsq``, ``ivfpq``, ``hnsw`` or ``auto``
            (see the module docstring). Build approximate kinds with :meth:`build`.
        memory_budget: bytes (or ``"2GB"``) the vectors may take, for ``kind="auto"``.
        nprobe, ef_search: search-time knobs of IVF / HNSW kinds (more: slower, more exact);
            :meth:`build` tunes them to ``target_recall`` when not given.
        refine: re-rank ``k * refine`` approximate candidates exactly on the float vectors,
            memory-mapped from ``vectors.npy`` (0: off; ``"auto"``: see :mod:`smi_hub.refine`).
        disk_budget: bytes (or ``"64GB"``) the float vectors may take on disk, for
            ``refine="auto"``.
    """

    def __init__(
        self,
        dim: int | None = None,
        backend: str = "torch",
        metadata: dict[str, Any] | None = None,
        kind: str = "flat",
        memory_budget: int | str = DEFAULT_BUDGET,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | str | None = "auto",
        disk_budget: int | str = DEFAULT_DISK_BUDGET,
    ) -> None:
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}.")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}.")
        self.dim = dim
        self.kind = kind
        self.memory_budget = parse_bytes(memory_budget)
        self.factory = "Flat" if kind == "flat" else None
        self.backend = backend if kind in ("flat", "auto") else "faiss"  # auto: once resolved
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.embeddings: torch.Tensor | None = torch.empty(0, dim or 0)
        self.labels: list[Any] = []
        self.nprobe = check_knob(nprobe, "nprobe")
        self.ef_search = check_knob(ef_search, "ef_search")
        self.refine = check_refine(refine)
        conflict = refine_conflict(kind, self.refine)
        if conflict:
            raise ValueError(
                f"refine={refine}: {conflict}. Drop refine (or pass 0), or re-rank compressed "
                "codes: kind='ivfpq' or 'ivfsq'."
            )
        self.refine = 0 if kind in FLOAT_KINDS else self.refine
        self.disk_budget = parse_bytes(disk_budget)
        self._vectors: RefineVectors | None = None
        self._faiss: Any = None
        self._mapped = False  # a memory-mapped faiss index (read-only)
        if self.backend == "faiss":
            import_faiss()

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(n={len(self)}, dim={self.dim}, kind={self.kind!r}, "
            f"backend={self.backend!r})"
        )

    # ---- building ------------------------------------------------------------------------

    def _resolve(self, n: int) -> None:
        """Fix an ``auto`` kind and the factory string once the vector count is known."""
        if self.factory is None:
            assert self.dim is not None
            self.factory = factory_string(self.kind, n, self.dim, self.memory_budget)
            was_auto, self.kind = self.kind == "auto", kind_of(self.factory)
            self.refine = resolve_refine(
                self.refine, was_auto, self.kind, self.factory, n, self.dim, self.disk_budget
            )
            if self.kind == "flat":
                self.factory = "Flat"
            else:
                self.backend = "faiss"
                self.embeddings = None

    def _new_faiss(self) -> Any:
        faiss = import_faiss()
        index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.niter = 10  # k-means iterations: 10 is autofaiss' choice too
        return index

    def train(self, sample: Any) -> EmbeddingIndex:
        """Train an approximate index on a sample of the vectors (flat needs none)."""
        x = normalize(check_finite(as_matrix(sample, "sample"), "sample vectors"))
        if self.dim is None:
            self.dim = x.shape[1]
        self._resolve(x.shape[0])
        if self.kind == "flat":
            return self
        if self.kind == "ivfpq" and x.shape[0] < PQ_MIN_TRAIN:
            raise ValueError(
                f"kind='ivfpq' needs at least {PQ_MIN_TRAIN} training vectors (faiss trains 16 "
                f"centroids per PQ sub-space from 39 points each), got {x.shape[0]}; at this "
                "size an exact kind='flat' index is small and fast."
            )
        index = self._new_faiss()
        try:
            index.train(x.numpy())
        except RuntimeError as e:
            raise ValueError(
                f"Training a {self.factory} index on {x.shape[0]} vectors failed ({e}); give "
                "more vectors or use kind='flat'."
            ) from e
        self._faiss = index
        return self

    def add(self, embeddings: Any, labels: list[Any] | None = None) -> EmbeddingIndex:
        """Append N vectors (N x D tensor/array or a ``FeatureResult``) with optional labels
        (defaults: a FeatureResult's paths, else row numbers). An untrained approximate index
        is first trained on these vectors."""
        if labels is None and hasattr(embeddings, "paths"):
            labels = list(embeddings.paths)
        x = check_finite(as_matrix(embeddings, "embeddings"), "embeddings", len(self))
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"This index holds {self.dim}-d vectors, got {x.shape[1]}-d.")
        if labels is None:
            labels = list(range(len(self), len(self) + x.shape[0]))
        labels = list(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} vectors but {len(labels)} labels.")
        self._resolve(x.shape[0])
        x = normalize(x)
        if self.kind == "flat":
            assert self.embeddings is not None
            if self.embeddings.shape[1] != self.dim:  # still the placeholder of an empty index
                self.embeddings = torch.empty(0, self.dim)
            self.embeddings = torch.cat([self.embeddings, x])
            if self._faiss is not None:
                self._faiss.add(x.numpy())
        else:
            if self._faiss is None:
                self.train(x)
            elif self._mapped:  # faiss cannot grow a memory-mapped index: copy it into memory
                faiss = import_faiss()
                self._faiss = faiss.deserialize_index(faiss.serialize_index(self._faiss))
                self._mapped = False
            self._faiss.add(x.numpy())
            if self.refine:
                self._vectors = RefineVectors.extend(self._vectors, x.numpy())
        self.labels.extend(labels)
        return self

    @classmethod
    def build(
        cls,
        vectors: Any,
        labels: list[Any] | None = None,
        kind: str = "auto",
        memory_budget: int | str = DEFAULT_BUDGET,
        metadata: dict[str, Any] | None = None,
        train_size: int | None = None,
        queries: int = 256,
        target_recall: float = 0.95,
        nprobe: int | None = None,
        ef_search: int | None = None,
        chunk_size: int = 65536,
        seed: int = 0,
        refine: int | str | None = "auto",
        disk_budget: int | str = DEFAULT_DISK_BUDGET,
        progress: bool | None = None,
    ) -> EmbeddingIndex:
        """Build an index from a :class:`~smi_hub.FeatureStore` (read shard by shard, never
        all at once) or an N x D tensor.

        Approximate kinds are trained on ``train_size`` rows sampled evenly at random (default
        ``64 * nlist``, at least 10 000), vectors are added in chunks, then ``queries`` rows
        that were not in the training sample are searched exactly and approximately: the
        smallest ``nprobe`` / ``efSearch`` reaching ``target_recall`` (recall@10; or where
        doubling it stops helping) is kept unless given, and the build report (kind, factory,
        recall@10, knob, times) is stored in ``metadata["build"]``. Labels default to a
        store's paths, else row numbers. ``progress``: a progress bar on stderr (None: from
        :data:`~smi_hub.index_build.PROGRESS_MIN` vectors on).
        """
        in_range(target_recall, "target_recall", 0.0, 1.0)
        in_range(queries, "queries", 0, integer=True)
        in_range(chunk_size, "chunk_size", 1, integer=True)
        check_knob(train_size, "train_size")
        check_knob(nprobe, "nprobe")
        check_knob(ef_search, "ef_search")
        t0 = time.perf_counter()
        source = vector_source(vectors, labels, chunk_size)
        index = cls(
            dim=source.dim,
            metadata=metadata,
            kind=kind,
            memory_budget=memory_budget,
            nprobe=nprobe,
            ef_search=ef_search,
            refine=refine,
            disk_budget=disk_budget,
        )
        index._resolve(source.n)
        if index.refine:  # the float vectors, on a temporary file until saved
            index._vectors = RefineVectors.empty(source.n, source.dim)
        warn_unused_knobs(index.kind, nprobe, ef_search)
        fill_index(
            index,
            source,
            train_size=train_size,
            queries=queries,
            target_recall=target_recall,
            nprobe=nprobe,
            ef_search=ef_search,
            seed=seed,
            refine=refine,
            progress=progress,
            t0=t0,
        )
        return index

    # ---- searching -----------------------------------------------------------------------

    def _set_knob(self, name: str, value: int) -> None:
        faiss = import_faiss()
        faiss.ParameterSpace().set_index_parameter(self._faiss, name, int(value))

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            faiss = import_faiss()
            self._faiss = faiss.IndexFlatIP(self.dim)
            if len(self):
                assert self.embeddings is not None
                self._faiss.add(self.embeddings.numpy())
        return self._faiss

    def search(
        self,
        queries: Any,
        k: int = 5,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> SearchResult:
        """The ``k`` most cosine-similar stored vectors of each query (k is capped at len).
        ``nprobe`` / ``ef_search`` / ``refine`` (0: off) override the index's knobs for this
        call."""
        if len(self) == 0:
            raise ValueError("The index is empty; add() embeddings first.")
        q = normalize(check_finite(as_matrix(queries, "queries"), "queries", zero=True))
        nprobe, ef_search = check_knob(nprobe, "nprobe"), check_knob(ef_search, "ef_search")
        if q.shape[1] != self.dim:
            raise ValueError(f"This index holds {self.dim}-d vectors, queries are {q.shape[1]}-d.")
        k = max(1, min(int(k), len(self)))
        refine = None if refine is None else check_refine(refine)
        warn_unused_knobs(self.kind, nprobe, ef_search, refine)
        if self.kind in FLOAT_KINDS:
            refine = 0
        if self.kind == "flat" and self.backend == "torch":
            assert self.embeddings is not None
            step = max(1, min(1024, (1 << 26) // len(self)))  # score blocks of <= 256 MB
            parts = [torch.topk(chunk @ self.embeddings.T, k, dim=1) for chunk in q.split(step)]
            scores = torch.cat([p.values for p in parts])
            indices = torch.cat([p.indices for p in parts])
        else:
            index = self._faiss_index()
            if self.kind in ("ivf", "ivfsq", "ivfpq") and (nprobe or self.nprobe):
                self._set_knob("nprobe", nprobe or self.nprobe)
            if self.kind == "hnsw" and (ef_search or self.ef_search):
                self._set_knob("efSearch", max(k, ef_search or self.ef_search))
            factor = self.refine if refine is None else refine
            if factor == "auto":
                raise ValueError("search(refine=...) takes a k factor (0: off), not 'auto'.")
            if factor and self._vectors is None:
                raise ValueError(
                    "This index stores no float vectors to refine on; build it "
                    "with refine=N (a k factor) or search with refine=0."
                )
            fetch = min(len(self), k * factor) if factor else k
            scores_np, idx_np = index.search(q.numpy(), fetch)
            if factor:
                assert self._vectors is not None
                scores_np, idx_np = self._vectors.rerank(q.numpy(), idx_np, k)
            scores, indices = torch.from_numpy(scores_np), torch.from_numpy(idx_np).long()
        labels = [[self.labels[j] if j >= 0 else None for j in row] for row in indices.tolist()]
        return SearchResult(scores, indices, labels)

    # ---- saving --------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index folder: ``index.json`` (with the sha256 of the vectors file) and
        ``embeddings.safetensors`` or ``index.faiss``. An earlier index there is replaced as a
        whole; a folder with other files is refused unless ``overwrite`` (then only the index
        files are replaced; see ``smi_hub.outputs``). Returns the folder written."""
        return write_index_folder(self, folder, overwrite)

    @classmethod
    def load(
        cls, folder: str | os.PathLike, backend: str = "torch", mmap: bool = True
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`; the vectors file must match the sha256 in
        ``index.json``. Indexes are memory-mapped unless ``mmap=False`` (approximate ones are
        read into memory by a later :meth:`add`)."""
        return read_index_folder(cls, folder, backend, mmap)
