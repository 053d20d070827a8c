"""Refine: exact re-ranking of an approximate index's short list on the stored float vectors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import smi_hub.index_kinds as index_kinds  # noqa: E402
from smi_hub import EmbeddingIndex  # noqa: E402
from smi_hub.errors import SMIHubError  # noqa: E402
from smi_hub.index_vectors import recall_at_k  # noqa: E402
from smi_hub.refine import DEFAULT_K_FACTOR, VECTORS_NAME  # noqa: E402

# faiss refine builds, about 45 s of CPU in all; test_index.py stays fast
pytestmark = pytest.mark.slow


def clustered(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, dim, generator=torch.Generator().manual_seed(99))
    return centres[torch.randint(0, 50, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def exact64(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Brute-force float64 cosine top-k rows (the independent reference)."""
    v = torch.nn.functional.normalize(vectors.double(), dim=1)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    return torch.topk(q @ v.T, k, dim=1).indices


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return clustered(4000), clustered(100, seed=1)


@pytest.fixture(scope="module")
def refined(data) -> EmbeddingIndex:
    vectors, _ = data
    return EmbeddingIndex.build(vectors, kind="ivfpq", refine=8, nprobe=4, queries=0)


def test_refine_raises_recall_and_orders_candidates_exactly(data, refined) -> None:
    vectors, queries = data
    truth = exact64(vectors, queries, 10)
    plain = refined.search(queries, k=10, refine=0)
    found = refined.search(queries, k=10)
    r_plain, r_refined = recall_at_k(plain.indices, truth), recall_at_k(found.indices, truth)
    assert r_refined >= r_plain and r_refined > 0.9, (r_plain, r_refined)
    # the re-ranked result is the exact (float64) top-10 of the 80 approximate candidates
    candidates = refined.search(queries, k=80, refine=0).indices
    v = torch.nn.functional.normalize(vectors.double(), dim=1)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    for i in range(len(queries)):
        cand = candidates[i][candidates[i] >= 0]
        s = v[cand] @ q[i]
        want = cand[torch.argsort(s, descending=True)[:10]]
        assert found.indices[i].tolist() == want.tolist()
        assert torch.allclose(found.scores[i].double(), torch.sort(s, descending=True)[0][:10])
    assert found.labels[0] == found.indices[0].tolist()  # labels follow the re-ranked rows


def test_refine_save_load_round_trip_memory_maps_the_vectors(data, refined, tmp_path) -> None:
    _, queries = data
    refined.save(tmp_path / "ix")
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert info["refine"] == 8 and VECTORS_NAME in info["files"]
    back = EmbeddingIndex.load(tmp_path / "ix")
    assert back.refine == 8 and isinstance(back._vectors.array, np.memmap)
    a, b = refined.search(queries, k=10), back.search(queries, k=10)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.scores, b.scores)
    # a damaged vectors file is refused, not silently searched
    path = tmp_path / "ix" / VECTORS_NAME
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SMIHubError, match="sha256"):
        EmbeddingIndex.load(tmp_path / "ix")


def test_an_index_without_refine_saves_no_vectors(data, tmp_path) -> None:
    vectors, queries = data
    index = EmbeddingIndex.build(vectors, kind="ivfpq", nprobe=4, queries=0)
    assert index.refine == 0  # explicit kinds: refine="auto" stays off
    index.save(tmp_path / "ix")
    assert not (tmp_path / "ix" / VECTORS_NAME).exists()
    with pytest.raises(ValueError, match="no float vectors"):
        EmbeddingIndex.load(tmp_path / "ix").search(queries, k=5, refine=4)


def test_add_keeps_vectors_for_refine(data) -> None:
    vectors, queries = data
    index = EmbeddingIndex(kind="ivfpq", refine=4, nprobe=4).add(vectors[:3000])
    index.add(vectors[3000:])
    assert len(index._vectors) == len(vectors) == len(index)
    truth = exact64(vectors, queries, 10)
    found = index.search(queries, k=10).indices
    assert recall_at_k(found, truth) >= recall_at_k(index.search(queries, 10, refine=0)[1], truth)


def test_auto_turns_refine_on_for_lossy_codes_that_fit_the_disk(data, monkeypatch) -> None:
    vectors, queries = data
    monkeypatch.setattr(index_kinds, "FLAT_MAX", 1000)
    n, dim = vectors.shape
    small = n * dim  # too small for float vectors in memory: auto picks compressed codes
    on = EmbeddingIndex.build(vectors, kind="auto", memory_budget=small, queries=50)
    # on: DEFAULT_K_FACTOR, doubled by the build while recall@10 is below target and rising
    assert on.kind == "ivfpq" and on.refine in (8, 16, 32, 64)
    assert on.refine >= DEFAULT_K_FACTOR and on.metadata["build"]["refine"] == on.refine
    off = EmbeddingIndex.build(
        vectors, kind="auto", memory_budget=small, disk_budget=4 * n * dim - 1, queries=50
    )
    assert off.kind == "ivfpq" and off.refine == 0 and off._vectors is None
    roomy = EmbeddingIndex.build(vectors, kind="auto", memory_budget="1GB", queries=50)
    assert roomy.kind == "ivf" and roomy.refine == 0  # float vectors in memory: nothing to refine
    truth = exact64(vectors, queries, 10)
    assert recall_at_k(on.search(queries, 10).indices, truth) >= recall_at_k(
        off.search(queries, 10).indices, truth
    )


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8x", 5000])
def test_bad_refine_values_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="refine"):
        EmbeddingIndex(kind="ivfpq", refine=bad)


def test_refine_on_flat_and_auto_at_search_are_refused(data, refined) -> None:
    with pytest.raises(ValueError, match="searches exactly"):
        EmbeddingIndex(kind="flat", refine=4)
    with pytest.raises(ValueError, match="not 'auto'"):
        refined.search(data[1], k=5, refine="auto")
    with pytest.raises(ValueError, match="memory size"):
        EmbeddingIndex(kind="ivfpq", disk_budget="lots")


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_explicit_refine_with_a_kind_that_scores_exactly_is_refused(data, kind) -> None:
    with pytest.raises(ValueError, match=f"refine=8: .*nothing to re-rank: kind '{kind}'"):
        EmbeddingIndex.build(data[0], kind=kind, refine=8, queries=0)
    for off in (0, "auto"):  # not asking for re-ranking is fine
        assert EmbeddingIndex(kind=kind, refine=off).refine == 0


@pytest.mark.parametrize("small", [True, False])
def test_an_explicit_refine_that_auto_cannot_use_is_dropped_with_a_warning(
    data, tmp_path, monkeypatch, small
) -> None:
    """kind='auto' picks Flat (<= FLAT_MAX vectors) or IVF...,Flat (floats fit the budget):
    both score exactly, so refine=8 would only duplicate the vectors. It used to be dropped
    silently; now the build says so, naming the kind picked."""
    vectors, queries = data
    if not small:
        monkeypatch.setattr(index_kinds, "FLAT_MAX", 1000)
    picked = "Flat" if small else "IVF"
    with pytest.warns(UserWarning, match=f"refine=8 dropped: kind='auto' picked {picked}"):
        index = EmbeddingIndex.build(vectors, kind="auto", refine=8, queries=50)
    assert index.kind == ("flat" if small else "ivf")
    assert index.refine == 0 and index.metadata["build"]["refine"] == 0
    index.save(tmp_path / "ix")
    assert not (tmp_path / "ix" / VECTORS_NAME).exists()  # no float copy for nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refine="auto" (the default) or 0: no warning
        for off in (0, "auto"):
            EmbeddingIndex.build(vectors, kind="auto", refine=off, queries=50)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_refine_at_search_on_a_kind_that_scores_exactly_warns_it_is_ignored(data, kind):
    vectors, queries = data
    index = EmbeddingIndex.build(vectors, kind=kind, nprobe=4 if kind == "ivf" else None, queries=0)
    plain = index.search(queries, k=10)
    with pytest.warns(UserWarning, match=f"refine ignored: a {kind} index"):
        found = index.search(queries, k=10, refine=8)
    assert torch.equal(found.indices, plain.indices)


def test_an_ivf_folder_saved_with_refine_before_it_was_refused_still_loads(data, tmp_path):
    vectors, queries = data
    folder = EmbeddingIndex.build(vectors, kind="ivf", nprobe=4, queries=0).save(tmp_path / "ix")
    info = json.loads((folder / "index.json").read_text())
    info["refine"] = 8  # as such a build wrote it (its vectors.npy changed no result)
    (folder / "index.json").write_text(json.dumps(info))
    back = EmbeddingIndex.load(folder)
    assert back.refine == 0 and back.search(queries, k=5).indices.shape == (len(queries), 5)


def make_store(tmp_path, vectors):
    from smi_hub.feature_store import StoreWriter

    n = len(vectors)
    writer = StoreWriter(
        tmp_path / "store", "synthetic", {"model": "synthetic", "layer": "pooled"}, n
    )
    writer.prepare()
    rows = list(range(n))
    writer.write_shard(0, vectors, rows, [], [f"v{i}" for i in rows], [])
    writer.finish(n)
    return tmp_path / "store"


def test_cli_index_refine_with_exact_kinds(tmp_path, data, capsys) -> None:
    from smi_hub.cli import main

    store = str(make_store(tmp_path, data[0]))
    out = tmp_path / "ix"
    assert main(["index", store, "-o", str(out), "--kind", "ivf", "--refine", "8"]) == 2
    err = capsys.readouterr().err
    assert "--refine 8 with --kind ivf" in err and "--kind ivfpq" in err
    assert not out.exists()  # refused before any work
    with pytest.warns(UserWarning, match="refine=8 dropped: kind='auto' picked Flat"):
        assert main(["index", store, "-o", str(out), "--refine", "8"]) == 0
    assert EmbeddingIndex.load(out).refine == 0 and not (out / VECTORS_NAME).exists()


def test_cli_index_refine(tmp_path, data) -> None:
    from smi_hub.cli import main

    vectors, _ = data
    make_store(tmp_path, vectors)
    out = tmp_path / "ix"
    assert (
        main(["index", str(tmp_path / "store"), "-o", str(out), "--kind", "ivfpq", "--refine", "4"])
        == 0
    )
    assert EmbeddingIndex.load(out).refine == 4
    with pytest.raises(SystemExit):
        main(["index", str(tmp_path / "store"), "-o", str(out), "--refine", "-2"])


def test_tune_k_factor_doubles_until_target_or_plateau() -> None:
    from smi_hub.refine import tune_k_factor

    curve = {16: 0.90, 32: 0.96, 64: 0.97}
    assert tune_k_factor(curve.__getitem__, 8, 0.80, 0.95) == (32, 0.96)  # target reached
    flat = {16: 0.801, 32: 0.9}
    assert tune_k_factor(flat.__getitem__, 8, 0.80, 0.95) == (8, 0.80)  # stopped rising
    assert tune_k_factor(curve.__getitem__, 8, 0.99, 0.95) == (8, 0.99)  # already there


@pytest.mark.parametrize("bad", [-1, "8", True, 1.5])
def test_a_bad_refine_in_index_json_is_refused(data, refined, tmp_path, bad) -> None:
    folder = refined.save(tmp_path / "ix")
    info = json.loads((folder / "index.json").read_text())
    info["refine"] = bad
    (folder / "index.json").write_text(json.dumps(info))
    with pytest.raises(SMIHubError, match="refine"):
        EmbeddingIndex.load(folder)


def test_a_refined_index_without_its_vectors_file_is_refused(refined, tmp_path) -> None:
    folder = refined.save(tmp_path / "ix")
    (folder / VECTORS_NAME).unlink()
    with pytest.raises(SMIHubError, match="missing"):
        EmbeddingIndex.load(folder)


def test_resaving_into_an_index_folder_replaces_the_vectors_as_a_set(data, refined, tmp_path):
    vectors, _ = data
    folder = refined.save(tmp_path / "ix")
    refined.save(folder)  # its own folder: no --overwrite needed
    assert (folder / VECTORS_NAME).is_file()
    EmbeddingIndex.build(vectors, kind="ivfpq", nprobe=4, queries=0).save(folder)
    assert not (folder / VECTORS_NAME).exists()  # a stale vectors file is not left behind
    assert EmbeddingIndex.load(folder).refine == 0
