"""The sharded feature store: equal to in-memory extraction, verified reads, SIGKILL resume to a
byte-identical store, outputs replaced as a set, and every input kind (files, list files,
Hugging Face datasets incl. streaming and with_format("torch"), DatasetDict errors)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import SMIModel, fashion_mnist
from smi_hub.cli import main
from smi_hub.feature_store import FeatureStore, work_folder
from smi_hub.outputs import OutputFolderError
from smi_hub.store_manifest import FeatureStoreError

# 2-20 s each; the store's plumbing stays fast in test_features_mutants.py
pytestmark = pytest.mark.slow

FMNIST = {"image_size": 28, "mean": [0.286] * 3, "std": [0.353] * 3}


@pytest.fixture
def model() -> SMIModel:
    torch.manual_seed(0)
    return SMIModel(arch="resnet18", base_width=4, small_stem=True, **FMNIST).eval()


@pytest.fixture
def gallery(tmp_path) -> Path:
    folder = smi_hub.default_gallery(tmp_path / "gallery", per_class=2)
    (folder / "Bag" / "broken.png").write_bytes(b"not a png")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_store_equals_in_memory_extraction(model, gallery, tmp_path):
    with pytest.warns(RuntimeWarning, match="unreadable"):
        ref = smi_hub.extract_features(model, gallery, batch_size=4, progress=False)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        store = smi_hub.extract_features(
            model, gallery, batch_size=4, progress=False, out=tmp_path / "s", shard_size=6
        )
    assert isinstance(store, FeatureStore)
    assert len(store) == 20 and store.num_inputs == 21 and store.num_shards == 4
    assert store.paths == ref.paths and store.failed == ref.failed
    assert store.failed[0][0].endswith("broken.png")
    # shard k holds inputs [6k, 6k + 6): the broken file (input 4) leaves shard 0 one row short
    assert [s["rows"] for s in store.manifest["shards"]] == [5, 6, 6, 3]
    assert [s["inputs"] for s in store.manifest["shards"]] == [[0, 6], [6, 12], [12, 18], [18, 21]]
    full = store.to_tensor()
    torch.testing.assert_close(full, ref.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(store.read(4, 13), full[4:13])
    assert torch.equal(torch.cat(list(store)), full)
    names = [p.name for p in smi_hub.images.list_images(gallery)]
    assert names.index("broken.png") == 4
    assert store.input_index().tolist() == [i for i in range(21) if i != 4]
    m = store.manifest
    assert m["layer"] == "pooled" and m["row_shape"] == [model.num_features]
    assert m["weights_sha256"] == smi_hub.features.weights_digest(model)
    assert "Normalize" in m["preprocessing"]
    for s in m["shards"]:
        data = (store.folder / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert not work_folder(tmp_path / "s").exists()


def test_flipped_byte_is_refused_on_read(model, gallery, tmp_path):
    with pytest.warns(RuntimeWarning):
        store = smi_hub.extract_features(model, gallery, progress=False, out=tmp_path / "s")
    shard = tmp_path / "s" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError, match="sha256"):
        FeatureStore.open(store.folder).to_tensor()
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(FeatureStoreError, match="wrong size"):
        FeatureStore.open(store.folder)


def test_outputs_replaced_as_a_set(model, gallery, tmp_path):
    out = tmp_path / "s"
    with pytest.warns(RuntimeWarning):
        first = smi_hub.extract_features(
            model, gallery, progress=False, out=out, shard_size=4, npy=True
        )
    assert np.array_equal(np.load(out / "features.npy"), first.to_tensor().numpy())
    files = [str(p) for p in sorted(gallery.rglob("*.png")) if "broken" not in p.name][:5]
    second = smi_hub.extract_features(model, files, progress=False, out=out, shard_size=4)
    # the new set only: no stale features.npy, no shard of the first run
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert second.paths == files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="notes.txt"):
        smi_hub.extract_features(model, files, progress=False, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        smi_hub.extract_features(model, files, progress=False, out=tmp_path / "afile")


def test_other_arguments_start_over(model, gallery, tmp_path):
    out = tmp_path / "s"
    work = work_folder(out)
    work.mkdir()
    (work / "fingerprint.json").write_text(json.dumps({"fingerprint": "another run"}))
    (work / "shard-00000.safetensors").write_bytes(b"stale")
    files = [str(p) for p in sorted(gallery.rglob("*.png")) if "broken" not in p.name]
    with pytest.warns(RuntimeWarning, match="starting over"):
        store = smi_hub.extract_features(model, files, progress=False, out=out, shard_size=8)
    ref = smi_hub.extract_features(model, files, progress=False, out=tmp_path / "ref", shard_size=8)
    assert _files(out) == _files(ref.folder) and len(store) == 20


_CHILD = """
import os, sys, time
import numpy as np, torch
from PIL import Image
import smi_hub
from smi_hub import SMIModel, fashion_mnist

class Photos(torch.utils.data.Dataset):
    # real Fashion-MNIST test images; with BLOCK_AT set, item BLOCK_AT never arrives
    def __init__(self):
        self.images, self.labels = fashion_mnist.load_arrays("test")
    def __len__(self):
        return 40
    def __getitem__(self, i):
        if i == int(os.environ.get("BLOCK_AT", "-1")):
            time.sleep(3600)
        return Image.fromarray(self.images[i]), int(self.labels[i])

torch.manual_seed(0)
model = SMIModel(arch="resnet18", base_width=4, small_stem=True, image_size=28,
                 mean=[0.286] * 3, std=[0.353] * 3).eval()
smi_hub.extract_features(model, Photos(), batch_size=3, out=sys.argv[1], shard_size=8,
                         progress=False)
"""


@pytest.mark.slow
def test_sigkill_resume_ends_byte_identical(model, gallery, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, ref = tmp_path / "out", tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(ref)], env=env, check=True, timeout=600)
    with pytest.warns(RuntimeWarning):  # an earlier store in the output folder
        old = smi_hub.extract_features(model, gallery, progress=False, out=out, npy=True)
    old_files = _files(out)

    # first run: blocks on input 20 (shard 2) after finishing shards 0 and 1, then SIGKILL
    child = subprocess.Popen([sys.executable, str(script), str(out)], env={**env, "BLOCK_AT": "20"})
    marker = work_folder(out) / "shard-00001.safetensors.json"
    deadline = time.monotonic() + 600
    while not marker.is_file() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert marker.is_file(), "the child never finished shard 1"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    # readers still get the earlier store, whole: never a mix of old and new files
    assert _files(out) == old_files and FeatureStore.open(out).paths == old.paths
    done_inode = (work_folder(out) / "shard-00000.safetensors").stat().st_ino

    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, timeout=600)
    assert _files(out) == _files(ref)  # byte-identical to the uninterrupted run
    assert (out / "shard-00000.safetensors").stat().st_ino == done_inode  # not recomputed
    assert not work_folder(out).exists()
    store = FeatureStore.open(out)
    _, labels = fashion_mnist.load_arrays("test")
    assert store.labels().tolist() == labels[:40].tolist() and store.paths == list(range(40))


def _hf_dataset(n: int = 12) -> datasets.Dataset:
    images, labels = fashion_mnist.load_arrays("test")
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(images[i]) for i in range(n)], "label": labels[:n].tolist()}
    )


def test_hf_inputs_streaming_torch_format_and_splits(model, tmp_path):
    ds = _hf_dataset()
    plain = smi_hub.extract_features(model, ds, batch_size=5, progress=False)
    assert plain.paths == list(range(12)) and plain.labels.tolist() == ds["label"]
    torch_fmt = smi_hub.extract_features(
        model, ds.with_format("torch"), batch_size=5, progress=False
    )
    torch.testing.assert_close(torch_fmt.features, plain.features)  # preprocessed, not raw uint8
    stream = smi_hub.extract_features(model, ds.to_iterable_dataset(), batch_size=5, progress=False)
    torch.testing.assert_close(stream.features, plain.features)
    s1 = smi_hub.extract_features(
        model, ds, batch_size=5, progress=False, out=tmp_path / "a", shard_size=5
    )
    s2 = smi_hub.extract_features(
        model,
        ds.to_iterable_dataset().with_format("torch"),
        batch_size=5,
        progress=False,
        out=tmp_path / "b",
        shard_size=5,
    )
    assert torch.equal(s1.to_tensor(), s2.to_tensor()) and s1.paths == s2.paths
    assert s2.manifest["inputs"] == 12 and s2.num_shards == 3
    assert s1.labels().tolist() == ds["label"]

    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(4))})
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\].*--split test"):
        smi_hub.extract_features(model, dd, progress=False)
    dd.save_to_disk(str(tmp_path / "dd"))
    weights = smi_hub.save_weights_folder(model, tmp_path / "w")
    args = ["extract", str(tmp_path / "dd"), "-o", str(tmp_path / "c"), "--model", str(weights)]
    assert main(args) == 1
    assert main([*args, "--split", "valid"]) == 1
    assert main([*args, "--split", "test", "--shard-size", "3"]) == 0
    store = FeatureStore.open(tmp_path / "c")
    torch.testing.assert_close(store.to_tensor(), plain.features[:4])


def test_list_file_input(model, gallery, tmp_path):
    files = sorted(p for p in gallery.rglob("*.png") if "broken" not in p.name)[:6]
    listing = tmp_path / "list.txt"
    rel = [os.path.relpath(p, tmp_path) for p in files]
    listing.write_text(
        "# my photos\n" + "\n".join(rel[:3]) + "\n\n" + "\n".join(map(str, files[3:]))
    )
    store = smi_hub.extract_features(model, listing, progress=False, out=tmp_path / "s")
    assert store.paths == [str(tmp_path / r) for r in rel[:3]] + [str(f) for f in files[3:]]
    ref = smi_hub.extract_features(model, files, progress=False)
    torch.testing.assert_close(store.to_tensor(), ref.features)


@pytest.mark.slow
def test_cli_index_and_search_a_store(model, gallery, tmp_path, capsys):
    weights = smi_hub.save_weights_folder(model, tmp_path / "w")
    store_dir, idx = tmp_path / "store", tmp_path / "idx"
    with pytest.warns(RuntimeWarning):
        assert main(["extract", str(gallery), "-o", str(store_dir), "--model", str(weights)]) == 0
    for kind in ("ivf", "hnsw", "auto"):
        assert main(["index", str(store_dir), "-o", str(idx), "--kind", kind]) == 0
        out = capsys.readouterr().out
        assert "Indexed 20 images" in out and ("recall@10" in out) == (kind != "auto")
        query = sorted(p for p in gallery.rglob("*.png") if "broken" not in p.name)[7]
        assert main(["search", str(idx), str(query), "-k", "3", "--nprobe", "1"]) == 0
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("   1.")]
        assert lines[0].split()[2] == str(query)  # the query finds itself first
    assert smi_hub.EmbeddingIndex.load(idx).kind == "flat"  # auto: exact at this size


def test_add_embeddings_round_trip_with_an_unreadable_row(model, tmp_path):
    ds = _hf_dataset(10)
    paths = [str(tmp_path / f"{i}.png") for i in range(10)]
    for i, p in enumerate(paths):
        ds[i]["image"].save(p)
    Path(paths[3]).write_bytes(b"broken")  # row 3 cannot be read
    # an image column of paths, read at extraction: row 3 fails there
    files = datasets.Dataset.from_dict({"image": paths, "label": ds["label"]})
    with pytest.warns(RuntimeWarning, match="unreadable"):
        store = smi_hub.extract_features(model, files, progress=False, out=tmp_path / "s")
    assert store.input_index().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    out = smi_hub.add_embeddings(files, store)
    assert out["label"] == ds["label"] and out[3]["embeddings"] is None
    ref = torch.nn.functional.normalize(smi_hub.extract_features(model, paths[:3]).features)
    for i in range(3):  # row i holds image i: no shift around the missing row
        np.testing.assert_allclose(out[i]["embeddings"], ref[i].numpy(), atol=1e-6)
    later = torch.nn.functional.normalize(store.read(3, 4))[0].numpy()
    np.testing.assert_allclose(out[4]["embeddings"], later, atol=1e-6)

    out.to_parquet(str(tmp_path / "x.parquet"))
    back = datasets.Dataset.from_parquet(str(tmp_path / "x.parquet"))
    assert back[3]["embeddings"] is None and back[5]["embeddings"] == out[5]["embeddings"]

    with pytest.raises(ValueError):  # datasets' faiss index cannot hold a null row
        out.add_faiss_index("embeddings")
    ready = smi_hub.add_embeddings(files, store, drop_missing=True)
    assert len(ready) == 9 and ready["label"] == [ds["label"][i] for i in range(10) if i != 3]
    ready.add_faiss_index("embeddings")
    _, found = ready.get_nearest_examples("embeddings", np.asarray(out[6]["embeddings"]), k=1)
    assert found["image"] == [paths[6]]
    with pytest.raises(smi_hub.SMIHubError, match="9 rows"):
        smi_hub.add_embeddings(files.select(range(9)), store)
