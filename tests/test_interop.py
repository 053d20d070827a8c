"""Weights that torchvision, timm and the Hugging Face Hub take without glue: strict loads of
save_pretrained output, timm's data config and pretrained-file loading, forward_intermediates /
forward_head with timm's contract, deterministic weights bytes, provenance and the model card,
push_to_hub's uploads, and a wheel without a top-level ``training`` package."""

from __future__ import annotations

import ast
import configparser
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import skimage.data
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

import smi_hub
from smi_hub import SMIModel, fashion_mnist
from smi_hub.weights import safetensors_bytes

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch: str, **kw) -> SMIModel:
    """A standard-layout model with non-trivial BatchNorm statistics (a misplaced tensor shows)."""
    torch.manual_seed(0)
    m = SMIModel(arch=arch, projector_dims=[32, 16], image_size=64, **kw).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


# --- strict loads into torchvision and timm -----------------------------------------------


@pytest.mark.parametrize(
    "arch",
    [
        "resnet18",
        pytest.param("resnet34", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
    ],
)
def test_save_pretrained_loads_strictly_into_torchvision_and_timm(tmp_path, arch):
    model = _model(arch)
    model.save_pretrained(tmp_path / "w")  # default: no projector
    state = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert not any(k.startswith(("projector.", "fc.")) for k in state)
    x = torch.randn(2, 3, 64, 64)
    tv = getattr(torchvision.models, arch)()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    tm = timm.create_model(arch, pretrained=False, num_classes=0)
    tm.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = model.embed(x)
        torch.testing.assert_close(tv.eval()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tm.eval()(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_classifier_folder_loads_into_torchvision_and_timm_with_its_head(tmp_path):
    model = _model("resnet18", num_classes=7)
    model.save_pretrained(tmp_path / "c")
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    tv = torchvision.models.resnet18(num_classes=7)
    tv.load_state_dict(state, strict=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=7)
    tm.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7)
        torch.testing.assert_close(tv.eval()(x), logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tm.eval()(x), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_timm_pretrained_file_overlay_gives_identical_features(tmp_path, arch):
    model = _model(arch)
    model.save_pretrained(tmp_path / "w")
    tm = timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "w" / "model.safetensors")),
        num_classes=0,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), model.embed(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [0, 5])
def test_timm_builds_a_weights_folder_from_its_config_json(tmp_path, num_classes):
    """config.json carries timm's keys (architecture, num_classes, pretrained_cfg): timm's own
    folder/Hub loader (``local-dir:`` reads config.json as ``hf-hub:`` does) builds the model."""
    model = _model("resnet18", num_classes=num_classes)
    model.save_pretrained(tmp_path / "w")
    tm = timm.create_model(f"local-dir:{tmp_path / 'w'}", pretrained=True).eval()
    assert tm.num_classes == num_classes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x) if num_classes else model.embed(x)  # (no projector in timm)
        torch.testing.assert_close(tm(x), expected, rtol=1e-4, atol=1e-5)
    assert tuple(tm.pretrained_cfg["input_size"]) == (3, 64, 64)


def test_small_layouts_carry_no_timm_architecture(tmp_path):
    smi_hub.load().save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "architecture" not in cfg  # timm cannot build the width-16 3x3-stem layout
    assert cfg["pretrained_cfg"]["input_size"] == [3, 28, 28]


# --- timm's data config = our eval transform ------------------------------------------------


def _photos() -> list[Image.Image]:
    images, _ = fashion_mnist.load_arrays("test")
    return [
        Image.fromarray(skimage.data.astronaut()),
        Image.fromarray(skimage.data.chelsea()),  # 300 x 451: the short side is resized
        Image.fromarray(skimage.data.camera()).convert("RGB"),
        Image.fromarray(images[0]).convert("RGB"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["smi_resnet18_fmnist", "smi_resnet50_imagenet"])
def test_timm_resolve_data_config_reproduces_get_transforms(source):
    model = smi_hub.load(source, pretrained=source == "smi_resnet18_fmnist")
    config = timm.data.resolve_data_config({}, model=model)
    size = model.image_size
    assert config["input_size"] == (3, size, size) and config["interpolation"] == "bicubic"
    theirs = timm.data.create_transform(**config)
    ours = smi_hub.get_transforms(model)
    for image in _photos():
        a, b = theirs(image), ours(image)
        assert a.shape == (3, size, size)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- timm's model contract ------------------------------------------------------------------


def test_forward_intermediates_matches_timm():
    model = _model("resnet18")
    tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
    tm.load_state_dict(model.backbone_state_dict(), strict=True)
    tm.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for kw in (
            {},
            {"indices": 2},
            {"indices": [0, -1]},
            {"indices": [1, 2], "stop_early": True},
            {"indices": 3, "intermediates_only": True},
        ):
            ours, theirs = model.forward_intermediates(x, **kw), tm.forward_intermediates(x, **kw)
            if not kw.get("intermediates_only"):
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
                ours, theirs = ours[1], theirs[1]
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        fmap = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), tm.forward_head(
            tm.forward_features(x), pre_logits=True), rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(ValueError, match="last 1 to 5"):
        model.forward_intermediates(x, indices=0)


def test_forward_head_num_classes_and_load_with_a_fresh_head(tmp_path):
    base = smi_hub.load()
    assert base.num_classes == 0 and isinstance(base.get_classifier(), torch.nn.Identity)
    torch.manual_seed(1)
    model = smi_hub.load("smi_resnet18_fmnist", num_classes=4)
    assert model.num_classes == 4 and model.fc.out_features == 4
    assert model.class_names == ["class_0", "class_1", "class_2", "class_3"]
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        torch.testing.assert_close(pooled, base.embed(x))  # pretrained features kept
        torch.testing.assert_close(model.forward_head(fmap), model.fc(pooled))
        torch.testing.assert_close(model(x), model.fc(pooled))
    assert model.pretrained_cfg["num_classes"] == 4
    model.save_pretrained(tmp_path / "k")
    again = smi_hub.load(tmp_path / "k")
    assert again.num_classes == 4 and torch.equal(again.fc.weight, model.fc.weight)
    assert smi_hub.load(tmp_path / "k", num_classes=4).fc.weight.equal(model.fc.weight)
    assert smi_hub.load(tmp_path / "k", num_classes=0).num_classes == 0
    with pytest.raises(ValueError, match="must be an integer from 0"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match="2 class_names"):
        model.reset_classifier(3, class_names=["a", "b"])


# --- deterministic bytes ----------------------------------------------------------------------

_SAVE = """
import sys, torch, smi_hub
torch.manual_seed(0)
m = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8],
                     image_size=28)
smi_hub.save_weights_folder(m, sys.argv[1], training={"b": 1, "a": {"y": 2, "x": 3}},
                            results={"knn_top1": 50.0})
print(smi_hub.fileio.sha256_file(sys.argv[1] + "/model.safetensors"))
"""


@pytest.mark.slow
def test_weights_bytes_are_identical_across_processes(tmp_path):
    """safetensors writes its metadata in a per-process random order; the canonical header
    makes two processes (different hash seeds) write byte-identical files and configs."""
    outs = []
    for i, seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, "-c", _SAVE, str(tmp_path / str(i) / "w")],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.strip())
    assert outs[0] == outs[1]
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (tmp_path / "0/w" / name).read_bytes() == (tmp_path / "1/w" / name).read_bytes()


def test_resaving_the_embedded_default_reproduces_its_pinned_sha256(tmp_path):
    pinned = smi_hub.registry.REGISTRY["smi_resnet18_fmnist"].sha256
    out = smi_hub.load().save_pretrained(tmp_path / "again")
    assert json.loads((out / "config.json").read_text())["weights_sha256"] == pinned
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == pinned


def test_safetensors_header_is_canonical_and_loadable(tmp_path):
    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    data = safetensors_bytes(state, {"z": "1", "format": "pt", "m": "2"})
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    assert n % 8 == 0
    parsed = json.loads(header)
    assert header.rstrip() == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    assert list(parsed["__metadata__"]) == ["format", "m", "z"]
    (tmp_path / "x.safetensors").write_bytes(data)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# --- provenance, model card, push_to_hub -------------------------------------------------------


def test_save_pretrained_keeps_training_recipe_and_results(tmp_path):
    model = smi_hub.load()
    original = model.weights_config
    out = model.save_pretrained(tmp_path / "again")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"] == original["training"] and cfg["results"] == original["results"]
    assert cfg["weights_sha256"] == original["weights_sha256"]
    card = huggingface_hub.ModelCard((out / "README.md").read_text())
    assert card.data.license == "apache-2.0" and card.data.library_name == "smi-hub"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["knn_top1"] == original["results"]["knn_top1"]
    assert "linear_train_top1" not in metrics and "transfer_1shot_top1_std" not in metrics
    assert 'smi_hub.load("path/to/again")' in card.text
    named = smi_hub.load().save_pretrained(tmp_path / "n", name="smi_resnet18_fmnist")
    assert 'smi_hub.load("smi_resnet18_fmnist")' in (named / "README.md").read_text()


def test_export_keeps_subset_sizes(tmp_path):
    from smi_hub.export import training_summary

    state = {"config": {"data": {"source": "fashion_mnist", "subset": 2048}, "train": {}}}
    assert training_summary(state)["subset"] == 2048


def test_model_card_usage_snippet_runs(tmp_path):
    """The card's code loads the folder it describes (with the folder path substituted)."""
    out = smi_hub.load().save_pretrained(tmp_path / "m", name="m")
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/m", str(out))
    image = tmp_path / "image.jpg"
    Image.fromarray(skimage.data.chelsea()).save(image)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "card", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["features"].shape == (1, 128)


def test_push_to_hub_uploads_exactly_the_weights_folder(tmp_path, monkeypatch):
    calls: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create_repo"] = (repo_id, private, exist_ok)
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, commit_message, revision, create_pr):
            folder = Path(folder_path)
            calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
            calls["card"] = (folder / "README.md").read_text()
            calls["tensors"] = sorted(load_file(str(folder / "model.safetensors")))
            calls["upload"] = (repo_id, commit_message, revision, create_pr)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8],
                     image_size=28)  # fmt: skip
    assert model.push_to_hub("me/smi-tiny", token="t", private=True) == "commit-info"
    assert calls["create_repo"] == ("me/smi-tiny", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert not any(k.startswith("projector.") for k in calls["tensors"])
    assert 'smi_hub.load("me/smi-tiny")' in calls["card"]
    assert calls["upload"] == ("me/smi-tiny", "Upload smi-hub weights folder", None, None)
    model.push_to_hub("me/smi-tiny", with_projector=True, branch="dev")
    assert any(k.startswith("projector.") for k in calls["tensors"])
    assert calls["upload"][2] == "dev"


# --- packaging -----------------------------------------------------------------------------------


def _found_packages() -> list[str]:
    import setuptools

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    return setuptools.find_packages(where=str(ROOT), include=include)


def test_wheel_packages_exclude_training():
    packages = _found_packages()
    assert "smi_hub" in packages
    assert not [p for p in packages if p.split(".")[0] != "smi_hub"], packages


def test_smi_hub_never_imports_training():
    for path in (ROOT / "smi_hub").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "training"], path


@pytest.mark.slow
def test_built_wheel_has_no_training_package(tmp_path):
    """Build the wheel from a copy of the source tree (setuptools writes build/ in-tree)."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "runs", "build", "data", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("smi_hub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "training" not in tops and "smi_hub" in tops, tops
    weights = "smi_hub/weights/smi_resnet18_fmnist/model.safetensors"
    digest = hashlib.sha256(zipfile.ZipFile(wheel).read(weights)).hexdigest()
    assert digest == smi_hub.registry.REGISTRY["smi_resnet18_fmnist"].sha256
