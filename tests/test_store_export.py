"""Feature store -> embeddings.npy + metadata.parquet (+ clip-retrieval/autofaiss shards), read
back with numpy, pyarrow and ``datasets.load_dataset("parquet")``, on real Fashion-MNIST
photos with one unreadable file."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.cli import main as cli_main
from smi_hub.errors import SMIHubError

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Skipped"),
]


@pytest.fixture
def store(tmp_path):
    x, y = fashion_mnist.load_arrays("test")
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in x[:23]],
                                     "label": [int(v) for v in y[:23]]})  # fmt: skip
    ds = ds.cast_column("image", datasets.Image())
    return smi_hub.extract_features(smi_hub.load(), ds, out=tmp_path / "store", shard_size=10,
                                    progress=False), y[:23]  # fmt: skip


def test_export_reads_back_with_numpy_parquet_and_datasets(tmp_path, store):
    store, y = store
    out = smi_hub.export_store(store, tmp_path / "exp", shards=True)
    emb = np.load(out / "embeddings.npy", mmap_mode="r")
    want = store.to_tensor().numpy()
    assert emb.dtype == np.float32 and emb.shape == want.shape == (23, 128)
    np.testing.assert_array_equal(emb, want)
    meta = datasets.load_dataset("parquet", data_files=str(out / "metadata.parquet"))["train"]
    assert meta["id"] == list(range(23)) and meta["input_index"] == list(range(23))
    assert meta["label"] == [int(v) for v in y] and meta["path"] == [str(i) for i in range(23)]
    # clip-retrieval / autofaiss layout: one npy + parquet per store shard, same numbering
    npys = sorted((out / "img_emb").glob("*.npy"))
    parts = sorted((out / "metadata").glob("*.parquet"))
    assert [p.stem.split("_")[-1] for p in npys] == [p.stem.split("_")[-1] for p in parts]
    assert len(npys) == 3
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in npys]), want)
    ids = np.concatenate([pq.read_table(p)["id"].to_numpy() for p in parts])
    assert ids.tolist() == list(range(23))


def test_export_normalize_cli_and_output_rules(tmp_path, store, capsys):
    store, _ = store
    out = tmp_path / "exp"
    assert cli_main(["export-features", str(store.folder), "--to", str(out), "--normalize"]) == 0
    assert "23 x 128" in capsys.readouterr().out
    emb = np.load(out / "embeddings.npy")
    want = torch.nn.functional.normalize(store.to_tensor(), dim=1).numpy()
    np.testing.assert_allclose(emb, want, atol=1e-6)
    assert not (out / "img_emb").exists()
    with pytest.raises(SMIHubError, match="overwrite=True"):
        smi_hub.export_store(store, out)
    smi_hub.export_store(store, out, overwrite=True)  # an earlier export may be replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(SMIHubError, match="not written by export_store"):
        smi_hub.export_store(store, mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "mine"
    assert cli_main(["export-features", str(store.folder), "--to", str(mine)]) == 1


def test_export_keeps_rows_of_a_store_with_an_unreadable_file(tmp_path):
    x, _ = fashion_mnist.load_arrays("test")
    files = []
    for i in range(6):
        files.append(tmp_path / "img" / f"{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(x[i]).save(files[-1])
    files[2].write_bytes(b"broken")
    store = smi_hub.extract_features(smi_hub.load(), files, out=tmp_path / "s", progress=False)
    out = smi_hub.export_store(store.folder, tmp_path / "e")
    table = pq.read_table(out / "metadata.parquet").to_pydict()
    assert table["input_index"] == [0, 1, 3, 4, 5] and table["id"] == [0, 1, 2, 3, 4]
    assert table["path"] == [str(files[i]) for i in (0, 1, 3, 4, 5)]
    assert "label" not in table
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), store.to_tensor().numpy())
