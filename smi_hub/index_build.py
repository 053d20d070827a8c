"""Building an index (:meth:`~smi_hub.EmbeddingIndex.build`): the vectors read shard by shard,
training on a sample, chunked adds, the search knob tuned on held-out queries, the build report."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from smi_hub.feature_store import FeatureStore
from smi_hub.index_kinds import KNOBS, nlist, shortfall_reason
from smi_hub.index_vectors import as_matrix, check_finite, exact_topk, normalize, recall_at_k
from smi_hub.ood import PROFILE_QUERIES, neighbour_profile
from smi_hub.plan import print_plan
from smi_hub.refine import tune_k_factor

PROGRESS_MIN = 50_000  # build(progress=None): a progress bar from this many vectors on


class VectorSource(NamedTuple):
    """The vectors to index: ``n`` rows of ``dim``, their ``labels``, ``chunks()`` (every row in
    order, normalized, a chunk at a time) and ``rows(ids)`` (the rows ``ids``, normalized)."""

    n: int
    dim: int
    labels: list[Any]
    chunks: Callable[[], Iterator[torch.Tensor]]
    rows: Callable[[torch.Tensor], torch.Tensor]


def vector_source(vectors: Any, labels: list[Any] | None, chunk_size: int) -> VectorSource:
    """``vectors`` (a :class:`~smi_hub.FeatureStore`, read shard by shard, never all at once, or
    an N x D tensor in chunks of ``chunk_size`` rows) with their labels (default: a store's
    paths, else row numbers); refused when empty or when labels and vectors differ in number."""
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
    return VectorSource(n, dim, labels, chunks, rows)


def fill_index(
    index: Any,
    source: VectorSource,
    *,
    train_size: int | None,
    queries: int,
    target_recall: float,
    nprobe: int | None,
    ef_search: int | None,
    seed: int,
    refine: int | str | None,
    progress: bool | None,
    t0: float,
) -> None:
    """Fill a new, resolved ``index`` with ``source``: trained on ``train_size`` rows sampled
    with ``seed`` (approximate kinds), every row added in chunks, the search knob tuned on
    ``queries`` other rows (:func:`tune_search_knob`); the build report (times from ``t0``)
    and the gallery's neighbour profile go into its metadata. ``progress``: a progress bar on
    stderr (None: from :data:`PROGRESS_MIN` vectors on)."""
    n, dim, rows = source.n, source.dim, source.rows
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
    for part in source.chunks():
        if index.kind == "flat":
            index.embeddings[pos : pos + part.shape[0]] = part
        else:
            index._faiss.add(part.numpy())
            if index._vectors is not None:
                index._vectors.write(pos, part.numpy())
        pos += part.shape[0]
        bar.update(part.shape[0])
    index.labels = source.labels
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
        held_out = rest[:queries].sort().values
        report.update(
            tune_search_knob(index, source, held_out, target_recall, nprobe, ef_search, refine, bar)
        )
    bar.close()
    index.metadata["build"] = report
    # the gallery's own nearest-neighbour scores, for the out-of-domain signal (smi_hub.ood)
    profile_ids = perm[-min(n, PROFILE_QUERIES) :].sort().values
    index.metadata["neighbour_profile"] = neighbour_profile(index, rows(profile_ids), profile_ids)


def tune_search_knob(
    index: Any,
    source: VectorSource,
    held_out: torch.Tensor,
    target_recall: float,
    nprobe: int | None,
    ef_search: int | None,
    refine: int | str | None,
    bar: tqdm,
) -> dict[str, Any]:
    """Search the ``held_out`` rows of ``source`` exactly and with the filled approximate
    ``index``: the smallest ``nprobe`` / ``efSearch`` reaching ``target_recall`` (recall@10;
    or where doubling it stops helping) is set unless given, and the k factor when ``refine``
    is ``"auto"``; a warning says what to change when the target is missed. Returns the
    build report's entries: queries, recall@10, the knob (and refine when tuned)."""
    n, dim = source.n, source.dim
    report: dict[str, Any] = {}
    q = source.rows(held_out)
    k = min(10, n)
    _, truth = exact_topk(q, source.chunks(), k)
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
    report.update({"queries": int(q.shape[0]), "recall_at_10": round(recall, 4), knob: value})
    if recall < target_recall:
        why = shortfall_reason(
            index.kind, index.factory, n, dim, index.memory_budget, index.refine,
            knob, value, bool(given),
        )  # fmt: skip
        refined = f" re-ranking k x {index.refine}" if index.refine else ""
        warnings.warn(
            f"recall@10 {recall:.3f} on {q.shape[0]} held-out queries is below "
            f"target_recall {target_recall} for {index.factory}{refined} {why}.",
            stacklevel=4,  # the caller of EmbeddingIndex.build
        )
    return report
