"""EmbeddingIndex against brute-force numpy cosine similarity, and faiss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smi_hub import EmbeddingIndex, SMIHubError


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ dbn.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return rng.normal(size=(500, 32)), rng.normal(size=(40, 32))


def test_torch_matches_brute_force(vectors):
    db, q = vectors
    index = EmbeddingIndex()
    index.add(db[:200], labels=[f"img{i}" for i in range(200)])
    index.add(torch.from_numpy(db[200:]), labels=[f"img{i}" for i in range(200, 500)])
    assert len(index) == 500 and index.dim == 32
    scores, indices, labels = index.search(q, k=7)
    ref_s, ref_i = brute_force(db, q, 7)
    assert np.array_equal(indices.numpy(), ref_i)
    assert np.allclose(scores.numpy(), ref_s, atol=1e-5)
    assert labels[3] == [f"img{i}" for i in ref_i[3]]


@pytest.mark.parametrize("k", [1, 10, 64, 500])
def test_results_are_sorted_by_decreasing_similarity(vectors, k):
    # k >= 10: the CPU top-k does not return sorted values unless asked to
    db, q = vectors
    for index in (EmbeddingIndex().add(db), EmbeddingIndex(backend="faiss").add(db)):
        scores, indices, _ = index.search(q, k=k)
        ref_s, ref_i = brute_force(db, q, k)
        assert (scores[:, :-1] >= scores[:, 1:]).all()
        np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
        # each returned row has the returned similarity (float64), and they are the top k
        sims = brute_force(db, q, 500)
        full = np.empty((40, 500))
        np.put_along_axis(full, sims[1], sims[0], axis=1)
        np.testing.assert_allclose(np.take_along_axis(full, indices.numpy(), 1), ref_s, atol=1e-5)
        assert indices.shape == (40, k) and all(len(set(r)) == k for r in indices.tolist())


def test_faiss_agrees_with_torch(vectors):
    db, q = vectors
    a = EmbeddingIndex().add(db)
    b = EmbeddingIndex(backend="faiss").add(db[:100]).add(db[100:])
    ra, rb = a.search(q, k=10), b.search(q, k=10)
    assert torch.equal(ra.indices, rb.indices)
    assert torch.allclose(ra.scores, rb.scores, atol=1e-5)
    assert ra.labels == rb.labels


def test_save_load_roundtrip(vectors, tmp_path):
    db, q = vectors
    index = EmbeddingIndex(metadata={"model": "tiny"}).add(db, labels=list(range(500)))
    index.save(tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {
        "embeddings.safetensors",
        "index.json",
    }
    back = EmbeddingIndex.load(tmp_path / "idx")
    assert back.metadata == {"model": "tiny"} and back.labels == list(range(500))
    r1, r2 = index.search(q, 5), back.search(q, 5)
    assert torch.equal(r1.indices, r2.indices) and torch.allclose(r1.scores, r2.scores)
    r3 = EmbeddingIndex.load(tmp_path / "idx", backend="faiss").search(q, 5)
    assert torch.equal(r1.indices, r3.indices)


def test_edge_cases_and_errors(vectors, tmp_path):
    db, q = vectors
    index = EmbeddingIndex()
    with pytest.raises(ValueError, match="empty"):
        index.search(q)
    index.add(db[:3])
    assert index.search(q[0], k=10).indices.shape == (1, 3)  # k capped, 1-d query accepted
    with pytest.raises(ValueError, match="32-d"):
        index.add(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="labels"):
        index.add(db[:2], labels=["a"])
    with pytest.raises(ValueError, match="pool spatial"):
        index.add(np.zeros((2, 32, 2, 2)))
    with pytest.raises(SMIHubError, match="not an index folder"):
        EmbeddingIndex.load(tmp_path)
    index.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    meta["count"] = 4
    (tmp_path / "i" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(SMIHubError, match="disagree"):
        EmbeddingIndex.load(tmp_path / "i")
    with pytest.raises(ValueError, match="backend"):
        EmbeddingIndex(backend="annoy")
