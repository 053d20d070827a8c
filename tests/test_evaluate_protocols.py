"""Evaluation protocols: the references' linear evaluation, transfer to scikit-learn's digits,
semi-supervised label subsets, per-class reports and the model's own eval preprocessing.

Smoke sizes on the embedded default model (``smi_resnet18_fmnist``): each CLI run takes a few
seconds on one CPU thread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smi_hub.models import SMIModel
from training import eval_data, evaluate, probes, reference_linear, semisup

DEFAULT = "smi_resnet18_fmnist"


def _cli(capsys, argv: list[str]) -> tuple[dict, str]:
    assert evaluate.main(argv) == 0
    err = capsys.readouterr().err
    out = argv[argv.index("--out") + 1]
    return json.loads(open(out).read()), err


@pytest.mark.slow
@pytest.mark.parametrize("recipe,lr", [("barlow_twins", 0.3), ("vicreg", 0.02)])
def test_reference_linear_protocol_on_the_embedded_default(tmp_path, capsys, recipe, lr):
    out = tmp_path / "linear.json"
    result, err = _cli(capsys, [
        "linear", "--protocol", recipe, "--weights", DEFAULT, "--train-subset", "256",
        "--test-subset", "128", "--epochs", "2", "--out", str(out),
    ])  # fmt: skip
    s = result["settings"]
    assert result["protocol"] == "linear" and s["protocol"] == recipe
    assert (s["lr"], s["weight_decay"], s["batch_size"]) == (lr, 1e-6, 256)
    assert s["resize"] == 28  # the 28 px model's own preprocessing: no resize
    m = result["metrics"]
    assert set(m) == {"top1", "top5", "best_top1", "best_top5"}
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert m["top1"] == result["history"][-1]["top1"]
    assert m["best_top1"] == max(h["top1"] for h in result["history"])
    assert 0 <= m["top1"] <= m["top5"] <= 100
    # cosine per epoch from the protocol's LR (the references' CosineAnnealingLR(epochs))
    assert result["history"][0]["lr"] == pytest.approx(lr)
    assert result["history"][1]["lr"] == pytest.approx(lr * 0.5)
    assert len(result["per_class"]["top1"]) == 10
    assert "linear (reference)" in err  # progress bar
    if recipe == "barlow_twins":  # 2 steps at lr 0.3 on real features: far above chance (10)
        assert m["top1"] > 40


@pytest.mark.slow
def test_reference_linear_keeps_the_backbone_frozen_in_eval_mode():
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[],
                     image_size=16)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 16, 16, generator=g)
    y = torch.arange(40) % 4
    x[y == 1] += 1.5  # some signal so the head moves
    data = torch.utils.data.TensorDataset(x, y)
    res = reference_linear.reference_linear(model, data, data, 4, lr=0.3, epochs=3, batch_size=16)
    after = model.state_dict()
    # weights and BatchNorm running statistics untouched (eval mode while training the head)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(res["history"]) == 3 and res["predictions"].shape == (40, 4)
    assert [h["lr"] for h in res["history"]] == pytest.approx([0.3, 0.225, 0.075])


def test_default_resize_comes_from_the_model_preprocessing(tmp_path):
    small = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[],
                     image_size=28)  # fmt: skip
    big = SMIModel(arch="resnet18", base_width=4, projector_dims=[], image_size=224)
    assert eval_data.default_resize_ratio(small) == 1.0
    assert round(224 * eval_data.default_resize_ratio(big)) == 256  # Resize(256) -> Crop(224)
    from types import SimpleNamespace

    loaded = SimpleNamespace(config=big.config, image_size=224, pretrained_cfg={"crop_pct": 0.8})
    assert round(224 * eval_data.default_resize_ratio(loaded)) == 280  # timm's crop_pct wins
    train_tf, test_tf = reference_linear.reference_transforms(224, [0.5] * 3, [0.5] * 3, 256 / 224)
    from PIL import Image

    image = Image.new("RGB", (300, 400), (128, 64, 32))
    assert test_tf(image).shape == (3, 224, 224) and train_tf(image).shape == (3, 224, 224)
    assert test_tf.transforms[0].size == [256]
    assert evaluate.build_parser().parse_args(["knn"]).resize_ratio is None


@pytest.mark.slow
def test_digits_source_is_a_fixed_stratified_split():
    train, test = eval_data.DigitsDataset("train"), eval_data.DigitsDataset("test")
    assert (len(train), len(test)) == (901, 896)
    assert not set(train.indices) & set(test.indices)
    from sklearn.datasets import load_digits

    per_class = torch.bincount(torch.tensor(load_digits().target), minlength=10)
    counts = torch.bincount(torch.tensor(train.targets), minlength=10)
    assert counts.tolist() == ((per_class + 1) // 2).tolist()  # half of each class
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and 0 <= label < 10
    assert eval_data.DigitsDataset("train").indices == train.indices  # deterministic
    raw = load_digits().images[train.indices[0]]
    pixels = torch.tensor(np.asarray(image)[..., 0], dtype=torch.float64)
    assert torch.allclose(pixels, torch.tensor(raw * 255 / 16).round(), atol=0.5)
    with pytest.raises(Exception, match="splits train and test"):
        eval_data.DigitsDataset("val")


@pytest.mark.slow
def test_transfer_to_digits_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "transfer.json"
    result, err = _cli(capsys, [
        "transfer", "--weights", DEFAULT, "--data", "digits", "--shots", "1", "5", "all",
        "--seeds", "0", "1", "--epochs", "20", "--out", str(out),
    ])  # fmt: skip
    m = result["metrics"]
    assert set(m) == {f"{k}shot_top1{s}" for k in ("1", "5", "all") for s in ("", "_std")}
    assert len(result["runs"]["1"]) == 2 and len(result["runs"]["all"]) == 1
    assert result["settings"]["resize"] == 28 and result["settings"]["test_images"] == 896
    # real transfer: far above chance (10 %) on digits the model never saw
    assert result["knn"]["top1"] > 60 and m["allshot_top1"] > 60
    assert m["1shot_top1"] < m["allshot_top1"]
    assert "low-shot" in err


def test_per_class_report_matches_a_naive_count():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.7, labels, torch.randint(0, 4, (200,)))
    report = probes.per_class_report(pred[:, None], labels, 4, ["a", "b", "c", "d"])
    for i in range(4):
        for j in range(4):
            naive = sum(
                1 for t, p in zip(labels.tolist(), pred.tolist(), strict=True) if t == i and p == j
            )
            assert report["confusion"][i][j] == naive
        n_i = int((labels == i).sum())
        assert report["top1"][i] == pytest.approx(100 * report["confusion"][i][i] / n_i)
    assert report["classes"] == ["a", "b", "c", "d"]


@pytest.mark.slow
def test_knn_and_fast_linear_write_per_class_results(tmp_path, capsys):
    out = tmp_path / "knn.json"
    result, _ = _cli(capsys, [
        "knn", "--weights", DEFAULT, "--train-subset", "2000", "--test-subset", "500",
        "--out", str(out),
    ])  # fmt: skip
    pc = result["per_class"]
    assert pc["classes"][0] == "T-shirt/top" and len(pc["confusion"]) == 10
    assert sum(map(sum, pc["confusion"])) == 500
    diag = sum(pc["confusion"][i][i] for i in range(10))
    assert diag / 5 == pytest.approx(result["metrics"]["top1"])


@pytest.mark.slow
def test_semisup_fine_tunes_on_a_pinned_class_balanced_subset(tmp_path, capsys):
    from smi_hub.fashion_mnist import FashionMNIST

    out = tmp_path / "semisup.json"
    argv = [
        "semisup", "--fraction", "0.01", "--weights", DEFAULT, "--train-subset", "2000",
        "--test-subset", "200", "--epochs", "2", "--out", str(out),
    ]  # fmt: skip
    result, err = _cli(capsys, argv)
    s = result["settings"]
    assert s["protocol"] == "vicreg" and (s["lr_backbone"], s["lr_head"]) == (0.03, 0.08)
    assert s["weight_decay"] == 0.0 and s["labelled_images"] == 20 and s["test_images"] == 200
    assert set(result["metrics"]) == {"top1", "top5", "best_top1", "best_top5", "best_epoch"}
    assert "finetune" in err
    # the index file: 2 images of each class (1 % of 2,000), in the train split's numbering
    index_file = tmp_path / "subsets" / "fashion_mnist_train_0.01_seed0.txt"
    indices = [int(x) for x in index_file.read_text().split()]
    labels = FashionMNIST("train").labels
    assert sorted(int(labels[i]) for i in indices) == sorted(list(range(10)) * 2)
    # fine-tuned on exactly those images; a classifier that loads
    used = json.loads((tmp_path / "semisup_finetuned" / "labels.json").read_text())
    assert used["train_indices"] == indices
    import smi_hub

    assert smi_hub.load(str(tmp_path / "semisup_finetuned")).num_classes == 10
    # the same command again: the file pins the subset; a different file is refused
    index_file.write_text("1\n2\n")
    assert evaluate.main(argv) == 2
    assert "different label subset" in capsys.readouterr().err


def test_fix_subset_records_and_checks(tmp_path):
    path = semisup.subset_file(tmp_path, "fashion_mnist", "train", 0.1, 3)
    assert path.name == "fashion_mnist_train_0.1_seed3.txt"
    assert semisup.fix_subset(path, [5, 1, 3]) == [1, 3, 5]
    assert path.read_text() == "1\n3\n5\n"
    assert semisup.fix_subset(path, [3, 5, 1]) == [1, 3, 5]
    with pytest.raises(probes.EvalError, match="different label subset"):
        semisup.fix_subset(path, [1, 3])
    path.write_text("x\n")
    with pytest.raises(probes.EvalError, match="one integer index per line"):
        semisup.fix_subset(path, [1])


def test_semisup_settings_errors(tmp_path, capsys):
    base = ["semisup", "--weights", DEFAULT, "--out", str(tmp_path / "s.json")]
    assert evaluate.main([*base, "--protocol", "barlow_twins", "--fraction", "0.1"]) == 2
    assert "No published barlow_twins fine-tuning setting" in capsys.readouterr().err
    assert evaluate.main([*base, "--lr", "0.1"]) == 2
    assert "BACKBONE HEAD" in capsys.readouterr().err


def test_protocol_flag_errors(capsys):
    assert evaluate.main(["knn", "--protocol", "vicreg", "--weights", DEFAULT]) == 2
    assert "--protocol applies to linear and semisup" in capsys.readouterr().err
    assert evaluate.main(["transfer", "--weights", DEFAULT, "--data", "mnist"]) == 2
    assert "digits" in capsys.readouterr().err


def test_report_tables_from_protocol_results(tmp_path):
    from training import report

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
    cm = [[0] * 10 for _ in range(10)]
    for i in range(10):
        cm[i][i] = 10
    cm[6][6], cm[6][0], cm[6][2], cm[6][4] = 4, 3, 2, 1  # Shirt: 4 right, 6 confused
    cm[4][2] = 5  # Coat: 5 more images, taken for Pullover
    per_class = {"classes": names, "confusion": cm,
                 "top1": [100 * cm[i][i] / sum(cm[i]) for i in range(10)]}  # fmt: skip
    a = tmp_path / "a"
    a.mkdir()
    (a / "linear.json").write_text(json.dumps({"metrics": {"top1": 88.0}, "per_class": per_class}))
    (a / "transfer_digits.json").write_text(json.dumps({
        "metrics": {"1shot_top1": 50.0, "1shot_top1_std": 2.5, "allshot_top1": 90.0,
                    "allshot_top1_std": 0.0},
        "knn": {"top1": 91.25, "top5": 99.0},
    }))  # fmt: skip
    (a / "semisup_0.01.json").write_text(json.dumps({"metrics": {"top1": 70.0, "top5": 95.0}}))
    fg = report.fine_grained_table({"m": a}).splitlines()
    # within-four confusions: 6 (Shirt) + 5 (Coat) of 10 + 10 + 15 + 10 = 45 images
    assert fg[2] == "| m | 88.0 | 100.0 | 100.0 | 66.7 | 40.0 | 24.4 % | 30.0 / 20.0 / 10.0 |"
    tr = report.transfer_table({"m": a}).splitlines()
    assert tr[0] == "| model | k-NN top-1 | 1-shot top-1 | all-shot top-1 |"
    assert tr[2] == "| m | 91.2 | 50.0 ± 2.5 | 90.0 ± 0.0 |"
    assert report.semisup_table({"m": a}).splitlines()[2] == "| m | 70.0 / 95.0 |  |"
    assert report.main(["--table", "semisup", f"m={a}"]) == 0
