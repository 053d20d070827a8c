"""SMIModel: shapes of every output for resnet18/34/50 and both stems, equality with torchvision's
ResNet-34/50 for the same weights (ResNet-18 is checked in test_export.py and
test_features.py), save_pretrained/from_pretrained round trips, strict-load errors, and
from_pretrained's errors for repos missing from an offline cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from smi_hub import SMIModel, WeightsError
from smi_hub.models import load_state_dict_strict

FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # at base width 64
EXPANSION = {"resnet18": 1, "resnet34": 1, "resnet50": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one thread is as fast, and far faster on a loaded machine (intra-op
    threads spin-waiting for busy cores made these tests 100x slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, base_width",
    [
        ("resnet18", 8),
        ("resnet34", 8),
        ("resnet50", 8),
        ("resnet18", 64),
        pytest.param("resnet50", 64, marks=pytest.mark.slow),
    ],
)
def test_output_shapes_imagenet_stem(arch, base_width):
    model = SMIModel(arch=arch, base_width=base_width, projector_dims=[32, 24, 16]).eval()
    c = FEATURES[arch] * base_width // 64
    assert model.num_features == c
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 16)
        assert model.embed(x).shape == (2, c)
        assert model.forward_features(x).shape == (2, c, 2, 2)  # stride 32
        inter = model.forward_stages(x, layers=("stem", "layer1", "layer2", "layer3"))
    e = EXPANSION[arch]
    assert list(inter) == ["stem", "layer1", "layer2", "layer3"]
    assert inter["stem"].shape == (2, base_width, 16, 16)  # conv stride 2 + max-pool
    assert inter["layer1"].shape == (2, base_width * e, 16, 16)
    assert inter["layer2"].shape == (2, 2 * base_width * e, 8, 8)
    assert inter["layer3"].shape == (2, 4 * base_width * e, 4, 4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size, spatial", [(28, (28, 28, 14, 7, 4)), (32, (32, 32, 16, 8, 4))])
def test_small_stem_shapes(arch, size, spatial):
    model = SMIModel(arch=arch, base_width=4, small_stem=True, projector_dims=[8], image_size=size)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        inter = model.forward_stages(x, layers=("stem", "layer1", "layer2", "layer3", "layer4"))
        features = model.forward_features(x)
        pooled, out = model.embed(x), model(x)
    e = EXPANSION[arch]
    channels = (4, 4 * e, 8 * e, 16 * e, 32 * e)
    for (name, t), ch, s in zip(inter.items(), channels, spatial, strict=True):
        assert t.shape == (2, ch, s, s), name
    assert torch.equal(features, inter["layer4"])
    assert torch.allclose(pooled, features.mean(dim=(2, 3)), atol=1e-6)
    assert pooled.shape == (2, 32 * e) and out.shape == (2, 8)


def test_intermediates_layers_and_input_errors():
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8]).eval()
    x = torch.randn(1, 3, 28, 28)
    assert list(model.forward_stages(x)) == ["layer1", "layer2", "layer3", "layer4"]
    assert list(model.forward_stages(x, layers=["layer2"])) == ["layer2"]
    assert model.forward_stages(x, layers=[]) == {}
    with pytest.raises(ValueError, match=r"Unknown layers \['layer5'\]"):
        model.forward_stages(x, layers=["layer5"])
    for bad in (torch.randn(3, 28, 28), torch.randn(1, 1, 28, 28), torch.randn(1, 4, 28, 28)):
        with pytest.raises(ValueError, match="B x 3 x H x W"):
            model(bad)


def test_projector_layout_and_backbone_only_model():
    model = SMIModel(arch="resnet18", base_width=4, projector_dims=[16, 12, 8])
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [
        16,
        12,
        8,
    ]
    bare = SMIModel(arch="resnet18", base_width=4, projector_dims=[]).eval()
    assert bare.projector is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bare(x), bare.embed(x))
    assert not any(k.startswith("projector.") for k in model.backbone_state_dict())


def test_constructor_validation_and_config():
    with pytest.raises(ValueError, match="Unknown arch 'resnet101'"):
        SMIModel(arch="resnet101")
    with pytest.raises(ValueError, match="base_width must be a positive"):
        SMIModel(arch="resnet18", base_width=0)
    with pytest.raises(ValueError, match="projector_dims must be positive"):
        SMIModel(arch="resnet18", base_width=4, projector_dims=[8, 0])
    model = SMIModel(arch="resnet34", base_width=4, small_stem=True, projector_dims=(8, 4))
    again = SMIModel(**model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


# --- equality with torchvision ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet34", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_backbone_equals_torchvision(arch):
    torch.manual_seed(0)
    model = SMIModel(arch=arch, projector_dims=[]).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a misplaced tensor would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    tv = getattr(torchvision.models, arch)()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(model.backbone_state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), tv.eval()(x), rtol=1e-4, atol=1e-5)


# --- save_pretrained / from_pretrained ----------------------------------------------------


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("projector_dims", [[16, 8], []])
def test_save_pretrained_round_trip(tmp_path, projector_dims):
    model = SMIModel(
        arch="resnet50",
        base_width=4,
        small_stem=True,
        projector_dims=projector_dims,
        image_size=32,
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.2, 0.2],
    )
    model.train()
    x = torch.randn(4, 3, 32, 32)
    model(x)  # update BN running statistics away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "w", with_projector=True)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["projector_dims"] == projector_dims and cfg["num_features"] == 128
    loaded = SMIModel.from_pretrained(tmp_path / "w", map_location="cpu")
    assert isinstance(loaded, SMIModel) and not loaded.training
    assert loaded.config == model.config and _same(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_strict_load_names_missing_unexpected_and_misshaped_tensors():
    model = SMIModel(arch="resnet18", base_width=4, projector_dims=[8])
    state = dict(model.state_dict())
    del state["layer3.1.bn2.running_var"]
    state["fc.weight"] = torch.zeros(10, 32)
    state["conv1.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(WeightsError) as e:
        load_state_dict_strict(model, state)
    msg = str(e.value)
    assert "missing 1 tensors: layer3.1.bn2.running_var" in msg
    assert "unexpected 1 tensors: fc.weight" in msg
    assert "conv1.weight: file (4, 3, 3, 3) vs model (4, 3, 7, 7)" in msg
    assert "resnet18" in msg and "config.json" in msg
    # long lists are cut after five names
    without_layer4 = {k: v for k, v in model.state_dict().items() if "layer4" not in k}
    with pytest.raises(WeightsError, match=r"missing \d+ tensors: .*\(\+\d+ more\)"):
        load_state_dict_strict(model, without_layer4)


def test_from_pretrained_strict_errors_from_files(tmp_path):
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    folder = tmp_path / "w"
    model.save_pretrained(folder, with_projector=True)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["weights_sha256"]  # edited on purpose: reach the strict key check
    (folder / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(folder / "model.safetensors"))
    state.pop("projector.0.weight")
    state["fc.bias"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        SMIModel.from_pretrained(folder)
    assert "missing 1 tensors: projector.0.weight" in str(e.value)
    assert "unexpected 1 tensors: fc.bias" in str(e.value)
    with pytest.raises(ValueError, match="always load strictly"):
        SMIModel.from_pretrained(folder, strict=False)


def test_from_pretrained_uncached_repo_with_local_files_only(tmp_path):
    with pytest.raises(WeightsError, match="not in the Hugging Face cache"):
        SMIModel.from_pretrained("smi-hub/not-cached", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="neither an existing folder nor a valid"):
        SMIModel.from_pretrained("not a repo id!", local_files_only=True)


@pytest.mark.slow
def test_from_pretrained_offline_with_empty_cache(tmp_path):
    """HF_HUB_OFFLINE=1 is read when huggingface_hub is imported: use a fresh interpreter."""
    script = """
from smi_hub import SMIModel, WeightsError
try:
    SMIModel.from_pretrained("smi-hub/not-cached")
except WeightsError as e:
    print("WeightsError:", e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "empty-hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]  # no LocalEntryNotFoundError traceback
    assert "WeightsError: 'smi-hub/not-cached' is not in the Hugging Face cache" in out.stdout
    assert "HF_HUB_OFFLINE=1" in out.stdout


def test_projector_bias_round_trips_through_a_weights_folder(tmp_path):
    """VICReg's projector has hidden biases: the option must survive save + strict load."""
    from smi_hub.models import load_weights_folder
    from smi_hub.weights import save_weights_folder

    model = SMIModel(
        arch="resnet18", base_width=8, small_stem=True, projector_dims=[32, 16],
        image_size=28, projector_bias=True,
    )  # fmt: skip
    assert model.projector[0].bias is not None
    save_weights_folder(model, tmp_path / "w", with_projector=True)
    loaded = load_weights_folder(tmp_path / "w")
    assert loaded.projector_bias
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
