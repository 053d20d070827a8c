"""Cosine-similarity nearest-neighbour index: exact (torch or faiss) or approximate (faiss).

The kinds (``flat``, ``ivf``, ``ivfsq``, ``ivfpq``, ``hnsw``, ``auto``) and how ``auto`` picks
one from the vector count and a memory budget: :mod:`smi_hub.index_kinds`.

Approximate indexes are built from a :class:`~smi_hub.FeatureStore` (or a tensor) shard by
shard with :meth:`EmbeddingIndex.build`: trained on a sample, vectors added in chunks, then
the search knob (``nprobe`` / ``efSearch``) is tuned to a target recall@10 against exact search
on a held-out sample of queries, and that recall is recorded in ``metadata["build"]``.

Saved as a folder, replaced as a whole (``fileio.atomic_folder``): ``index.json`` (labels,
kind, metadata, sha256 of every other file, checked on load: :mod:`smi_hub.index_format`) and
``embeddings.safetensors`` (``flat``) or ``index.faiss`` (approximate kinds, memory-mapped on
load), and ``vectors.npy`` when the index re-ranks on the float vectors (``refine``,
:mod:`smi_hub.refine`). Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from smi_hub.argtypes import in_range, parse_bytes
from smi_hub.errors import SMIHubError
from smi_hub.feature_store import FeatureStore
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
from smi_hub.index_kinds import (
    DEFAULT_BUDGET,
    KINDS,
    KNOBS,
    PQ_MIN_TRAIN,
    check_knob,
    factory_string,
    kind_of,
    nlist,
    shortfall_reason,
    warn_unused_knobs,
)
from smi_hub.index_vectors import as_matrix, check_finite, exact_topk, normalize, recall_at_k
from smi_hub.mmap_tensors import mmap_tensor
from smi_hub.ood import PROFILE_QUERIES, neighbour_profile
from smi_hub.outputs import claim_output_dir, commit_folder
from smi_hub.plan import print_plan
from smi_hub.refine import (
    DEFAULT_DISK_BUDGET,
    FLOAT_KINDS,
    VECTORS_NAME,
    RefineVectors,
    check_refine,
    refine_conflict,
    resolve_refine,
    tune_k_factor,
)

PROGRESS_MIN = 50_000  # build(progress=None): a progress bar from this many vectors on


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
            _import_faiss()

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
        faiss = _import_faiss()
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
                faiss = _import_faiss()
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
        doubling it stops helping) is kept unless given, and the build report (kind, factory, recall@10, knob, times) is stored
        in ``metadata["build"]``. Labels default to a store's paths, else row numbers.
        ``progress``: a progress bar on stderr (None: from :data:`PROGRESS_MIN` vectors on).
        """
        in_range(target_recall, "target_recall", 0.0, 1.0)
        in_range(queries, "queries", 0, integer=True)
        in_range(chunk_size, "chunk_size", 1, integer=True)
        check_knob(train_size, "train_size")
        check_knob(nprobe, "nprobe")
        check_knob(ef_search, "ef_search")
        t0 = time.perf_counter()
        if isinstance(vectors, FeatureStore):
            store = vectors
            n, dim = len(store), store.dim
            if labels is None:
                labels = list(store.paths)

            def chunks() -> Iterator[torch.Tensor]:
                for k, part in enumerate(store):
                    if part.shape[0]:
                        part = part.reshape(part.shape[0], -1).float()
                        yield normalize(check_finite(part, "stored rows", store.offsets[k]))

            def rows(ids: torch.Tensor) -> torch.Tensor:
                out = torch.empty(len(ids), dim)
                pos = 0
                for k in range(store.num_shards):
                    lo, hi = store.offsets[k], store.offsets[k + 1]
                    sel = ids[(ids >= lo) & (ids < hi)]
                    if len(sel):
                        feats = store.shard(k)["features"].reshape(hi - lo, -1)
                        out[pos : pos + len(sel)] = feats[sel - lo]
                        pos += len(sel)
                return normalize(check_finite(out, "stored rows", ids=ids))

        else:
            matrix = check_finite(as_matrix(vectors, "vectors"), "vectors")
            if labels is None and hasattr(vectors, "paths"):
                labels = list(vectors.paths)
            n, dim = matrix.shape

            def chunks() -> Iterator[torch.Tensor]:
                for i in range(0, n, chunk_size):
                    yield normalize(matrix[i : i + chunk_size])

            def rows(ids: torch.Tensor) -> torch.Tensor:
                return normalize(matrix[ids])

        if n == 0:
            raise ValueError("No vectors to index.")
        labels = list(range(n)) if labels is None else list(labels)
        if len(labels) != n:
            raise ValueError(f"{n} vectors but {len(labels)} labels.")
        index = cls(
            dim=dim,
            metadata=metadata,
            kind=kind,
            memory_budget=memory_budget,
            nprobe=nprobe,
            ef_search=ef_search,
            refine=refine,
            disk_budget=disk_budget,
        )
        index._resolve(n)
        if index.refine:  # the float vectors, on a temporary file until saved
            index._vectors = RefineVectors.empty(n, dim)
        warn_unused_knobs(index.kind, nprobe, ef_search)
        bar = tqdm(
            total=n, desc=f"index {index.factory}", unit="vec", unit_scale=True,
            disable=not (progress if progress is not None else n >= PROGRESS_MIN),
        )  # fmt: skip
        if not bar.disable:
            print_plan(
                f"index {n:,} vectors of {dim} dimensions as {index.factory}"
                + ("" if index.kind == "flat" else f", then tune on {queries} held-out queries"),
                None,
                "the progress bar below shows the rate and time left",
            )
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        t_train = 0.0
        train_ids = torch.empty(0, dtype=torch.long)
        if index.kind != "flat":  # HNSW needs no training: a token sample creates it
            want = train_size or (1000 if index.kind == "hnsw" else max(10_000, 64 * nlist(n)))
            train_ids = perm[: min(n, want)].sort().values
            t1 = time.perf_counter()
            bar.set_postfix_str(f"training on {len(train_ids)} vectors")
            index.train(rows(train_ids))
            bar.set_postfix_str("adding")
            t_train = time.perf_counter() - t1
        if index.kind == "flat":
            index.embeddings = torch.empty(n, dim)  # filled in place: no growing copies
        pos = 0
        for part in chunks():
            if index.kind == "flat":
                index.embeddings[pos : pos + part.shape[0]] = part
            else:
                index._faiss.add(part.numpy())
                if index._vectors is not None:
                    index._vectors.write(pos, part.numpy())
            pos += part.shape[0]
            bar.update(part.shape[0])
        index.labels = labels
        t_built = time.perf_counter() - t0
        report: dict[str, Any] = {
            "kind": index.kind,
            "factory": index.factory,
            "vectors": n,
            "train_vectors": int(len(train_ids)),
            "refine": index.refine,
            "train_s": round(t_train, 3),
            "build_s": round(t_built, 3),
        }
        if index.kind != "flat" and queries > 0:
            rest = perm[len(train_ids) :] if len(train_ids) < n else perm
            q = rows(rest[:queries].sort().values)
            k = min(10, n)
            _, truth = exact_topk(q, chunks(), k)
            knob = "efSearch" if index.kind == "hnsw" else "nprobe"
            bar.set_postfix_str(f"tuning {knob} on {q.shape[0]} queries")
            given = ef_search if index.kind == "hnsw" else nprobe
            limit = 4096 if index.kind == "hnsw" else nlist(n)
            low = 16 if index.kind == "hnsw" else 1  # faiss' HNSW uses max(efSearch, k) anyway
            candidates = [given] if given else [v for v in KNOBS if low <= v <= limit] or [1]
            value, recall = candidates[0], -1.0
            for v in candidates:  # smallest knob reaching the target, or where recall plateaus
                index._set_knob(knob, v)
                r = recall_at_k(index.search(q, k=k).indices, truth)
                if r < recall + 0.002:
                    break
                value, recall = v, r
                if r >= target_recall:
                    break
            index._set_knob(knob, value)
            if refine == "auto" and index.refine:  # a k factor auto chose: tune it too
                index.refine, recall = tune_k_factor(
                    lambda f: recall_at_k(index.search(q, k=k, refine=f).indices, truth),
                    index.refine,
                    recall,
                    target_recall,
                )
                report["refine"] = index.refine
            if index.kind == "hnsw":
                index.ef_search = value
            else:
                index.nprobe = value
            report.update(
                {"queries": int(q.shape[0]), "recall_at_10": round(recall, 4), knob: value}
            )
            if recall < target_recall:
                why = shortfall_reason(
                    index.kind, index.factory, n, dim, index.memory_budget, index.refine,
                    knob, value, bool(given),
                )  # fmt: skip
                refined = f" re-ranking k x {index.refine}" if index.refine else ""
                warnings.warn(
                    f"recall@10 {recall:.3f} on {q.shape[0]} held-out queries is below "
                    f"target_recall {target_recall} for {index.factory}{refined} {why}.",
                    stacklevel=2,
                )
        bar.close()
        index.metadata["build"] = report
        # the gallery's own nearest-neighbour scores, for the out-of-domain signal (smi_hub.ood)
        profile_ids = perm[-min(n, PROFILE_QUERIES) :].sort().values
        index.metadata["neighbour_profile"] = neighbour_profile(
            index, rows(profile_ids), profile_ids
        )
        return index

    # ---- searching -----------------------------------------------------------------------

    def _set_knob(self, name: str, value: int) -> None:
        faiss = _import_faiss()
        faiss.ParameterSpace().set_index_parameter(self._faiss, name, int(value))

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            faiss = _import_faiss()
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
        claim = claim_output_dir(folder, "index", overwrite)
        folder = claim.path
        with contextlib.ExitStack() as stack:
            stack.callback(claim.release)
            tmp = stack.enter_context(commit_folder(claim))
            if self.kind == "flat":
                assert self.embeddings is not None
                vec = self.embeddings.contiguous()
                if vec.shape[1] != (self.dim or 0):
                    vec = torch.empty(0, self.dim or 0)
                name = EMBEDDINGS_NAME
                save_file({"embeddings": vec}, str(tmp / name))
            else:
                name = FAISS_NAME
                _import_faiss().write_index(self._faiss, str(tmp / name))
            files = {name: sha256_file(tmp / name)}
            if self._vectors is not None:
                self._vectors.save(tmp / VECTORS_NAME)
                files[VECTORS_NAME] = sha256_file(tmp / VECTORS_NAME)
            info = {
                "format": "smi-hub-index",
                "format_version": INDEX_FORMAT,
                "kind": self.kind,
                "factory": self.factory,
                "dim": self.dim,
                "count": len(self),
                "metric": "cosine",
                "nprobe": self.nprobe,
                "ef_search": self.ef_search,
                "refine": self.refine if self._vectors is not None else 0,
                "files": files,
                "labels": self.labels,
                "metadata": self.metadata,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(info, indent=1) + "\n")
        return folder

    @classmethod
    def load(
        cls, folder: str | os.PathLike, backend: str = "torch", mmap: bool = True
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`; the vectors file must match the sha256 in
        ``index.json``. Indexes are memory-mapped unless ``mmap=False`` (approximate ones are
        read into memory by a later :meth:`add`)."""
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
        index = cls(
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
                faiss = _import_faiss()
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


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "faiss is needed for backend='faiss' and approximate kinds: pip install faiss-cpu "
            "(or smi-hub[faiss]); kind='flat' with backend='torch' needs nothing."
        ) from e
    return faiss
