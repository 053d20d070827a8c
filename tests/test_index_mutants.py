"""EmbeddingIndex details pinned where mutation testing found them unchecked: the memory-size
parser, the IVF cell count and the auto choice at their edges, streamed exact top-k, the knob
tuning of ``build``, per-call knobs, the saved ``index.json`` and the loader's checks.

References are independent: brute-force float64 numpy search, naive loops over powers of two,
hashlib over whole files. Vectors are small Gaussian clusters (fast to build)."""

from __future__ import annotations

import hashlib
import json
import sys
import time

import faiss
import numpy as np
import pytest
import torch

import smi_hub.index as I
import smi_hub.index_build as B
import smi_hub.index_folder as D
import smi_hub.index_format as F
import smi_hub.index_kinds as K
import smi_hub.index_vectors as V
from smi_hub import EmbeddingIndex, SMIHubError
from smi_hub.feature_store import StoreWriter
from smi_hub.features import FeatureResult


def clustered(n: int, d: int, clusters: int = 20, noise: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    picks = torch.randint(0, clusters, (n,), generator=g)
    return centres[picks] + noise * torch.randn(n, d, generator=g)


def brute(db: torch.Tensor, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in float64, stable order."""
    a = db.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = q.double().numpy()
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for f, t in zip(found, truth, strict=True):
        hits += sum(1 for v in t if v in set(f.tolist()))
    return hits / truth.size


@pytest.fixture(scope="module")
def db() -> torch.Tensor:
    return clustered(3000, 16)


# ---- sizes, cells, factory strings --------------------------------------------------------


def test_parse_bytes_units():
    cases = {
        "512": 512,
        "10b": 10,
        "7KB": 7 << 10,
        "3 MiB": 3 << 20,
        " 1.5G ": 3 << 29,
        "2gb": 2 << 30,
        "2tb": 2 << 40,
        "4k": 4 << 10,
        "4KiB": 4 << 10,
        "1M": 1 << 20,
        "1T": 1 << 40,
        "0.5m": 1 << 19,
    }
    for text, want in cases.items():
        assert I.parse_bytes(text) == want, text
    assert I.parse_bytes(2.75) == 2 and I.parse_bytes(7) == 7
    for bad in ("lots", "2 PB", "1.5.G", "-3G", ""):
        with pytest.raises(ValueError) as e:
            I.parse_bytes(bad)
        assert str(e.value) == f"{bad!r} is not a memory size; write e.g. 2GB, 512MB or 1.5G."


def test_nlist_is_the_largest_power_of_two_under_the_target():
    for n in [1, 2, 38, 39, 40, 77, 78, 400, 1000, 1599, 1600, 4096, 10_000, 65_536, 10**6]:
        target = max(1, min(4 * int(np.floor(np.sqrt(n))), n // 39))
        p = 1
        while p * 2 <= target:
            p *= 2
        assert K.nlist(n) == p, n


def test_factory_strings_at_their_edges():
    n, d = 1_000_000, 64
    nlist = K.nlist(n)
    overhead = nlist * d * 4 + n * 8 + (64 << 20)
    fs = K.factory_string
    # flat: both bounds inclusive
    assert fs("auto", K.FLAT_MAX, d, K.FLAT_MAX * d * 4) == "Flat"
    assert fs("auto", K.FLAT_MAX, d, K.FLAT_MAX * d * 4 - 1).startswith("IVF")
    assert fs("auto", K.FLAT_MAX + 1, d, 1 << 40) == f"IVF{K.nlist(K.FLAT_MAX + 1)},Flat"
    ivf_need = int(np.ceil(1.1 * n * d * 4 + overhead))
    assert fs("auto", n, d, ivf_need) == f"IVF{nlist},Flat"
    assert fs("auto", n, d, ivf_need - 1) == f"IVF{nlist},SQfp16"
    fp16_need = int(np.ceil(1.1 * n * d * 2 + overhead))
    assert fs("auto", n, d, fp16_need) == f"IVF{nlist},SQfp16"
    assert fs("auto", n, d, fp16_need - 1) == f"IVF{nlist},SQ8"
    sq8_need = int(np.ceil(1.1 * n * d + overhead))
    assert fs("auto", n, d, sq8_need) == f"IVF{nlist},SQ8"
    assert fs("auto", n, d, sq8_need - 1).startswith(f"IVF{nlist},PQ")
    # ivfpq: m = d / 2 (odd d: d), halved while a multiple of 4 and over budget
    assert fs("ivfpq", n, d, n * (32 // 2 + 8)) == f"IVF{nlist},PQ32x4fs"
    assert fs("ivfpq", n, d, n * (32 // 2 + 8) - 1) == f"IVF{nlist},PQ16x4fs"
    assert fs("ivfpq", n, d, 1) == f"IVF{nlist},PQ2x4fs"  # 32, 16, 8, 4, 2
    assert fs("ivfpq", n, 24, 1) == f"IVF{nlist},PQ6x4fs"  # 12 -> 6, not a multiple of 4
    assert fs("ivfpq", n, 15, 1) == f"IVF{nlist},PQ15x4fs"
    assert fs("ivfpq", n, 6, 1) == f"IVF{nlist},PQ3x4fs"
    assert fs("ivf", 5000, d) == f"IVF{K.nlist(5000)},Flat"
    assert fs("hnsw", n, d) == "HNSW32,Flat" and fs("flat", n, d) == "Flat"
    assert fs("ivfsq", n, d) == f"IVF{nlist},SQfp16"  # default budget: 2 GiB
    with pytest.raises(ValueError) as e:
        fs("lsh", n, d)
    assert str(e.value) == (
        "kind must be one of ['flat', 'ivf', 'ivfsq', 'ivfpq', 'hnsw', 'auto'], got 'lsh'."
    )
    for factory, kind in [
        ("Flat", "flat"),
        ("HNSW32,Flat", "hnsw"),
        ("IVF8,Flat", "ivf"),
        ("IVF8,SQ8", "ivfsq"),
        ("IVF8,SQfp16", "ivfsq"),
        ("IVF8,PQ4x4fs", "ivfpq"),
    ]:
        assert K.kind_of(factory) == kind, factory


# ---- exact search helpers ---------------------------------------------------------------


def test_exact_topk_streamed_over_chunks(db):
    q = V.normalize(clustered(7, 16, seed=5))
    x = V.normalize(db[:50])
    ref_s, ref_i = brute(db[:50], clustered(7, 16, seed=5), 6)
    for size in (50, 13, 4, 1):
        s, i = V.exact_topk(q, iter(x.split(size)), 6)
        assert np.array_equal(i.numpy(), ref_i), size
        np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6)
        assert i.dtype == torch.long  # float32 row numbers are inexact past 2**24 rows
    s, i = V.exact_topk(q, iter(x[:3].split(2)), 6)  # fewer rows than k
    assert i.shape == (7, 3) and np.array_equal(
        i.numpy(), brute(db[:3], clustered(7, 16, seed=5), 3)[1]
    )


def test_recall_at_k_counts_overlaps():
    truth = torch.tensor([[1, 2, 3], [4, 5, 6]])
    found = torch.tensor([[3, 9, 1], [7, 8, 4]])
    assert V.recall_at_k(found, truth) == recall(found.numpy(), truth.numpy()) == 3 / 6
    with pytest.raises(ValueError):
        V.recall_at_k(found[:1], truth)


# ---- building and adding ----------------------------------------------------------------


def test_constructor_checks_and_repr():
    with pytest.raises(ValueError) as e:
        EmbeddingIndex(backend="annoy")
    assert str(e.value) == "backend must be 'torch' or 'faiss', got 'annoy'."
    with pytest.raises(ValueError) as e:
        EmbeddingIndex(kind="lsh")
    assert str(e.value).startswith("kind must be one of ['flat', 'ivf',")
    flat = EmbeddingIndex(dim=4, memory_budget="1KiB", metadata={"a": 1})
    assert (flat.factory, flat.backend, flat.memory_budget) == ("Flat", "torch", 1024)
    assert flat.embeddings.shape == (0, 4) and flat.metadata == {"a": 1}
    assert repr(flat) == "EmbeddingIndex(n=0, dim=4, kind='flat', backend='torch')"
    ivf = EmbeddingIndex(kind="ivf", backend="torch")
    assert (ivf.factory, ivf.backend) == (None, "faiss")
    assert EmbeddingIndex().memory_budget == 2 << 30


def test_auto_resolves_on_the_first_vectors(db, monkeypatch):
    small = EmbeddingIndex(kind="auto").add(db[:100])
    assert (small.kind, small.factory, small.backend) == ("flat", "Flat", "torch")
    assert small.embeddings.shape == (100, 16)
    monkeypatch.setattr(K, "FLAT_MAX", 10)
    big = EmbeddingIndex(kind="auto").add(db)
    assert (big.kind, big.factory, big.backend) == ("ivf", f"IVF{K.nlist(3000)},Flat", "faiss")
    assert big.embeddings is None and big._faiss.is_trained and big._faiss.ntotal == 3000
    ivf = faiss.extract_index_ivf(big._faiss)
    assert ivf.cp.niter == 10 and big._faiss.metric_type == faiss.METRIC_INNER_PRODUCT
    full = big.search(db[:20], k=5, nprobe=ivf.nlist)
    assert np.array_equal(full.indices.numpy(), brute(db, db[:20], 5)[1])


def test_add_labels_and_checks(db):
    index = EmbeddingIndex()
    index.add(db[:3]).add(db[3:5].numpy())
    assert index.labels == [0, 1, 2, 3, 4] and index.dim == 16
    index.add(FeatureResult(features=db[5:7], paths=["a.png", "b.png"]))
    index.add(db[7:9], labels=range(100, 102))
    assert index.labels == [0, 1, 2, 3, 4, "a.png", "b.png", 100, 101]
    torch.testing.assert_close(index.embeddings, V.normalize(db[:9]))
    with pytest.raises(ValueError) as e:
        index.add(db[:2, :8])
    assert str(e.value) == "This index holds 16-d vectors, got 8-d."
    with pytest.raises(ValueError) as e:
        index.add(db[:2], labels=["x"])
    assert str(e.value) == "2 vectors but 1 labels."
    with pytest.raises(ValueError) as e:
        index.add(torch.zeros(2, 16, 2, 2))
    assert str(e.value) == (
        "embeddings must be N x D vectors, got shape (2, 16, 2, 2); pool spatial features "
        "first (extract_features(..., layer='pooled'))."
    )
    with pytest.raises(ValueError) as e:
        index.search(torch.zeros(2, 3, 4))
    assert str(e.value).startswith("queries must be N x D vectors")
    with pytest.raises(ValueError) as e:
        index.search(db[:2, :8])
    assert str(e.value) == "This index holds 16-d vectors, queries are 8-d."
    with pytest.raises(ValueError) as e:
        EmbeddingIndex().search(db[:1])
    assert str(e.value) == "The index is empty; add() embeddings first."
    sized = EmbeddingIndex(dim=16).add(db[:4])
    assert sized.embeddings.shape == (4, 16)
    vec = EmbeddingIndex().add(db[0])  # one vector as 1-d
    assert len(vec) == 1 and vec.dim == 16


def test_short_vectors_are_normalized_too(db):
    small = 1e-3 * db[:200]  # norms far below 1
    index = EmbeddingIndex().add(small)
    torch.testing.assert_close(index.embeddings, db[:200] / db[:200].norm(dim=1, keepdim=True))
    scores, indices, _ = index.search(1e-3 * db[200:210], k=4)
    ref_s, ref_i = brute(db[:200], db[200:210], 4)
    assert np.array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)


def test_faiss_flat_sees_vectors_added_after_a_search(db):
    index = EmbeddingIndex(backend="faiss").add(db[:100])
    index.search(db[:2], k=3)  # builds the faiss index
    index.add(db[100:300])
    got = index.search(db[250:260], k=5)
    assert index._faiss.ntotal == 300  # the search ran in faiss, which saw every vector
    assert np.array_equal(got.indices.numpy(), brute(db[:300], db[250:260], 5)[1])
    torch_index = EmbeddingIndex().add(db[:300])
    assert torch.equal(torch_index.search(db[250:260], k=5).indices, got.indices)
    assert got.labels == [row for row in got.indices.tolist()]


def test_train_and_untrained_add(db):
    flat = EmbeddingIndex()
    assert flat.train(db[:10]) is flat and flat._faiss is None and flat.dim == 16
    trained = EmbeddingIndex(kind="ivf").train(db[:2000])  # cells from the vector count
    assert trained.factory == f"IVF{K.nlist(2000)},Flat" and trained._faiss.ntotal == 0
    with pytest.raises(ValueError) as e:
        EmbeddingIndex(kind="ivf").train(torch.zeros(3, 4, 5))
    assert str(e.value).startswith("sample must be N x D vectors, got shape (3, 4, 5)")
    ivf = EmbeddingIndex(kind="ivf")
    ivf.add(db[:2000], labels=[f"v{i}" for i in range(2000)])  # trained on these vectors
    assert ivf._faiss.is_trained and ivf._faiss.ntotal == 2000 and ivf.dim == 16
    ivf.add(db[2000:])
    assert len(ivf) == 3000 and ivf.labels[2000] == 2000
    pq = EmbeddingIndex(kind="ivfpq")
    with pytest.raises(ValueError) as e:
        pq.train(db[:10])
    message = str(e.value)
    assert message == (  # refused before faiss prints a clustering warning per sub-space
        "kind='ivfpq' needs at least 624 training vectors (faiss trains 16 centroids per PQ "
        "sub-space from 39 points each), got 10; at this size an exact kind='flat' index is "
        "small and fast."
    )


def _check_tuning(db: torch.Tensor, targets: tuple[float, ...]) -> set[int]:
    """Builds with every target; returns the chosen nprobe values."""
    n = len(db)
    truth = brute(db, db, 10)[1]
    nlist = K.nlist(n)
    per_knob, chosen = {}, set()
    for target in targets:
        t0 = time.perf_counter()
        index = EmbeddingIndex.build(db, kind="ivf", train_size=n, queries=n, target_recall=target)
        wall = time.perf_counter() - t0
        report = index.metadata["build"]
        if not per_knob:
            for v in [v for v in K.KNOBS if v <= nlist]:
                found = index.search(db, k=10, nprobe=v).indices.numpy()
                per_knob[v] = recall(found, truth)
        # the smallest knob reaching the target, or the last one before recall stops rising
        value, best = None, -1.0
        for v, r in per_knob.items():
            if r < best + 0.002:
                break
            value, best = v, r
            if r >= target:
                break
        assert report["nprobe"] == index.nprobe == value, (target, per_knob)
        chosen.add(value)
        assert report["recall_at_10"] == round(best, 4)
        assert (report["vectors"], report["train_vectors"], report["queries"]) == (n, n, n)
        assert report["kind"] == "ivf" and report["factory"] == f"IVF{nlist},Flat"
        assert wall + 0.001 >= report["build_s"] >= report["train_s"] > 0
        assert isinstance(report["train_s"], float)
        plain = index.search(db[:50], k=10)  # the tuned knob is the default
        assert torch.equal(plain.indices, index.search(db[:50], k=10, nprobe=value).indices)
    assert max(per_knob.values()) == 1.0
    return chosen


@pytest.mark.slow
def test_build_report_and_knob_tuning_follow_the_documented_rule():
    db = clustered(1200, 16, noise=1.2, seed=3)  # 16 cells, overlapping clusters
    n = len(db)
    assert len(_check_tuning(db, (0.5, 0.8, 0.9, 0.98, 1.0))) == 5
    # a target met exactly stops there: build measures with the float32 exact top-k
    x = V.normalize(db)
    exact = V.exact_topk(x, iter([x]), 10)[1]
    probe = EmbeddingIndex.build(db, kind="ivf", train_size=n, queries=0)
    r4 = V.recall_at_k(probe.search(x, k=10, nprobe=4).indices, exact)
    met = EmbeddingIndex.build(db, kind="ivf", train_size=n, queries=n, target_recall=r4)
    assert met.nprobe == 4 and met.metadata["build"]["recall_at_10"] == round(r4, 4)
    # separated clusters: recall reaches 1.0 early, the tuning stops where it stops rising
    separated = clustered(1200, 16, noise=0.3, seed=4)
    assert max(_check_tuning(separated, (1.0,))) < K.nlist(1200)
    given = EmbeddingIndex.build(db, kind="ivf", nprobe=3, queries=50)
    assert given.nprobe == 3 and given.metadata["build"]["nprobe"] == 3
    assert (
        given.metadata["build"]["queries"] == 50 and given.metadata["build"]["train_vectors"] == n
    )
    assert EmbeddingIndex.build(db, kind="ivf", queries=1).metadata["build"]["queries"] == 1
    hnsw = EmbeddingIndex.build(db, kind="hnsw", ef_search=24, queries=20, metadata={"m": 1})
    assert hnsw.ef_search == 24 and hnsw.metadata["build"]["efSearch"] == 24
    assert hnsw.metadata["m"] == 1 and set(hnsw.metadata) == {"m", "build", "neighbour_profile"}
    quiet = EmbeddingIndex.build(db, kind="ivf", queries=0, train_size=1000)
    assert quiet.nprobe is None and "recall_at_10" not in quiet.metadata["build"]
    assert quiet.metadata["build"]["train_vectors"] == 1000


@pytest.mark.slow
def test_build_hnsw_and_sample_sizes(db):
    hnsw = EmbeddingIndex.build(db, kind="hnsw", target_recall=0.0, queries=20)
    report = hnsw.metadata["build"]
    assert report["train_vectors"] == 1000 and report["efSearch"] == hnsw.ef_search == 16
    assert "nprobe" not in report and hnsw.nprobe is None
    small = EmbeddingIndex.build(db[:600], kind="hnsw", target_recall=0.0)  # 8 IVF cells
    assert small.ef_search == 16  # efSearch candidates: 16 ... 4096, whatever the cells
    assert report["recall_at_10"] > 0.5 and report["queries"] == 20
    ivf = EmbeddingIndex.build(db, kind="ivf", target_recall=0.0)
    assert ivf.nprobe == 1 and ivf.metadata["build"]["train_vectors"] == 3000
    assert ivf.metadata["build"]["queries"] == 256
    flat = EmbeddingIndex.build(db, kind="flat", chunk_size=7)
    torch.testing.assert_close(flat.embeddings, V.normalize(db))
    assert flat.metadata["build"]["train_vectors"] == 0 and "queries" not in flat.metadata["build"]
    assert flat.metadata["build"]["train_s"] == 0.0
    seeded = [
        EmbeddingIndex.build(db, kind="ivf", train_size=500, queries=0, seed=s) for s in (0, 1)
    ]
    seeded.append(EmbeddingIndex.build(db, kind="ivf", train_size=500, queries=0))
    centroids = [faiss.extract_index_ivf(i._faiss).quantizer.reconstruct_n(0, 4) for i in seeded]
    assert not np.array_equal(*centroids[:2])  # the seed picks the training sample
    assert np.array_equal(centroids[0], centroids[2])  # default seed: 0
    default = EmbeddingIndex.build(db, kind="ivf")  # default target: recall@10 0.95
    assert default.nprobe == EmbeddingIndex.build(db, kind="ivf", target_recall=0.95).nprobe
    assert default.nprobe != EmbeddingIndex.build(db, kind="ivf", target_recall=1.0).nprobe


@pytest.mark.slow
def test_queries_are_held_out_from_the_training_sample(db, monkeypatch):
    seen = {}
    train, exact = EmbeddingIndex.train, B.exact_topk

    def spy_train(self, sample):
        seen["train"] = sample.clone()
        return train(self, sample)

    def spy_exact(queries, chunks, k):
        seen["queries"] = queries.clone()
        return exact(queries, chunks, k)

    monkeypatch.setattr(EmbeddingIndex, "train", spy_train)
    monkeypatch.setattr(B, "exact_topk", spy_exact)
    EmbeddingIndex.build(db, kind="ivf", train_size=2000, queries=1000)
    assert seen["train"].shape == (2000, 16) and seen["queries"].shape == (1000, 16)
    train_rows = {tuple(r) for r in seen["train"].tolist()}
    query_rows = {tuple(r) for r in seen["queries"].tolist()}
    assert len(query_rows) == 1000 and not train_rows & query_rows
    assert train_rows | query_rows == {tuple(r) for r in V.normalize(db).tolist()}


@pytest.mark.slow
def test_training_sample_size_grows_with_the_cells():
    g = torch.Generator().manual_seed(0)
    mid = EmbeddingIndex.build(torch.randn(12_000, 4, generator=g), kind="ivf", queries=0)
    assert mid.metadata["build"]["train_vectors"] == 12_000  # 64 x 256 cells > 12 000
    big = torch.randn(70_000, 4, generator=g)
    large = EmbeddingIndex.build(big, kind="ivf", queries=0)
    assert K.nlist(70_000) == 1024 and large.metadata["build"]["train_vectors"] == 64 * 1024
    flat = EmbeddingIndex().add(big)  # more than 65 536 vectors: queries in blocks of 958
    q = big[:1000]
    got = flat.search(q, k=3).indices
    assert torch.equal(got[:, 0], torch.arange(1000))
    assert torch.equal(got[990:], flat.search(q[990:], k=3).indices)


@pytest.mark.slow
def test_build_from_a_store_and_its_errors(db, tmp_path):
    writer = StoreWriter(tmp_path / "s", "synthetic", {"model": "m"}, 700)
    writer.prepare()
    for k in range(5):
        inputs = range(k * 700, min(3000, (k + 1) * 700))
        rows = [i for i in inputs if i % 97]  # gaps
        rows = [] if k == 2 else rows  # a shard whose inputs all failed
        failed = [(f"v{i}", "unreadable") for i in inputs if i not in rows]
        writer.write_shard(
            k, db[rows].reshape(len(rows), 16), rows, [], [f"v{i}" for i in rows], failed
        )
    store = writer.finish(3000)
    keep = [i for i in range(3000) if i % 97 and not 1400 <= i < 2100]
    a = EmbeddingIndex.build(store, kind="ivf", train_size=800, queries=100)
    b = EmbeddingIndex.build(db[keep], kind="ivf", train_size=800, queries=100)
    assert a.labels == [f"v{i}" for i in keep] and b.labels == list(range(len(keep)))
    assert a.metadata["build"]["recall_at_10"] == b.metadata["build"]["recall_at_10"]
    assert torch.equal(a.search(db[:30], 10).indices, b.search(db[:30], 10).indices)
    flat = EmbeddingIndex.build(store, kind="flat", labels=list(range(len(keep))))
    torch.testing.assert_close(flat.embeddings, V.normalize(db[keep]))
    with pytest.raises(ValueError) as e:
        EmbeddingIndex.build(torch.zeros(2, 3, 4))
    assert str(e.value).startswith("vectors must be N x D vectors, got shape (2, 3, 4)")
    with pytest.raises(ValueError) as e:
        EmbeddingIndex.build(torch.empty(0, 4))
    assert str(e.value) == "No vectors to index."
    with pytest.raises(ValueError) as e:
        EmbeddingIndex.build(db[:5], labels=["a"])
    assert str(e.value) == "5 vectors but 1 labels."
    result = FeatureResult(features=db[:5], paths=list("abcde"))
    assert EmbeddingIndex.build(result).labels == list("abcde")


# ---- searching --------------------------------------------------------------------------


def test_k_is_capped_and_at_least_one(db):
    index = EmbeddingIndex().add(db[:5])
    assert index.search(db[:2], k=0).indices.shape == (2, 1)
    assert index.search(db[:2], k=2.9).indices.shape == (2, 2)
    assert index.search(db[:2], k=99).indices.shape == (2, 5)
    assert index.search(db[:2]).indices.shape == (2, 5)
    assert EmbeddingIndex().add(db[:9]).search(db[:2]).indices.shape == (2, 5)  # default k


def test_missing_neighbours_are_minus_one_with_no_label(db):
    index = EmbeddingIndex.build(db, kind="ivf", nprobe=1, labels=[f"v{i}" for i in range(3000)])
    res = index.search(db[:20], k=1000)
    missing = res.indices == -1
    assert missing.any() and (~missing).any()
    for row, labels in zip(res.indices.tolist(), res.labels, strict=True):
        assert labels == [f"v{j}" if j >= 0 else None for j in row]


@pytest.mark.slow
def test_search_time_knobs_apply_to_one_call(db):
    ivf = EmbeddingIndex.build(db, kind="ivf", nprobe=1)
    inner = faiss.extract_index_ivf(ivf._faiss)
    truth = brute(db, db[:100], 10)[1]
    low = ivf.search(db[:100], k=10).indices.numpy()
    full = ivf.search(db[:100], k=10, nprobe=inner.nlist).indices.numpy()
    assert recall(full, truth) == 1.0 and recall(low, truth) < 1.0
    assert np.array_equal(ivf.search(db[:100], k=10).indices.numpy(), low)  # back to 1
    assert inner.nprobe == 1
    for kind in ("ivfsq", "ivfpq"):  # the index's own nprobe comes back after an override
        other = EmbeddingIndex.build(db, kind=kind, nprobe=2, queries=0)
        other.search(db[:5], k=3, nprobe=8)
        other.search(db[:5], k=3)
        assert faiss.extract_index_ivf(other._faiss).nprobe == 2, kind
    untuned = EmbeddingIndex.build(db, kind="ivf", queries=0)
    untuned.search(db[:5], k=3, nprobe=4)
    assert faiss.extract_index_ivf(untuned._faiss).nprobe == 4
    hnsw = EmbeddingIndex.build(db, kind="hnsw", ef_search=20, queries=0)
    graph = faiss.downcast_index(hnsw._faiss)
    hnsw.search(db[:5], k=3)
    assert graph.hnsw.efSearch == 20
    hnsw.search(db[:5], k=3, ef_search=40)
    assert graph.hnsw.efSearch == 40
    hnsw.search(db[:5], k=30)
    assert graph.hnsw.efSearch == 30
    free = EmbeddingIndex.build(db, kind="hnsw", queries=0)
    before = faiss.downcast_index(free._faiss).hnsw.efSearch
    free.search(db[:5], k=3)
    assert faiss.downcast_index(free._faiss).hnsw.efSearch == before
    free.search(db[:5], k=3, ef_search=64)
    assert faiss.downcast_index(free._faiss).hnsw.efSearch == 64


# ---- saving and loading -----------------------------------------------------------------


def test_index_json_records_everything(db, tmp_path):
    index = EmbeddingIndex.build(db, kind="ivf", nprobe=2, metadata={"model": "m"}, queries=0)
    folder = index.save(tmp_path / "i")
    assert folder == tmp_path / "i"
    info = json.loads((folder / "index.json").read_text())
    data = (folder / "index.faiss").read_bytes()
    assert info == {
        "format": "smi-hub-index",
        "format_version": 2,
        "kind": "ivf",
        "factory": index.factory,
        "dim": 16,
        "count": 3000,
        "metric": "cosine",
        "nprobe": 2,
        "ef_search": None,
        "refine": 0,
        "files": {"index.faiss": hashlib.sha256(data).hexdigest()},
        "labels": list(range(3000)),
        "metadata": index.metadata,
    }
    back = EmbeddingIndex.load(folder, mmap=False)
    assert (back.kind, back.factory, back.nprobe, back.dim) == ("ivf", index.factory, 2, 16)
    assert back.embeddings is None and back.backend == "faiss"
    assert torch.equal(back.search(db[:10], 5).indices, index.search(db[:10], 5).indices)
    back.add(db[:10])  # read fully: a writable index
    assert back._faiss.ntotal == 3010
    flat = EmbeddingIndex(metadata={"m": 1}).add(db[:4], labels=list("abcd")).save(tmp_path / "f")
    info = json.loads((flat / "index.json").read_text())
    weights = (flat / "embeddings.safetensors").read_bytes()
    assert info["files"] == {"embeddings.safetensors": hashlib.sha256(weights).hexdigest()}
    assert (info["kind"], info["factory"], info["count"], info["labels"]) == (
        "flat",
        "Flat",
        4,
        list("abcd"),
    )
    loaded = EmbeddingIndex.load(flat, backend="faiss")
    assert loaded.backend == "faiss" and loaded.factory == "Flat" and loaded.metadata == {"m": 1}
    assert loaded.embeddings.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_vectors_added_to_a_memory_mapped_index(db, tmp_path, kind):
    # faiss aborts the process when asked to grow a memory-mapped index
    index = EmbeddingIndex.build(db[:2500], kind=kind, queries=0, nprobe=4, ef_search=32)
    back = EmbeddingIndex.load(index.save(tmp_path / "i"))
    assert back._mapped
    back.add(db[2500:], labels=list(range(2500, 3000)))
    index.add(db[2500:])
    assert len(back) == back._faiss.ntotal == 3000 and back.labels == index.labels
    assert torch.equal(back.search(db[2900:], 5).indices, index.search(db[2900:], 5).indices)
    assert not EmbeddingIndex.load(tmp_path / "i", mmap=False)._mapped


def test_empty_indexes_round_trip(tmp_path):
    for dim in (None, 4):
        EmbeddingIndex(dim=dim).save(tmp_path / f"e{dim}")
        back = EmbeddingIndex.load(tmp_path / f"e{dim}")
        assert len(back) == 0 and back.dim == dim
        back.add(torch.ones(2, 3 if dim is None else dim))
        assert len(back) == 2
    trained = EmbeddingIndex().train(torch.ones(5, 6))  # a flat index knows its dim, no rows
    back = EmbeddingIndex.load(trained.save(tmp_path / "t"))
    assert len(back) == 0 and back.dim == 6 and back.embeddings.shape == (0, 6)


def test_file_digest_over_several_blocks(tmp_path):
    blob = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    (tmp_path / "blob").write_bytes(blob)
    assert F.sha256_file(tmp_path / "blob") == hashlib.sha256(blob).hexdigest()


def _flat(tmp_path, db, name="f"):
    return EmbeddingIndex().add(db[:6]).save(tmp_path / name)


def _edit(folder, **changes):
    path = folder / "index.json"
    info = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            info.pop(key, None)
        else:
            info[key] = value
    path.write_text(json.dumps(info))


def test_loader_messages(db, tmp_path):
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(tmp_path / "none")
    assert str(e.value) == (
        f"{tmp_path / 'none'} is not an index folder (needs index.json); build one with "
        "`smi-hub index FOLDER -o INDEX_DIR` or EmbeddingIndex.save()."
    )
    f = _flat(tmp_path, db)
    (f / "index.json").write_text("{oops")
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(f)
    assert str(e.value).startswith(f"{f}: unreadable index (JSONDecodeError: ")
    for name, changes in [("other", {"format": "other"}), ("newer", {"format_version": 3})]:
        g = _flat(tmp_path, db, name)
        _edit(g, **changes)
        with pytest.raises(SMIHubError) as e:
            EmbeddingIndex.load(g)
        info = json.loads((g / "index.json").read_text())
        assert str(e.value) == (
            f"{g / 'index.json'} is not an smi-hub index this version reads "
            f"(format {info['format']!r} version {info['format_version']!r}; this smi-hub "
            "reads versions 1 to 2)."
        )
    g = _flat(tmp_path, db, "missing")
    (g / "embeddings.safetensors").unlink()
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(g)
    assert str(e.value) == (
        f"{g} is not a complete index (embeddings.safetensors is missing); rebuild it."
    )
    g = _flat(tmp_path, db, "sha")
    _edit(g, files={"embeddings.safetensors": "0" * 64})
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(g)
    assert str(e.value) == (
        f"{g / 'embeddings.safetensors'}: sha256 differs from index.json's record; the index "
        "folder is damaged or mixed with another index's files. Rebuild it."
    )
    _edit(g, files=None)
    with pytest.raises(SMIHubError, match="does not hold the sha256"):
        EmbeddingIndex.load(g)
    g = _flat(tmp_path, db, "dim")
    _edit(g, dim=8)
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(g)
    assert str(e.value) == f"{g}: index.json and embeddings.safetensors disagree; rebuild it."
    g = _flat(tmp_path, db, "garbage")
    (g / "embeddings.safetensors").write_bytes(b"garbage")
    _edit(g, files={"embeddings.safetensors": hashlib.sha256(b"garbage").hexdigest()})
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(g)
    assert str(e.value).startswith(f"{g}: unreadable index (SafetensorError: ")
    a = EmbeddingIndex.build(db, kind="ivf", queries=0).save(tmp_path / "a")
    _edit(a, count=2999)
    with pytest.raises(SMIHubError, match="labels: it and count disagree"):
        EmbeddingIndex.load(a)
    _edit(a, count=3000, dim=8)
    with pytest.raises(SMIHubError, match="index.json and index.faiss disagree"):
        EmbeddingIndex.load(a)


def test_a_failed_recovery_does_not_stop_reading(db, tmp_path, monkeypatch):
    folder = _flat(tmp_path, db)

    def unlistable(path):
        raise PermissionError(f"{path}: cannot list its parent")

    monkeypatch.setattr(D, "recover_folder", unlistable)
    assert EmbeddingIndex.load(folder).labels == list(range(6))


def test_version_one_folders_without_checksums_are_refused(db, tmp_path):
    """No format version switches the sha256 check off (issue 18, item 7)."""
    g = _flat(tmp_path, db)
    _edit(g, format_version=1, files=None)
    with pytest.raises(SMIHubError, match="does not hold the sha256 of the vectors file"):
        EmbeddingIndex.load(g)
    _edit(g, format_version=None)
    with pytest.raises(SMIHubError, match="version None; this smi-hub reads versions 1 to 2"):
        EmbeddingIndex.load(g)


def test_faiss_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    for kw in ({"backend": "faiss"}, {"kind": "ivf"}):
        with pytest.raises(ImportError) as e:
            EmbeddingIndex(**kw)
        assert str(e.value) == (
            "faiss is needed for backend='faiss' and approximate kinds: pip install faiss-cpu "
            "(or smi-hub[faiss]); kind='flat' with backend='torch' needs nothing."
        )
    x = clustered(50, 8)
    flat = EmbeddingIndex().add(x)  # exact torch search needs no faiss
    assert np.array_equal(flat.search(x[:5], k=4).indices.numpy(), brute(x, x[:5], 4)[1])
