"""training.finetune: label subsets, validation split, the fine-tune -> smi-hub predict chain on
the embedded default with real Fashion-MNIST images, exact resume, optimizer groups."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.cli import main as cli_main
from training import finetune as ft
from training import finetune_loop
from training.checkpoint import load_checkpoint
from training.finetune_data import (
    FinetuneConfig,
    FinetuneError,
    select_label_subset,
    split_validation,
)
from training.finetune_loop import build_param_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LABELS = np.repeat(np.arange(4), [50, 30, 20, 3])  # unbalanced classes, one tiny


def test_select_label_subset_is_class_balanced_and_seeded():
    per = select_label_subset(LABELS, per_class=5, seed=0)
    assert Counter(LABELS[per].tolist()) == {0: 5, 1: 5, 2: 5, 3: 3}  # a small class: all
    assert per == sorted(set(per)) and per == select_label_subset(LABELS, per_class=5, seed=0)
    assert per != select_label_subset(LABELS, per_class=5, seed=1)
    frac = select_label_subset(torch.as_tensor(LABELS), fraction=0.1, seed=0)
    assert Counter(LABELS[frac].tolist()) == {0: 5, 1: 3, 2: 2, 3: 1}  # round, at least 1
    assert select_label_subset(LABELS) == list(range(len(LABELS)))
    with pytest.raises(FinetuneError, match="not both"):
        select_label_subset(LABELS, fraction=0.1, per_class=2)
    with pytest.raises(FinetuneError, match=r"\(0, 1\]"):
        select_label_subset(LABELS, fraction=0.0)
    with pytest.raises(FinetuneError, match=">= 1"):
        select_label_subset(LABELS, per_class=0)


def test_split_validation_is_stratified_and_disjoint():
    chosen = select_label_subset(LABELS, per_class=10, seed=3)
    train, val = split_validation(LABELS, chosen, 0.2, seed=3)
    assert sorted(train + val) == chosen and not set(train) & set(val)
    assert Counter(LABELS[val].tolist()) == {0: 2, 1: 2, 2: 2}  # class 3 (3 images): none
    assert Counter(LABELS[train].tolist()) == {0: 8, 1: 8, 2: 8, 3: 3}
    one = select_label_subset(LABELS, per_class=1, seed=0)
    assert split_validation(LABELS, one, 0.5, seed=0) == (one, [])  # keeps a train image
    with pytest.raises(FinetuneError, match=r"\[0, 1\)"):
        split_validation(LABELS, chosen, 1.0, seed=0)


def test_param_groups_backbone_lr_layer_decay_and_freezing():
    model = smi_hub.load(pretrained=False, num_classes=3)
    cfg = FinetuneConfig(lr=0.1, backbone_lr=0.01, layer_decay=0.5, weight_decay=1e-3)
    groups = build_param_groups(model, cfg)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["fc.weight"])] == (0.1, 1e-3)
    assert lr_of[id(params["fc.bias"])] == (0.1, 0.0)
    assert lr_of[id(params["layer4.0.conv1.weight"])] == (0.01, 1e-3)
    assert lr_of[id(params["layer1.0.bn1.weight"])] == (0.01 * 0.5**3, 0.0)
    assert lr_of[id(params["conv1.weight"])] == (0.01 * 0.5**4, 1e-3)
    assert len(lr_of) == len(params)
    frozen = build_param_groups(model, FinetuneConfig(backbone_lr=0.0))
    assert [p for g in frozen for p in g["params"]] == [params["fc.weight"], params["fc.bias"]]
    assert not params["conv1.weight"].requires_grad


def _query_images(tmp_path, n=4):
    images, labels = fashion_mnist.load_arrays("test")
    paths = []
    for i in range(n):
        path = tmp_path / f"q{i}_{fashion_mnist.CLASSES[labels[i]].replace('/', '-')}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_finetune_then_predict_chain(tmp_path, capsys):
    """The Done-when chain: fine-tune the embedded default on a few hundred real Fashion-MNIST
    images with a handful of steps, load the classifier strictly, predict from the CLI."""
    out = tmp_path / "clf"
    argv = [
        "--model", "smi_resnet18_fmnist", "--data", "fashion_mnist", "--out", str(out),
        "--train-subset", "400", "--labels-per-class", "30", "--test-subset", "300",
        "--max-steps", "12", "--batch-size", "32", "--no-progress",
    ]  # fmt: skip
    assert ft.main(argv) == 0
    capsys.readouterr()
    model = smi_hub.load(out)  # strict load, sha256 checked
    assert model.num_classes == 10 and model.class_names == list(fashion_mnist.CLASSES)
    assert model.projector is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "finetune" and metrics["metrics"]["test_images"] == 300
    assert metrics["settings"]["steps"] == 12 and metrics["settings"]["labels_per_class"] == 30
    assert metrics["metrics"]["top1"] > 25  # chance is 10%; pretrained features learn fast
    labels = json.loads((out / "labels.json").read_text())
    train, val = labels["train_indices"], labels["val_indices"]
    assert not set(train) & set(val) and len(train) + len(val) <= 300
    y = fashion_mnist.load_arrays("train")[1]
    counts = Counter(int(y[i]) for i in train + val)
    assert len(counts) == 10 and max(counts.values()) <= 30
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["results"]["finetune_top1"] == round(metrics["metrics"]["top1"], 4)
    assert cfg["training"]["labels_per_class"] == 30 and cfg["training"]["train_subset"] == 400
    assert cfg["training"]["base_training"]["loss"] == "smi"  # pretraining provenance kept
    card = (out / "README.md").read_text()
    assert "model-index" in card and "finetune_top1" in card

    paths = _query_images(tmp_path)
    assert cli_main(["predict", str(out), *map(str, paths), "-k", "3"]) == 0
    printed = capsys.readouterr().out
    transform = smi_hub.get_transforms(model)
    for path in paths:  # independent check: the model's own softmax on the same images
        block = printed.split(str(path) + "\n", 1)[1].splitlines()[:3]
        rows = [re.match(r"\s+([\d.]+)%\s+(.+)$", line).groups() for line in block]
        with torch.no_grad():
            x = transform(Image.open(path)).unsqueeze(0)
            probs = model(x).softmax(dim=1)[0]
        top = probs.topk(3)
        assert [name for _, name in rows] == [model.class_names[i] for i in top.indices]
        for (pct, _), p in zip(rows, top.values.tolist(), strict=True):
            assert float(pct) == pytest.approx(100 * p, abs=0.006)


def test_predict_refuses_a_model_without_head(tmp_path, capsys):
    paths = _query_images(tmp_path, 1)
    assert cli_main(["predict", "smi_resnet18_fmnist", str(paths[0])]) == 1
    assert "no classifier head" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [6, 8])  # last checkpoint: end of epoch 1 / mid-epoch 2
def test_resume_after_crash_is_exact(tmp_path, monkeypatch, crash_at):
    """A run killed and resumed with --resume auto ends with the same weights, validation
    history and best epoch as an uninterrupted run (5 steps per epoch, checkpoints every 3)."""
    common = dict(
        train_subset=200, val_fraction=0.2, test_split=None, epochs=2, batch_size=32,
        checkpoint_every_steps=3, progress=False, seed=5,
    )  # fmt: skip
    straight = ft.finetune(FinetuneConfig(out=str(tmp_path / "a"), **common))

    calls = {"n": 0}
    real_step = finetune_loop._train_step

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    cfg = FinetuneConfig(out=str(tmp_path / "b"), **common)
    monkeypatch.setattr(finetune_loop, "_train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg)
    monkeypatch.setattr(finetune_loop, "_train_step", real_step)
    with pytest.raises(FinetuneError, match="--resume auto"):
        ft.finetune(cfg)
    resumed = ft.finetune(cfg, resume="auto")
    assert resumed["history"] == straight["history"]
    assert resumed["metrics"] == straight["metrics"]
    a, b = smi_hub.load(tmp_path / "a"), smi_hub.load(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_bf16_frozen_backbone_and_random_init(tmp_path):
    """bf16 autocast runs on CPU; backbone_lr=0 leaves every backbone tensor (BN statistics
    included) unchanged; random_init starts from other weights than the pretrained ones."""
    cfg = FinetuneConfig(
        out=str(tmp_path / "f"), train_subset=128, test_subset=64, max_steps=7, batch_size=32,
        val_fraction=0.25, backbone_lr=0.0, precision="bf16", progress=False,
    )  # fmt: skip
    result = ft.finetune(cfg)  # 3 steps per epoch: validations after steps 3 and 6
    assert result["settings"]["precision"] == "bf16"
    base, tuned = smi_hub.load(), smi_hub.load(tmp_path / "f")
    last = load_checkpoint(tmp_path / "f" / "checkpoints" / "last.pt")["model"]
    assert int(load_checkpoint(tmp_path / "f" / "checkpoints" / "last.pt")["step"]) == 7
    bs = base.backbone_state_dict()
    for state in (tuned.backbone_state_dict(), last):  # the best and the last step
        assert all(torch.equal(bs[k], state[k]) for k in bs)
    rnd = finetune_loop.build_model(
        FinetuneConfig(random_init=True), 10, [str(i) for i in range(10)]
    )
    assert not torch.equal(rnd.conv1.weight, base.conv1.weight)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_process_gloo(tmp_path):
    """torchrun DDP on CPU (gloo): the global batch is split over the ranks, rank 0 writes the
    classifier folder, and the result loads strictly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
        "-m", "training.finetune", "--out", str(out), "--device", "cpu", "--train-subset", "160",
        "--test-subset", "64", "--epochs", "1", "--batch-size", "32", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["world_size"] == 2
    assert metrics["settings"]["steps"] == 4  # 144 training images // global batch 32
    assert smi_hub.load(out).num_classes == 10


def _image_folder(root, per_class=12):
    """root/<class>/<i>.png of real Fashion-MNIST images of three classes."""
    images, labels = fashion_mnist.load_arrays("train")
    for folder, name in (("coat", "Coat"), ("sandal", "Sandal"), ("bag", "Bag")):
        (root / folder).mkdir(parents=True)
        c = list(fashion_mnist.CLASSES).index(name)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(root / folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_imagefolder_source_and_class_names(tmp_path):
    data = _image_folder(tmp_path / "data")
    cfg = FinetuneConfig(
        out=str(tmp_path / "o"), data="imagefolder", data_path=str(data), test_split=None,
        max_steps=2, batch_size=8, val_fraction=0.25, progress=False,
    )  # fmt: skip
    result = ft.finetune(cfg)
    assert "top1" not in result["metrics"] and result["settings"]["val_images"] == 9
    model = smi_hub.load(tmp_path / "o")
    assert model.class_names == ["bag", "coat", "sandal"]  # ImageFolder's sorted folders
    (data / "loose.png").write_bytes(next((data / "bag").iterdir()).read_bytes())
    with pytest.raises(FinetuneError, match="unlabelled images"):
        ft.finetune(FinetuneConfig(out=str(tmp_path / "p"), data="imagefolder",
                                   data_path=str(data), test_split=None, progress=False))  # fmt: skip
