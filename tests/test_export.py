"""smi-hub export: training checkpoint -> weights folder that torchvision and timm load strictly."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

import smi_hub
from smi_hub import CheckpointError, SMIModel
from smi_hub.export import export_checkpoint

TRAIN_CONFIG = {
    "output_dir": "runs/x",
    "seed": 3,
    "loss": {"name": "smi", "kwargs": {"lambd": 0.5}},
    "data": {"source": "fashion_mnist", "split": "train"},
    "train": {"epochs": 5, "batch_size": 256, "optimizer": "lars", "lr": 2.0},
}


def write_checkpoint(run_dir, model: SMIModel, **override):
    """A checkpoint as training/ writes it (plain dicts and tensors, weights_only-loadable)."""
    path = run_dir / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "smi-hub-checkpoint",
        "version": 1,
        "model": model.state_dict(),
        "model_config": model.config,
        "config": TRAIN_CONFIG,
        "epoch": 5,
        "step": 1170,
        "optimizer": {"state": {}, "param_groups": []},
    }
    state.update(override)
    torch.save(state, path)
    return path


@pytest.fixture
def r18():
    torch.manual_seed(0)
    m = SMIModel(arch="resnet18", projector_dims=[64, 32], image_size=64).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
    return m


@pytest.mark.slow
def test_export_and_load_into_torchvision_and_timm(tmp_path, r18):
    ckpt = write_checkpoint(tmp_path / "run", r18)
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "knn.json").write_text(
        json.dumps({"protocol": "knn", "dataset": "fashion_mnist", "metrics": {"top1": 81.5}})
    )
    extra = tmp_path / "linear.json"
    extra.write_text(
        json.dumps(
            {
                "protocol": "linear",
                "dataset": "fashion_mnist",
                "metrics": {"top1": 85.0, "top5": 99.1},
            }
        )
    )
    out = export_checkpoint(ckpt, tmp_path / "w", results_files=[extra], name="r18-test")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["results"] == {"knn_top1": 81.5, "linear_top1": 85.0, "linear_top5": 99.1}
    t = cfg["training"]
    assert (t["loss"], t["dataset"], t["epochs"], t["batch_size"], t["optimizer"]) == (
        "smi",
        "fashion_mnist",
        5,
        256,
        "lars",
    )
    assert t["step"] == 1170 and t["evaluation_datasets"] == {
        "knn": "fashion_mnist",
        "linear": "fashion_mnist",
    }
    assert cfg["projector_dims"] == []
    card = (out / "README.md").read_text()
    assert "# r18-test" in card and "knn_top1" in card

    state = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("projector.") for k in state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = r18.embed(x)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
    tm.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), expected, atol=1e-5)
        assert torch.allclose(tm.eval()(x), expected, atol=1e-5)
    loaded = smi_hub.load(out)
    with torch.no_grad():
        assert torch.allclose(loaded.embed(x), expected, atol=1e-6)


@pytest.mark.slow
def test_export_with_projector(tmp_path, r18):
    ckpt = write_checkpoint(tmp_path / "run", r18)
    out = export_checkpoint(ckpt, tmp_path / "wp", with_projector=True)
    loaded = smi_hub.load(out)
    assert loaded.projector_dims == [64, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), r18(x), atol=1e-5)


@pytest.mark.slow
def test_export_errors(tmp_path, r18):
    with pytest.raises(CheckpointError, match="not found"):
        export_checkpoint(tmp_path / "none.pt", tmp_path / "o")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint archive"):
        export_checkpoint(junk, tmp_path / "o")
    plain = tmp_path / "plain.pt"
    torch.save(r18.state_dict(), plain)  # a bare state_dict: no format tag
    with pytest.raises(CheckpointError, match="not an smi-hub training checkpoint"):
        export_checkpoint(plain, tmp_path / "o")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "smi-hub-checkpoint", "odd": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(CheckpointError, match="non-tensor Python objects"):
        export_checkpoint(pickled, tmp_path / "o")
    ckpt = write_checkpoint(tmp_path / "r2", r18, model_config=None)
    with pytest.raises(CheckpointError, match="must be dicts"):
        export_checkpoint(ckpt, tmp_path / "o")
    state = torch.load(ckpt, weights_only=True)
    del state["model"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"lacks the keys \['model'\]"):
        export_checkpoint(ckpt, tmp_path / "o")
    ckpt = write_checkpoint(tmp_path / "r3", r18, version=7)
    with pytest.raises(CheckpointError, match="version 7"):
        export_checkpoint(ckpt, tmp_path / "o")
    wrong = write_checkpoint(tmp_path / "r4", r18, model_config={**r18.config, "arch": "resnet34"})
    with pytest.raises(smi_hub.WeightsError, match="resnet34"):
        export_checkpoint(wrong, tmp_path / "o")
    bad_result = tmp_path / "bad.json"
    bad_result.write_text(json.dumps({"metrics": {"top1": 1}}))
    ok = write_checkpoint(tmp_path / "r5", r18)
    with pytest.raises(CheckpointError, match="'protocol'"):
        export_checkpoint(ok, tmp_path / "o", results_files=[bad_result])


@pytest.mark.slow
def test_smi_hub_never_imports_training():
    import subprocess
    import sys

    code = (
        "import sys, smi_hub, smi_hub.cli, smi_hub.export; "
        "bad = [m for m in sys.modules if m == 'training' or m.startswith('training.') "
        "or m.split('.')[0] in ('faiss', 'gradio', 'datasets')]; print(bad); assert not bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
