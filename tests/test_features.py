"""extract_features against an independent torchvision forward of the same weights."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

import smi_hub
from smi_hub import SMIModel


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model() -> SMIModel:
    torch.manual_seed(0)
    m = SMIModel(arch="resnet18", base_width=8, projector_dims=[32, 16], image_size=32)
    return m.eval()


def torchvision_reference(model: SMIModel) -> torch.nn.Module:
    """torchvision's own ResNet-18 (width 8 via width_per_group is not possible for
    BasicBlock, so rebuild the stages from torchvision's classes) loaded strictly."""
    net = torchvision.models.resnet18()
    # shrink torchvision's ResNet to base width 8 with torchvision's own _make_layer
    net.inplanes = 8
    net.conv1 = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(8)
    block = torchvision.models.resnet.BasicBlock
    net.layer1 = net._make_layer(block, 8, 2)
    net.layer2 = net._make_layer(block, 16, 2, stride=2)
    net.layer3 = net._make_layer(block, 32, 2, stride=2)
    net.layer4 = net._make_layer(block, 64, 2, stride=2)
    net.fc = torch.nn.Identity()
    net.load_state_dict(model.backbone_state_dict(), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "chelsea", "coffee", "camera", "coins", "rocket"]
    for name in names:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    Image.fromarray(data.astronaut()).convert("RGBA").save(folder / "sub_rgba.png")
    return folder


@pytest.mark.slow
def test_folder_matches_torchvision_forward(model, photos):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    try:
        with pytest.warns(RuntimeWarning, match="Skipped 1 unreadable"):
            result = smi_hub.extract_features(model, photos, batch_size=3, progress=False)
    finally:
        (photos / "broken.jpg").unlink()
    files = sorted(p for p in photos.iterdir() if p.suffix == ".png")
    assert result.paths == [str(p) for p in files]
    assert [p for p, _ in result.failed] == [str(photos / "broken.jpg")]
    assert "not a readable image" in result.failed[0][1]
    tfm = smi_hub.get_transforms(model)
    batch = torch.stack([tfm(Image.open(p)) for p in files])
    with torch.no_grad():
        ref = torchvision_reference(model)(batch)
    assert result.features.shape == (len(files), 64)
    assert torch.allclose(result.features, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_inputs_agree(model, photos):
    files = sorted(photos.glob("*.png"))
    by_folder = smi_hub.extract_features(model, photos, progress=False)
    by_list = smi_hub.extract_features(model, list(reversed(files)), progress=False)
    assert by_list.paths == [str(p) for p in reversed(files)]
    assert torch.allclose(by_list.features.flip(0), by_folder.features, atol=1e-6)
    pils = [Image.open(p) for p in files]
    by_pil = smi_hub.extract_features(model, pils, progress=False)
    assert by_pil.paths == list(range(len(files)))
    assert torch.allclose(by_pil.features, by_folder.features, atol=1e-6)
    tfm = smi_hub.get_transforms(model)
    tensor = torch.stack([tfm(p) for p in pils])
    by_tensor = smi_hub.extract_features(model, tensor, batch_size=4, progress=False)
    assert torch.allclose(by_tensor.features, by_folder.features, atol=1e-6)
    one = smi_hub.extract_features(model, files[0], progress=False)
    assert torch.allclose(one.features[0], by_folder.features[0], atol=1e-6)


@pytest.mark.slow
def test_torch_and_hf_datasets(model, fmnist_test):
    images, labels = fmnist_test
    ds = smi_hub.fashion_mnist.FashionMNIST("test", indices=range(20))
    result = smi_hub.extract_features(model, ds, batch_size=8, num_workers=2, progress=False)
    assert result.labels.tolist() == labels[:20].tolist()
    tfm = smi_hub.get_transforms(model)
    batch = torch.stack([tfm(Image.fromarray(images[i])) for i in range(20)])
    with torch.no_grad():
        assert torch.allclose(result.features, model.embed(batch), atol=1e-5)

    hf = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(images[i]) for i in range(20)], "label": labels[:20].tolist()},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    by_hf = smi_hub.extract_features(model, hf, progress=False)
    assert torch.allclose(by_hf.features, result.features, atol=1e-6)
    assert by_hf.labels.tolist() == labels[:20].tolist()


def test_layers(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        inter = model.forward_stages(x)
        proj = model(x)
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        out = smi_hub.extract_features(model, x, layer=layer, progress=False).features
        assert torch.allclose(out, inter[layer], atol=1e-5), layer
    spatial = smi_hub.extract_features(model, x, layer="spatial", progress=False).features
    assert torch.allclose(spatial, inter["layer4"], atol=1e-5)
    pooled = smi_hub.extract_features(model, x, layer="pooled", progress=False).features
    assert torch.allclose(pooled, inter["layer4"].mean(dim=(2, 3)), atol=1e-5)
    out = smi_hub.extract_features(model, x, layer="projector", progress=False).features
    assert torch.allclose(out, proj, atol=1e-5)
    with pytest.raises(ValueError, match="layer must be"):
        smi_hub.extract_features(model, x, layer="fc")
    bare = SMIModel(arch="resnet18", base_width=4, projector_dims=[], image_size=32).eval()
    with pytest.raises(ValueError, match="with-projector"):
        smi_hub.extract_features(bare, x, layer="projector")


@pytest.mark.slow
def test_channels_last_and_bf16(model):
    x = torch.randn(4, 3, 32, 32)
    ref = smi_hub.extract_features(model, x, progress=False).features
    cl = smi_hub.extract_features(model, x, channels_last=True, progress=False).features
    assert torch.allclose(cl, ref, atol=1e-4)
    assert model.conv1.weight.is_contiguous()  # the model's layout is restored
    bf = smi_hub.extract_features(model, x, amp_dtype=torch.bfloat16, progress=False).features
    assert bf.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(bf, ref, dim=1)
    assert cos.min() > 0.98


def test_bad_inputs(model, tmp_path):
    with pytest.raises(FileNotFoundError):
        smi_hub.extract_features(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="no image files"):
        smi_hub.extract_features(model, tmp_path)
    with pytest.raises(TypeError):
        smi_hub.extract_features(model, 42)
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning):
        result = smi_hub.extract_features(model, tmp_path, progress=False)
    assert result.features.shape == (0, 64) and len(result.failed) == 1


def test_default_gallery(tmp_path, fmnist_test):
    images, labels = fmnist_test
    g = smi_hub.default_gallery(tmp_path / "g", per_class=2)
    files = sorted(g.rglob("*.png"))
    assert len(files) == 20
    assert {p.parent.name for p in files} == {
        smi_hub.gallery.class_dirname(c) for c in smi_hub.fashion_mnist.CLASSES
    }
    for p in files:
        i = int(p.stem)
        assert np.array_equal(np.asarray(Image.open(p)), images[i])
        assert smi_hub.gallery.label_of(p) == smi_hub.fashion_mnist.CLASSES[labels[i]]
    mtime = files[0].stat().st_mtime_ns
    assert smi_hub.default_gallery(tmp_path / "g", per_class=2) == g  # reused, not rebuilt
    assert files[0].stat().st_mtime_ns == mtime


def test_default_gallery_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        smi_hub.default_gallery(tmp_path / "g2", per_class=1)


@pytest.mark.slow
def test_inputs_are_fingerprinted_only_for_a_feature_store(model, photos, tmp_path, monkeypatch):
    """The fingerprint (sha256 of a tensor's bytes or of every PIL image, a stat of every file)
    only serves resuming a store: without ``out`` it must not be computed. On an H200 hashing
    the 1.2 GB input tensor made extract_features 5x slower than a plain forward."""
    import smi_hub.feature_sources as feature_sources

    files = sorted(photos.glob("*.png"))
    pils = [Image.open(p) for p in files]
    tensor = torch.stack([smi_hub.get_transforms(model)(p) for p in pils])
    calls: list[str] = []
    for name in ("_tensor_digest", "_images_digest", "_file_fingerprint"):
        real = getattr(feature_sources, name)
        monkeypatch.setattr(
            feature_sources,
            name,
            lambda data, name=name, real=real: calls.append(name) or real(data),
        )
    for inputs in (tensor, pils, files, photos):
        smi_hub.extract_features(model, inputs, progress=False)
    assert calls == []
    smi_hub.extract_features(model, tensor, out=tmp_path / "store", progress=False)
    assert calls == ["_tensor_digest"]
