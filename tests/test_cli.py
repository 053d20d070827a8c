"""The smi-hub command line, end to end on small real data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import smi_hub
from smi_hub import SMIModel
from smi_hub.cli import main

FMNIST = {"image_size": 28, "mean": [0.286] * 3, "std": [0.353] * 3}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    m = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8], **FMNIST)
    return smi_hub.save_weights_folder(m.eval(), tmp_path / "tiny")


@pytest.fixture
def gallery(tmp_path) -> Path:
    return smi_hub.default_gallery(tmp_path / "gallery", per_class=2)


def test_list_and_info(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in smi_hub.list_models():
        assert name in out
    assert "not published" in out
    assert main(["info", "smi_resnet50_imagenet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"] == "training/configs/imagenet_resnet50_smi.yaml"
    assert info["preprocessing"]["resize"] == 256
    assert main(["info", "nope"]) == 1
    assert "known models" in capsys.readouterr().err


def test_extract(weights, gallery, tmp_path, capsys):
    (gallery / "broken.png").write_bytes(b"x")
    out = tmp_path / "feats"
    with pytest.warns(RuntimeWarning, match="unreadable"):
        code = main(["extract", str(gallery), "-o", str(out), "--model", str(weights), "--npy"])
    assert code == 0
    store = smi_hub.FeatureStore.open(out)
    feats = store.to_tensor()
    assert feats.shape == (20, 32) and len(store.paths) == 20
    assert store.failed[0][0].endswith("broken.png")
    assert np.allclose(np.load(out / "features.npy"), feats.numpy())
    ref = smi_hub.extract_features(smi_hub.load(weights), store.paths, progress=False)
    assert torch.allclose(ref.features, feats, atol=1e-6)
    assert "1 unreadable" in capsys.readouterr().out


def test_index_and_search(weights, gallery, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["index", str(gallery), "-o", str(idx), "--model", str(weights)]) == 0
    query = sorted(gallery.rglob("*.png"))[5]
    assert main(["search", str(idx), str(query), "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.strip().startswith("1.")]
    assert lines and lines[0].split()[1] == "1.0000" and lines[0].split()[2] == str(query)
    assert len([line for line in out if line.startswith("  ")]) == 3


def test_export_cli(weights, tmp_path, capsys, run_checkpoint):
    ckpt = run_checkpoint(smi_hub.load(weights))
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--with-projector"]) == 0
    assert "sha256" in capsys.readouterr().out
    assert smi_hub.load(tmp_path / "out").projector_dims == [8]
    (tmp_path / "bad.pt").write_bytes(b"nope")
    assert main(["export", str(tmp_path / "bad.pt"), str(tmp_path / "o2")]) == 1
    assert "is not a torch checkpoint archive" in capsys.readouterr().err


def test_demo_without_checkout(monkeypatch, tmp_path, capsys):
    import smi_hub.cli_demo as cli_demo

    monkeypatch.setattr(cli_demo, "demo_app_path", lambda: tmp_path / "demo" / "app.py")
    assert main(["demo"]) == 1
    assert "the demo needs a source checkout" in capsys.readouterr().err.lower()


def test_demo_forwards_arguments(demo_argv):
    assert main(["demo", "--model", "m", "--port", "7861", "--host", "0.0.0.0"]) == 0
    assert demo_argv() == ["--model", "m", "--port", "7861", "--host", "0.0.0.0"]


@pytest.mark.slow
def test_quickstart(weights, capsys, fmnist_test):
    code = main(["quickstart", "--model", str(weights), "--per-class", "3", "--eval", "40"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("query: test image") == 3
    assert "5-NN majority-vote accuracy on 40 held-out" in out
    acc = float(out.split("accuracy on 40 held-out Fashion-MNIST test images: ")[1].split("%")[0])
    assert 0.0 <= acc <= 100.0 and (acc * 40 / 100) == pytest.approx(round(acc * 40 / 100))
    # gallery and held-out queries are disjoint test images
    gallery = Path(out.split("Gallery: ")[1].split(" (")[0])
    in_gallery = {int(p.stem) for p in gallery.rglob("*.png")}
    queried = {
        int(line.split("test image ")[1].split()[0])
        for line in out.splitlines()
        if "query:" in line
    }
    assert not in_gallery & queried


@pytest.mark.slow
def test_quickstart_default_model_is_well_above_chance(capsys):
    assert main(["quickstart", "--per-class", "10", "--eval", "100"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("accuracy on 100 held-out Fashion-MNIST test images: ")[1].split("%")[0])
    assert acc >= 60.0  # 10 classes: chance is 10 %, collapsed features score about 10 %


def test_quickstart_without_default(capsys, monkeypatch, tmp_path):
    # an install whose package lost its weights folder
    monkeypatch.setattr(smi_hub.registry, "WEIGHTS_ROOT", tmp_path)
    assert not smi_hub.registry.REGISTRY["smi_resnet18_fmnist"].available
    assert main(["quickstart"]) == 1
    assert "embedded default weights" in capsys.readouterr().err


def test_console_entry_point_exists():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("smi-hub") == "smi_hub.cli:main"
    assert (Path(sys.executable).parent / "smi-hub").is_file()  # installed next to python
