"""training.finetune as a user meets it: what it prints, what its errors name, its documented
defaults."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from training import finetune as ft
from training.finetune_data import FinetuneConfig
from training.finetune_loop import build_param_groups

ROOT = Path(__file__).resolve().parents[1]


def image_folder(root: Path, per_class: int = 8, split: str = "train") -> Path:
    """root/<class>/<i>.png: real Fashion-MNIST images of three classes."""
    images, labels = fashion_mnist.load_arrays(split)
    for name in ("Coat", "Sandal", "Bag"):
        (root / name.lower()).mkdir(parents=True)
        c = list(fashion_mnist.CLASSES).index(name)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(root / name.lower() / f"{name}_{i}.png")
    return root


@pytest.mark.slow
def test_prints_rounded_metrics_and_a_whole_best_epoch(tmp_path, capsys, one_torch_thread):
    data = image_folder(tmp_path / "data")
    argv = [
        "--data", "imagefolder", "--data-path", str(data), "--out", str(tmp_path / "o"),
        "--test-split", "none", "--max-steps", "2", "--batch-size", "8", "--val-fraction",
        "0.25", "--no-progress",
    ]  # fmt: skip
    assert ft.main(argv) == 0
    printed = capsys.readouterr()
    plan = next(x for x in printed.err.splitlines() if x.startswith("plan: finetune"))
    assert "on 18 labelled images x 10 epochs = 2 steps of 8 (2 to go)" in plan
    assert re.search(r"; estimate ~\d+ (s|min)", plan), plan
    line = printed.out.strip().splitlines()[-1]
    assert re.search(r"val_top1=\d+\.\d\d(,|$)", line), line
    assert "best_epoch=1," in line and "best_step=" in line  # 2 of 3 steps: epoch 1, not 0.67


def test_a_missing_or_wrong_data_path_names_the_flag(tmp_path, capsys):
    for extra in ([], ["--data-path", str(tmp_path / "nowhere")]):
        argv = ["--data", "imagefolder", "--out", str(tmp_path / "o"), "--no-progress", *extra]
        assert ft.main(argv) == 2
        err = capsys.readouterr().err
        assert "--data-path" in err and "data.path" not in err, err


def test_the_documented_default_backbone_lr_is_the_one_used():
    """Documented (--help, docs/hub.md, docs/results.md): head 0.05, backbone lr / 10."""
    cfg = FinetuneConfig()
    assert cfg.lr == 0.05 and cfg.backbone_lr is None
    model = smi_hub.load(pretrained=False, num_classes=3)
    groups = build_param_groups(model, cfg)
    fc = {id(p) for p in model.fc.parameters()}
    backbone = {g["lr"] for g in groups if not any(id(p) in fc for p in g["params"])}
    assert backbone == {0.005}
    assert "backbone learning rate (default: --lr / 10)" in ft.build_parser().format_help()
    assert "`--backbone-lr` (default lr / 10;" in (ROOT / "docs" / "hub.md").read_text()
    assert "backbone LR 0.005 (the default lr / 10)" in (ROOT / "docs/results.md").read_text()
