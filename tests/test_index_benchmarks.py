"""benchmarks/index_scale.py and benchmarks/index_refine.py on tiny inputs: the shared store,
ground truth and recall / queries-per-second code, and each script end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from smi_hub.script_modules import load_file_module

pytest.importorskip("faiss")

ROOT = Path(__file__).parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # index_refine imports index_scale
    try:
        return load_file_module(name, ROOT / "benchmarks" / f"{name}.py", register=False)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def scale():
    return _load("index_scale")


def test_synthetic_store_is_a_valid_store_of_the_clustered_chunks(scale, tmp_path) -> None:
    from smi_hub import FeatureStore

    store = scale.synthetic_store(tmp_path / "s", 250, 8, 5, 1.0, 100)
    again = FeatureStore.open(tmp_path / "s")  # the manifest passes every check
    assert len(again) == 250 and again.dim == 8 and list(again.paths) == list(range(250))
    parts = list(store)
    assert [len(p) for p in parts] == [100, 100, 50]
    assert torch.equal(parts[1], scale.clustered_chunk(1, 100, 8, 5, 1.0))


def test_ground_truth_and_measure_against_a_float64_reference(scale) -> None:
    g = torch.Generator().manual_seed(0)
    vectors, queries = torch.randn(300, 16, generator=g), torch.randn(20, 16, generator=g)
    truth = scale.ground_truth(queries, vectors.split(64))
    v = torch.nn.functional.normalize(vectors.double(), dim=1)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    assert torch.equal(truth, torch.topk(q @ v.T, 10, dim=1).indices)
    calls = []

    def search(x):
        calls.append(len(x))
        return truth[: len(x)]

    perfect = scale.measure(search, queries, truth)
    assert perfect["recall_at_10"] == 1.0 and perfect["queries_per_s"] > 0
    assert calls == [8, 20, 20, 20]  # a warm-up on 8 queries, then the best of 3
    half = truth.clone()
    half[:, 5:] = -1
    assert scale.measure(lambda x: half[: len(x)], queries, truth)["recall_at_10"] == 0.5


@pytest.mark.slow
def test_index_refine_runs_on_synthetic_vectors_and_on_a_store(tmp_path) -> None:
    from smi_hub.feature_store import StoreWriter

    refine = _load("index_refine")
    common = ["--queries", "40", "--factors", "0,8", "--nprobes", "2", "--work"]
    out = tmp_path / "synthetic.json"
    result = refine.main(
        ["--vectors", "3000", "--dim", "16", "--clusters", "20", *common, str(tmp_path / "w1")]
        + ["--out", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert set(result["load_average_1_5_15_min"]) == {"start", "end"}
    assert "vectors.npy" in result["files_bytes"] and result["factory"].endswith("x4fs")
    for nprobe in {r["nprobe"] for r in result["rows"]}:
        off, on = (r for r in result["rows"] if r["nprobe"] == nprobe)
        assert (off["k_factor"], on["k_factor"]) == (0, 8)
        assert on["recall_at_10"] >= off["recall_at_10"] and off["qps_vs_no_refine"] == 1.0

    vectors = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3))
    writer = StoreWriter(tmp_path / "store", "t", {"model": "t", "layer": "pooled"}, 2000)
    writer.prepare()
    rows = list(range(2000))
    writer.write_shard(0, vectors, rows, [], rows, [])
    writer.finish(2000)
    real = refine.main(["--store", str(tmp_path / "store"), *common, str(tmp_path / "w2")])
    assert real["data"].startswith(f"real store {tmp_path / 'store'}: 1960 indexed x 16")
    assert len(real["rows"]) == 2 * len({r["nprobe"] for r in real["rows"]})


@pytest.mark.slow
def test_index_scale_runs_end_to_end(scale, tmp_path) -> None:
    """Each build in its own process: the exact baselines and one kind, both implementations."""
    result = scale.main(
        ["index", "--vectors", "3000", "--dim", "16", "--clusters", "20", "--queries", "30"]
        + ["--kinds", "ivf", "--work", str(tmp_path), "--out", str(tmp_path / "out.json")]
    )
    impls = [(r["kind"], r["impl"]) for r in result["rows"]]
    assert impls == [
        ("none", "baseline"),
        ("flat", "smi-hub"),
        ("flat", "faiss"),
        ("ivf", "smi-hub"),
        ("ivf", "faiss"),
    ]
    assert all(r["recall_at_10"] == 1.0 for r in result["rows"] if r["kind"] == "flat")
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == result["rows"]
