"""Semi-supervised evaluation as the references run it (Barlow Twins' and VICReg's
evaluate.py): a published label list (SimCLR's 1percent.txt format), the last partial batch
kept, the head drawn from N(0, 0.01) with zero bias, the best epoch reported beside the final."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import SMIModel, fashion_mnist
from training import evaluate, finetune_loop
from training import finetune as ft
from training.data import ImageFolderDataset, ResumableSampler
from training.finetune_data import FinetuneConfig
from training.label_lists import LabelListError, label_list_indices

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WNIDS = ("n01440764", "n01443537", "n01484850")  # ImageNet-style class folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,val}/<wnid>/<wnid>_<i>.JPEG-like PNGs of real Fashion-MNIST images."""
    images, labels = fashion_mnist.load_arrays("test")
    root = tmp_path_factory.mktemp("imagenet_like")
    for c, wnid in enumerate(WNIDS):
        picked = np.flatnonzero(labels == c)[:14]
        for n, i in enumerate(picked):
            d = root / ("train" if n < 10 else "val") / wnid
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(d / f"{wnid}_{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    m = SMIModel(arch="resnet18", base_width=4, small_stem=True, image_size=28)
    return smi_hub.save_weights_folder(m.eval(), tmp_path_factory.mktemp("w") / "w")


def _list_file(folder, path, per_class=2):
    names = [p.name for wnid in WNIDS for p in sorted((folder / "train" / wnid).iterdir())]
    chosen = [n for wnid in WNIDS for n in [m for m in names if m.startswith(wnid)][:per_class]]
    path.write_text("\n".join(chosen) + "\n\n")  # as the published files: names, a blank end
    return chosen


def test_label_list_maps_file_names_onto_the_image_folder(folder, tmp_path):
    samples = ImageFolderDataset(folder / "train").samples
    chosen = _list_file(folder, tmp_path / "1percent.txt")
    idx = label_list_indices(samples, chosen)
    assert sorted(os.path.basename(samples[i][0]) for i in idx) == sorted(chosen)
    with pytest.raises(LabelListError, match=r"1 name no training image \(e.g. \['x_1.JPEG'\]"):
        label_list_indices(samples, [*chosen, "x_1.JPEG"])
    twice = [("a/n1/n1_5.png", 0), ("a/n2/n1_5.png", 1)]  # one name in two classes: its prefix
    assert label_list_indices(twice, ["n1_5.png"]) == [0]


@pytest.mark.slow
def test_semisup_with_a_subset_file_as_the_references(folder, weights, tmp_path, capsys):
    chosen = _list_file(folder, tmp_path / "1percent.txt")
    out = tmp_path / "semi.json"
    argv = ["semisup", "--weights", str(weights), "--dataset", "imagefolder", "--data-path",
            str(folder), "--test-split", "val", "--subset-file", str(tmp_path / "1percent.txt"),
            "--fraction", "0.01", "--epochs", "3", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    used = json.loads((tmp_path / "semi_finetuned" / "labels.json").read_text())["train_indices"]
    samples = ImageFolderDataset(folder / "train").samples
    assert sorted(os.path.basename(samples[i][0]) for i in used) == sorted(chosen)
    assert result["settings"]["subset_file"] == str(tmp_path / "1percent.txt")
    assert result["settings"]["labelled_images"] == 6
    # best epoch beside final: each epoch tested, as the references' best_acc
    tests = [h for h in result["history"] if "test_top1" in h]
    assert [h["epoch"] for h in tests] == [1, 2, 3]
    m = result["metrics"]
    assert m["top1"] == pytest.approx(tests[-1]["test_top1"])  # the final model, tested again
    assert m["best_top1"] == max(h["test_top1"] for h in tests)
    assert m["best_top5"] == max(h["test_top5"] for h in tests)
    assert tests[m["best_epoch"] - 1]["test_top1"] == m["best_top1"]

    (tmp_path / "bad.txt").write_text("n01440764_999999.JPEG\n")
    argv[argv.index(str(tmp_path / "1percent.txt"))] = str(tmp_path / "bad.txt")
    assert evaluate.main(argv) == 2
    assert "1 name no training image" in capsys.readouterr().err


@pytest.mark.slow
def test_the_last_partial_batch_is_kept(folder, weights, tmp_path):
    """10 images a class x 3, batch 8: 3 full batches and one of 6, as a DataLoader without
    drop_last (the references') gives."""
    cfg = FinetuneConfig(
        model=str(weights), data="imagefolder", data_path=str(folder), test_split=None,
        val_fraction=0.0, epochs=2, batch_size=8, keep_last_batch=True, progress=False,
        out=str(tmp_path / "o"),
    )  # fmt: skip
    assert ft.finetune(cfg)["settings"]["steps"] == 2 * 4
    cfg.keep_last_batch, cfg.out = False, str(tmp_path / "p")
    assert ft.finetune(cfg)["settings"]["steps"] == 2 * 3


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_sampler_without_drop_last_sees_every_image_once(replicas):
    ranks = [ResumableSampler(30, 4, replicas, r, seed=1, drop_last=False) for r in
             range(replicas)]  # fmt: skip
    seen = [i for s in ranks for batch in s for i in batch]
    assert sorted(seen) == list(range(30))
    assert len({len(list(s)) for s in ranks}) == 1  # every rank takes the same steps
    full = ResumableSampler(30, 4, replicas, 0, seed=1)
    assert all(len(b) == 4 for b in full) and len(list(full)) == 30 // (4 * replicas)


@pytest.mark.slow
def test_head_starts_from_n_0_001_with_zero_bias(weights):
    torch.manual_seed(3)
    model = finetune_loop.build_model(FinetuneConfig(model=str(weights)), 200, None)
    w = model.fc.weight
    assert w.shape == (200, 32)
    assert w.mean().abs() < 1e-3 and w.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(model.fc.bias, torch.zeros(200))
