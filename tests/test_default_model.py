"""The embedded default model (issue: model zoo v0): ships in the package, loads offline with
its sha256 checked, and its features are far better than a random backbone's."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.fileio import sha256_file
from smi_hub.index import EmbeddingIndex
from smi_hub.registry import DEFAULT_MODEL, REGISTRY


@pytest.fixture(scope="module")
def entry():
    e = REGISTRY[DEFAULT_MODEL]
    assert e.available, f"{e.weights_folder} must ship with the package"
    return e


def test_default_ships_small_and_pinned(entry):
    weights = entry.weights_folder / "model.safetensors"
    assert weights.stat().st_size < 5_000_000
    assert entry.sha256 == sha256_file(weights)
    cfg = json.loads((entry.weights_folder / "config.json").read_text())
    assert cfg["weights_sha256"] == entry.sha256
    assert cfg["training"]["loss"] == "smi"
    assert "knn" in json.dumps(cfg["results"])
    card = (entry.weights_folder / "README.md").read_text()
    assert "library_name: smi-hub" in card


def test_default_card_is_what_its_config_renders(entry):
    """The shipped model card (metrics, datasets, usage) cannot drift from config.json."""
    from smi_hub.model_card import render_model_card

    cfg = json.loads((entry.weights_folder / "config.json").read_text())
    card = (entry.weights_folder / "README.md").read_text()
    assert card == render_model_card(cfg, name=entry.name)


def test_default_loads_offline(entry, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = smi_hub.load()
    assert model.config["arch"] == "resnet18" and not model.training
    assert not (tmp_path / "empty-cache").exists()  # nothing downloaded or cached


def test_default_refuses_a_tampered_file(entry, tmp_path, monkeypatch):
    import shutil

    from smi_hub import registry
    from smi_hub.errors import WeightsError

    fake_root = tmp_path / "weights"
    shutil.copytree(entry.weights_folder, fake_root / DEFAULT_MODEL)
    path = fake_root / DEFAULT_MODEL / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(registry, "WEIGHTS_ROOT", fake_root)
    with pytest.raises(WeightsError, match="sha256"):
        smi_hub.load()


def _knn_accuracy(model, train_idx, test_idx, images, labels, test_images, test_labels, k=20):
    def feats(arr, idx):
        pils = [Image.fromarray(arr[i], mode="L") for i in idx]
        return smi_hub.extract_features(model, pils, batch_size=256, progress=False).features

    index = EmbeddingIndex().add(feats(images, train_idx), labels=labels[train_idx].tolist())
    found = index.search(feats(test_images, test_idx), k=k)
    votes = [np.bincount(np.asarray(row), minlength=10).argmax() for row in found.labels]
    return 100.0 * float(np.mean(np.asarray(votes) == test_labels[test_idx]))


@pytest.mark.slow
def test_default_features_beat_a_random_backbone(entry):
    """k-NN on a held-out slice of the test split: random or collapsed weights would fail."""
    torch.manual_seed(0)
    images, labels = fashion_mnist.load_arrays("train")
    test_images, test_labels = fashion_mnist.load_arrays("test")
    rng = np.random.default_rng(0)
    train_idx = rng.choice(len(labels), 3000, replace=False)
    test_idx = rng.choice(len(test_labels), 1000, replace=False)
    args = (train_idx, test_idx, images, labels, test_images, test_labels)
    trained = _knn_accuracy(smi_hub.load(), *args)
    random = _knn_accuracy(smi_hub.load(pretrained=False), *args)
    assert trained > random + 4.0, (trained, random)
    assert trained > 75.0, trained
