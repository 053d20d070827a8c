"""training/evaluate.py's result-computing functions pinned against independent references
(float64 numpy, plain loops) on real data: the gaps mutation testing found (docs/testing.md)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import SMIModel, load_weights_folder, save_weights_folder
from smi_hub.fashion_mnist import FashionMNIST
from training import eval_data, evaluate, probes, reference_linear, semisup
from training.data import subset_indices
from training.probes import (
    EvalError,
    knn_classify,
    knn_predict,
    linear_probe,
    low_shot,
    sample_shots,
    topk_accuracy,
)

# about 100 s of CPU in all; test_evaluate.py's k-NN tests stay fast
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's real 8x8 digits as 64-d pixel features, split in two halves."""
    from sklearn.datasets import load_digits  # here: scikit-learn costs seconds at collection

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    return x[:900], y[:900], x[900:], y[900:]


@pytest.fixture(scope="module")
def fmnist_pixels(fmnist_test) -> tuple[np.ndarray, np.ndarray]:
    """1,200 real Fashion-MNIST test images as float64 pixel vectors (0..1) and labels."""
    images, labels = fmnist_test
    return images[:1200].reshape(1200, -1).astype(np.float64) / 255.0, labels[:1200].astype(int)


def reference_votes(x_tr, y_tr, x_te, k: int, temperature: float, classes: int) -> np.ndarray:
    """Weighted k-NN votes (Wu et al. 2018) in float64, one query at a time."""
    x_tr, x_te = np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64)
    x_tr = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True)
    votes = np.zeros((len(x_te), classes))
    for n, q in enumerate(x_te):
        sims = x_tr @ (q / np.linalg.norm(q))
        for i in np.argsort(-sims, kind="stable")[: min(k, len(x_tr))]:
            votes[n, int(y_tr[i])] += np.exp(sims[i] / temperature)
    return votes


def assert_ranked_like(pred: torch.Tensor, votes: np.ndarray) -> None:
    """Each rank of ``pred`` holds a class whose reference vote is the vote at that rank
    (ties, e.g. classes without any vote, may come in any order)."""
    ranked = -np.sort(-votes, axis=1)
    assert pred.shape == (votes.shape[0], min(5, votes.shape[1]))
    got = np.take_along_axis(votes, pred.numpy(), axis=1)
    np.testing.assert_allclose(got, ranked[:, : pred.shape[1]], rtol=1e-4, atol=1e-30)
    for row in pred.tolist():  # distinct classes
        assert len(set(row)) == len(row)


def test_knn_defaults_match_a_float64_reference_on_fashion_mnist(fmnist_pixels):
    x, y = fmnist_pixels
    x_tr, y_tr, x_te = torch.tensor(x[:1000]), torch.tensor(y[:1000]), torch.tensor(x[1000:])
    pred = knn_predict(x_tr, y_tr, x_te)  # float64 features; k=20, T=0.07 by default
    votes = reference_votes(x[:1000], y[:1000], x[1000:], 20, 0.07, 10)
    assert_ranked_like(pred, votes)
    # a different k or temperature ranks these images differently: the defaults are pinned
    for k, t in ((21, 0.07), (20, 1.07)):
        assert not np.array_equal(pred.numpy(), knn_predict(x_tr, y_tr, x_te, k, t).numpy())
    # chunked, with more classes than labels present: same ranking of the present classes
    assert_ranked_like(
        knn_predict(x_tr, y_tr, x_te, chunk_size=7, num_classes=12),
        reference_votes(x[:1000], y[:1000], x[1000:], 20, 0.07, 12),
    )


def test_knn_classify_defaults_and_counts(fmnist_pixels):
    x, y = fmnist_pixels
    votes = reference_votes(x[:1000], y[:1000], x[1000:], 20, 0.07, 10)
    mine = votes[np.arange(200), y[1000:]][:, None]
    top1 = 100 * np.mean(votes.argmax(axis=1) == y[1000:])
    # the true class is in the top 5 surely, or maybe (tied with others, e.g. at zero votes)
    sure = 100 * np.mean((votes >= mine).sum(axis=1) <= 5)
    maybe = 100 * np.mean((votes > mine).sum(axis=1) < 5)
    t = torch.tensor
    m = knn_classify(t(x[:1000]), t(y[:1000]), t(x[1000:]), t(y[1000:]))
    assert m["top1"] == pytest.approx(top1) and sure <= m["top5"] <= maybe
    assert m["top1"] < m["top5"] < 100


def test_knn_small_k_few_classes_and_bad_arguments():
    x_tr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    y_tr = torch.tensor([0, 1, 2])
    q = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    # k=1: the nearest neighbour's class first; k above the training set: all of it votes
    assert knn_predict(x_tr, y_tr, q, k=1)[:, 0].tolist() == [0, 1]
    assert knn_predict(x_tr, y_tr, q, k=10).shape == (2, 3)
    assert_ranked_like(knn_predict(x_tr, y_tr, q, k=10), reference_votes(x_tr, y_tr, q, 3, 0.07, 3))
    for k, t in ((0, 0.07), (-1, 0.07), (1, 0.0), (1, -0.5)):
        with pytest.raises(EvalError) as e:
            knn_predict(x_tr, y_tr, q, k=k, temperature=t)
        assert str(e.value) == f"k must be >= 1 and temperature > 0, got k={k}, T={t}."


def test_knn_progress_bar_from_four_chunks(capsys):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.arange(8) % 2
    knn_predict(x, y, x, k=3, chunk_size=3)  # 3 chunks: no bar
    assert "k-NN" not in capsys.readouterr().err
    knn_predict(x, y, x, k=3, chunk_size=2)  # 4 chunks
    assert "k-NN" in capsys.readouterr().err


def test_topk_accuracy_matches_a_naive_count():
    g = torch.Generator().manual_seed(0)
    n, c = 300, 10
    labels = torch.randint(0, c, (n,), generator=g, dtype=torch.int32)
    pred = torch.stack([torch.randperm(c, generator=g) for _ in range(n)])
    hits1 = sum(int(p[0]) == int(t) for p, t in zip(pred, labels, strict=True))
    hits5 = sum(int(t) in p[:5].tolist() for p, t in zip(pred, labels, strict=True))
    assert 0 < hits1 < hits5 < n
    assert topk_accuracy(pred, labels) == {"top1": 100 * hits1 / n, "top5": 100 * hits5 / n}
    # one example; three ranked classes only; no example
    assert topk_accuracy(torch.tensor([[2, 0, 1]]), torch.tensor([0])) == {
        "top1": 0.0,
        "top5": 100.0,
    }
    assert topk_accuracy(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0)) == {
        "top1": 0.0,
        "top5": 0.0,
    }


def test_standardize_matches_float64(digits):
    x_tr, _, x_te, _ = digits
    train, test = x_tr[:50].clone(), x_te[:20].clone()
    train[:, 1] = torch.linspace(0, 2e-7, 50)  # std below the 1e-6 floor
    test[:, 1] = 1e-7
    ref = train.double().numpy()
    mean, std = ref.mean(axis=0), np.maximum(ref.std(axis=0, ddof=1), 1e-6)
    out = probes._standardize(train, test)
    assert len(out) == 2
    np.testing.assert_allclose(out[0].numpy(), (ref - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        out[1].numpy(), (test.double().numpy() - mean) / std, rtol=1e-4, atol=1e-5
    )
    # two rows: their own spread; one row: centred only (no spread to divide by)
    two = probes._standardize(train[:2])[0].double().numpy()
    np.testing.assert_allclose(np.abs(two[:, 2:]), np.sqrt(0.5) * (two[:, 2:] != 0), atol=1e-5)
    one = probes._standardize(train[:1], test[:1])
    assert torch.equal(one[0], torch.zeros_like(train[:1]))
    assert torch.allclose(one[1], test[:1] - train[:1])


def test_sample_shots_per_class_on_real_labels(digits):
    _, y, _, _ = digits
    y = torch.cat([y[y != 3], y[y == 3][:2]])  # class 3 with only 2 images
    for shots in (1, 5):
        idx = sample_shots(y, shots, seed=4)
        assert idx.tolist() == sorted(set(idx.tolist()))  # sorted, no repeats
        counts = torch.bincount(y[idx], minlength=10).tolist()
        assert counts == [min(shots, int((y == c).sum())) for c in range(10)]
    torch.manual_seed(123)
    a = sample_shots(y, 5, seed=4)
    torch.manual_seed(456)  # the global generator plays no part
    assert torch.equal(a, sample_shots(y, 5, seed=4))
    assert not torch.equal(a, sample_shots(y, 5, seed=5))
    # every image of a class gets picked across seeds: a random choice, not the first ones
    seen = torch.cat([sample_shots(y, 5, seed=s) for s in range(60)]).unique()
    assert len(seen) > 0.95 * len(y)
    assert torch.equal(sample_shots(y, None, seed=0), torch.arange(len(y)))


def test_low_shot_runs_each_protocol_with_its_arguments(digits):
    x_tr, y_tr, x_te, y_te = digits
    res = low_shot(x_tr, y_tr, x_te, y_te, (2, None), (3, 4), "knn", k=5, temperature=0.5)
    runs = {
        "2": [
            knn_classify(x_tr[i], y_tr[i], x_te, y_te, 5, 0.5)["top1"]
            for i in (sample_shots(y_tr, 2, 3), sample_shots(y_tr, 2, 4))
        ],
        "all": [knn_classify(x_tr, y_tr, x_te, y_te, 5, 0.5)["top1"]],  # one seed only
    }
    assert res["runs"] == runs and runs["2"][0] != runs["2"][1]
    assert res["metrics"] == {
        "2shot_top1": statistics.fmean(runs["2"]),
        "2shot_top1_std": statistics.pstdev(runs["2"]),
        "allshot_top1": runs["all"][0],
        "allshot_top1_std": 0.0,
    }
    # a large learning rate, so that the batch size (256, the references') shows in the result
    lin = low_shot(x_tr, y_tr, x_te, y_te, (None,), (0,), "linear", 5, 3.0, 0.0)
    ref = [
        linear_probe(x_tr, y_tr, x_te, y_te, (3.0,), (0.0,), 5, bs, seed=0, progress=False)
        for bs in (256, 257)
    ]
    assert (
        lin["runs"] == {"all": [ref[0]["metrics"]["top1"]]} != {"all": [ref[1]["metrics"]["top1"]]}
    )


def test_low_shot_defaults(digits):
    x_tr, y_tr, x_te, y_te = digits
    res = low_shot(x_tr, y_tr, x_te, y_te)
    assert {k: len(v) for k, v in res["runs"].items()} == {"1": 3, "5": 3, "10": 3, "all": 1}
    for s, seed in ((5, 2), (None, 0)):
        i = sample_shots(y_tr, s, seed)
        ref = linear_probe(x_tr[i], y_tr[i], x_te, y_te, (0.1,), (5e-4,), 100, 256, seed=seed)
        assert ref["metrics"]["top1"] in res["runs"]["all" if s is None else str(s)]
    knn = low_shot(x_tr, y_tr, x_te, y_te, (None,), classifier="knn")
    assert knn["runs"]["all"] == [knn_classify(x_tr, y_tr, x_te, y_te, 20, 0.07)["top1"]]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A small 28 px backbone saved as a weights folder (with a projector)."""
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[16],
                     image_size=28)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny") / "w"
    save_weights_folder(model, folder)
    return folder


def test_semisup_cli_fine_tunes_on_a_pinned_label_subset(tmp_path, capsys, tiny_weights):
    out = tmp_path / "semi" / "s.json"
    # the splits swapped (train on the test split): the names must reach finetune
    argv = ["semisup", "--weights", str(tiny_weights), "--fraction", "0.1",
            "--train-split", "test", "--test-split", "train",
            "--train-subset", "3000", "--test-subset", "50", "--epochs", "1", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    index_file = tmp_path / "semi" / "subsets" / "fashion_mnist_test_0.1_seed0.txt"
    indices = [int(v) for v in index_file.read_text().split()]
    s = result["settings"]
    assert {k: s[k] for k in ("protocol", "fraction", "lr_backbone", "lr_head", "weight_decay",
                              "epochs", "batch_size", "subset_file", "finetuned", "test_images",
                              "labelled_images")} == {  # fmt: skip
        "protocol": "vicreg", "fraction": 0.1, "lr_backbone": 0.01, "lr_head": 0.1,
        "weight_decay": 0.0, "epochs": 1, "batch_size": 256, "subset_file": str(index_file),
        "finetuned": str(tmp_path / "semi" / "s_finetuned"), "test_images": 50,
        "labelled_images": len(indices),
    }  # fmt: skip
    # the index file: 10 % of each class of the 3,000-image subset, in the split's numbering
    positions = subset_indices(10000, 3000, 0)
    assert set(indices) <= set(positions)
    targets = np.asarray(FashionMNIST("test").labels, dtype=int)
    per_class = np.bincount(targets[indices], minlength=10)
    expected = np.maximum(1, np.round(0.1 * np.bincount(targets[positions], minlength=10)))
    assert per_class.tolist() == expected.astype(int).tolist()
    # finetune ran with the reference settings, on exactly those images
    ft = json.loads((tmp_path / "semi" / "s_finetuned" / "metrics.json").read_text())
    assert result["metrics"] == {
        **{k: ft["metrics"][k] for k in ("top1", "top5")},
        **{f"best_{k}": ft["metrics"][f"best_test_{k}"] for k in ("top1", "top5")},
        "best_epoch": ft["metrics"]["best_test_epoch"],
    }
    expected_cfg = {
        "model": str(tmp_path / "semi" / "s_base"), "data": "fashion_mnist", "data_path": None,
        "train_split": "test", "test_split": "train", "image_key": "image", "label_key": "label",
        "train_subset": 3000, "test_subset": 50, "label_fraction": 0.1, "val_fraction": 0.0,
        "epochs": 1, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "backbone_lr": 0.01,
        "weight_decay": 0.0, "momentum": 0.9, "warmup_steps": 0, "label_smoothing": 0.0,
        "crop_scale": [0.08, 1.0], "hflip_prob": 0.5, "device": "cpu", "num_workers": 0,
        "seed": 0, "label_list": None, "keep_last_batch": True, "test_every_epoch": True,
    }  # fmt: skip
    assert {k: ft["settings"][k] for k in expected_cfg} == expected_cfg
    assert result["history"] == ft["history"] and len(result["history"]) == 1
    used = json.loads((tmp_path / "semi" / "s_finetuned" / "labels.json").read_text())
    assert used["train_indices"] == indices
    # what was fine-tuned: the backbone as given, saved without its projector
    base = load_weights_folder(tmp_path / "semi" / "s_base")
    given = load_weights_folder(tiny_weights)
    assert base.projector is None or not list(base.projector.parameters())
    assert all(
        torch.equal(v, given.backbone_state_dict()[k])
        for k, v in base.backbone_state_dict().items()
    )


def test_defaults_are_the_documented_values():
    """DINO's k-NN (k 20, T 0.07) and the transfer probe's settings, in the API and the CLI."""

    def defaults(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    args = evaluate.build_parser().parse_args(["knn"])
    for fn in (knn_predict, knn_classify, low_shot):
        assert (
            (defaults(fn)["k"], defaults(fn)["temperature"])
            == (20, 0.07)
            == (
                args.k,
                args.temperature,
            )
        )
    ls = defaults(low_shot)
    assert (ls["shots"], ls["seeds"], ls["epochs"], ls["lr"], ls["weight_decay"]) == (
        (1, 5, 10, None), (0, 1, 2), 100, 0.1, 5e-4
    )  # fmt: skip
    assert (args.shots, args.seeds, args.classifier) == (
        ["1", "5", "10", "all"],
        [0, 1, 2],
        "linear",
    )
    assert defaults(probes.train_linear)["seed"] == 0


def test_knn_classify_ranks_classes_missing_from_training():
    # classes 3 and 4 appear in the test labels only: five classes in all, so the top 5
    # holds every class and counts every test image, the unseen classes included
    x_tr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y_tr = torch.tensor([0, 1, 2])
    x_te = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2], [0.0, -1.0], [0.5, -1.0]])
    y_te = torch.tensor([0, 1, 2, 3, 4])
    assert knn_classify(x_tr, y_tr, x_te, y_te, k=2) == {"top1": 60.0, "top5": 100.0}


def test_per_class_report_edge_cases():
    # 1-D predictions, a class seen once, the last class never predicted, default names
    labels = torch.tensor([0, 0, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 0, 1])
    report = probes.per_class_report(pred, labels, 3)
    assert report == {
        "classes": ["0", "1", "2"],
        "top1": [50.0, 100.0, 0.0],
        "confusion": [[1, 1, 0], [0, 1, 0], [1, 1, 0]],
    }
    assert probes.per_class_report(pred[:, None], labels, 3) == report


def test_train_linear_init_progress_and_default_seed(capsys):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    y = torch.arange(40) % 3
    clf = probes.train_linear(x, y, 3, epochs=0)  # the initial classifier
    expected = torch.empty(3, 6).normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clf.weight.data, expected) and not clf.bias.any()
    a, b = probes.train_linear(x, y, 3, epochs=2), probes.train_linear(x, y, 3, 2, seed=0)
    assert torch.equal(a.weight, b.weight)
    assert capsys.readouterr().err == ""  # no progress bar without desc
    probes.train_linear(x, y, 3, epochs=2, desc="probe X")
    err = capsys.readouterr().err
    assert "probe X" in err and re.search(r"epoch/s|s/epoch", err)


def test_linear_probe_sweep_records_each_setting(digits):
    x_tr, y_tr, x_te, y_te = digits
    res = linear_probe(x_tr, y_tr, x_te, y_te, (0.1, 0.01), (0.0, 1e-3), epochs=2, progress=False)
    assert [(s["lr"], s["weight_decay"]) for s in res["sweep"]] == [
        (0.1, 0.0), (0.1, 1e-3), (0.01, 0.0), (0.01, 1e-3)
    ]  # fmt: skip
    assert all(set(s) == {"lr", "weight_decay", "val_top1"} for s in res["sweep"])
    assert set(res["metrics"]) == {"top1", "top5", "train_top1"} and set(res["best"]) == {
        "lr", "weight_decay"
    }  # fmt: skip
    # each setting trained on 90 % of the standardized training features, scored on the rest
    x, _ = probes._standardize(x_tr, x_te)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val, fit = order[:90], order[90:]
    for s in res["sweep"]:
        clf = probes.train_linear(x[fit], y_tr[fit], 10, 2, s["lr"], s["weight_decay"], seed=0)
        hits = int((clf(x[val]).argmax(dim=1) == y_tr[val]).sum())
        assert s["val_top1"] == pytest.approx(100 * hits / 90)
    pred = res["predictions"]  # the test set's ranked top-5 classes
    assert pred.shape == (len(x_te), 5)
    hits = sum(int(t) in p for p, t in zip(pred.tolist(), y_te.tolist(), strict=True))
    assert res["metrics"]["top5"] == pytest.approx(100 * hits / len(y_te))


def test_reference_linear_without_epochs_and_its_progress_bar(capsys):
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[],
                     image_size=16)  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 2)
    res = reference_linear.reference_linear(model, data, data, 2, lr=0.1, epochs=0)
    assert res["metrics"] == {"top1": 0.0, "top5": 0.0, "best_top1": 0.0, "best_top5": 0.0}
    assert res["history"] == [] and res["predictions"].numel() == res["labels"].numel() == 0
    capsys.readouterr()
    reference_linear.reference_linear(model, data, data, 2, lr=0.1, epochs=1, batch_size=4)
    err = capsys.readouterr().err
    assert "linear (reference)" in err and re.search(r"epoch/s|s/epoch", err)
    assert re.search(r"batch/s|s/batch", err)  # the inner bar over batches


def test_low_shot_progress_bar_only(digits, capsys):
    x_tr, y_tr, x_te, y_te = digits
    low_shot(x_tr, y_tr, x_te, y_te, (1,), (0, 1), epochs=2)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)low-shot: ", err) and re.search(r"fit/s|s/fit", err)
    assert "linear" not in err  # no bar per fit


def test_digits_defaults_to_its_train_split():
    digits = eval_data.DigitsDataset()
    assert digits.indices == eval_data.DigitsDataset("train").indices
    assert digits.classes == [str(c) for c in range(10)]


def test_fix_subset_creates_folders_and_explains_a_mismatch(tmp_path):
    path = tmp_path / "a" / "b" / "s.txt"
    assert semisup.fix_subset(path, [2, 1]) == [1, 2]
    with pytest.raises(EvalError) as e:
        semisup.fix_subset(path, [1, 2, 3])
    assert str(e.value) == (
        f"{path} holds a different label subset (2 indices) than this dataset, fraction and "
        "seed give (3); the data changed. Delete the file to record the new subset, or restore "
        "the data it was drawn from."
    )


def test_markdown_table_formats_floats_only():
    result = {"protocol": "knn", "dataset": "d", "checkpoint": "c",
              "metrics": {"top1": 12.345, "images": 7}, "settings": {"k": 5}}  # fmt: skip
    table = evaluate.markdown_table(result)
    assert "| top1 | 12.35 |" in table and "| images | 7 |" in table


def _head_predictions(h, y, classes, lr, wd, momentum, epochs) -> torch.Tensor:
    """The references' head training in float64: full-batch SGD with momentum and weight
    decay (on weight and bias), cosine per epoch, from N(0, 0.01) weights and zero bias."""
    w = torch.empty(classes, h.shape[1]).normal_(
        0, 0.01, generator=torch.Generator().manual_seed(0)
    )
    w, b = w.double(), torch.zeros(classes, dtype=torch.float64)
    buf = None
    for e in range(epochs):
        w, b = w.requires_grad_(), b.requires_grad_()
        loss = torch.nn.functional.cross_entropy(h @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        grad = (gw + wd * w.detach(), gb + wd * b.detach())
        buf = (
            grad if buf is None else tuple(momentum * m + g for m, g in zip(buf, grad, strict=True))
        )
        step = lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
        w, b = w.detach() - step * buf[0], b.detach() - step * buf[1]
    return (h @ w.T + b).argsort(dim=1, descending=True)


def test_reference_linear_head_is_sgd_with_momentum_and_weight_decay(fmnist_test):
    images, labels = fmnist_test
    x = torch.tensor(images[:48], dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 255
    y = torch.tensor(labels[:48], dtype=torch.long) % 4
    model = smi_hub.load(smi_hub.DEFAULT_MODEL).eval()  # real features (Fashion-MNIST SSL)
    x = (x - torch.tensor(model.mean)[:, None, None]) / torch.tensor(model.std)[:, None, None]
    with torch.no_grad():
        h = model.embed(x).double()
    data = torch.utils.data.TensorDataset(x, y)
    res = reference_linear.reference_linear(model, data, data, 4, 2.0, 0.05, 4, batch_size=48)
    assert [r["lr"] for r in res["history"]] == pytest.approx(
        [2.0 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    )
    expected = _head_predictions(h, y, 4, 2.0, 0.05, 0.9, 4)
    assert torch.equal(res["predictions"], expected)
    # the data tells momentum and weight decay apart
    assert not torch.equal(expected, _head_predictions(h, y, 4, 2.0, 0.05, 0.0, 4))
    assert not torch.equal(expected, _head_predictions(h, y, 4, 2.0, 0.0, 0.9, 4))


def test_cli_protocols_on_digits_record_their_settings(tmp_path, tiny_weights):
    common = ["--weights", str(tiny_weights), "--data", "digits", "--cache-dir", str(tmp_path / "c"),
              "--train-subset", "200", "--test-subset", "100"]  # fmt: skip

    def cli(*argv: str) -> dict:
        out = tmp_path / f"{argv[0]}.json"
        assert evaluate.main([*argv, *common, "--out", str(out)]) == 0
        return json.loads(out.read_text())

    knn = cli("knn", "--k", "5")
    s = knn["settings"]
    assert knn["dataset"] == "digits" and (s["train_split"], s["image_size"]) == ("train", 28)
    assert (s["resize_ratio"], s["resize"], s["feature_dim"], s["k"]) == (1.0, 28, 32, 5)
    assert isinstance(s["seconds"], float)
    assert knn["per_class"]["classes"] == [str(c) for c in range(10)]
    assert sum(map(sum, knn["per_class"]["confusion"])) == 100
    # transfer: its numbers are low_shot's and knn_classify's on the cached features
    tr = cli("transfer", "--shots", "2", "all", "--seeds", "0", "--epochs", "3", "--lr", "0.5")
    cached = {
        split: torch.load(next((tmp_path / "c").glob(f"digits_{split}_*.pt")), weights_only=True)
        for split in ("train", "test")
    }
    x_tr, y_tr = cached["train"]["features"], cached["train"]["labels"]
    x_te, y_te = cached["test"]["features"], cached["test"]["labels"]
    assert (len(x_tr), len(x_te)) == (200, 100)
    expected = low_shot(x_tr, y_tr, x_te, y_te, (2, None), (0,), "linear", 3, 0.5, 5e-4)
    assert tr["metrics"] == expected["metrics"] and tr["runs"] == expected["runs"]
    assert tr["knn"] == knn_classify(x_tr, y_tr, x_te, y_te, 20, 0.07)
    t = tr["settings"]
    assert (t["shots"], t["lr"], t["weight_decay"], t["temperature"]) == (
        ["2", "all"],
        0.5,
        5e-4,
        0.07,
    )
    # the references' linear evaluation, not the fast probe
    lin = cli("linear", "--protocol", "vicreg", "--epochs", "1")
    s = lin["settings"]
    assert (s["protocol"], s["lr"], s["weight_decay"], s["epochs"], s["batch_size"]) == (
        "vicreg", 0.02, 1e-6, 1, 256
    )  # fmt: skip
    assert (s["train_images"], s["test_images"], len(lin["history"])) == (200, 100, 1)
    assert s["test_transform"] == "Resize(28) + CenterCrop(28), bilinear"
    assert s["train_transform"] == "RandomResizedCrop(size) + flip, bilinear"
    assert set(lin["metrics"]) == {"top1", "top5", "best_top1", "best_top5"}
    assert sum(map(sum, lin["per_class"]["confusion"])) == 100


def test_cli_parser_choices_defaults_and_groups():
    parser = evaluate.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["nearest"])
    assert parser.parse_args(["knn"]).dataset == "fashion_mnist"
    help_text = parser.format_help()
    for group in ("model:", "data:", "run:", "k-NN:", "linear probe / transfer / semisup:"):
        assert f"\n{group}\n" in help_text


def test_load_model_random_init_and_messages(tiny_weights):
    trained = load_weights_folder(tiny_weights)
    model, origin = eval_data.load_model(weights=str(tiny_weights), random_init=True, seed=1)
    default, _ = eval_data.load_model(weights=str(tiny_weights), random_init=True)
    seed0, _ = eval_data.load_model(weights=str(tiny_weights), random_init=True, seed=0)
    assert all(torch.equal(v, seed0.state_dict()[k]) for k, v in default.state_dict().items())
    assert origin == "random-init" and model.config["base_width"] == 4
    assert not torch.equal(model.backbone_state_dict()["conv1.weight"],
                           trained.backbone_state_dict()["conv1.weight"])  # fmt: skip
    with pytest.raises(EvalError) as e:
        eval_data.load_model(random_init=True)
    assert str(e.value) == (
        "--random-init needs an architecture: pass --config, --checkpoint, --weights or "
        "--run-dir to copy it from."
    )
    with pytest.raises(EvalError) as e:
        eval_data.load_model()
    assert str(e.value) == (
        "No model given: pass --checkpoint PATH, --weights FOLDER|NAME, --run-dir DIR or "
        "--random-init (with an architecture source)."
    )


def test_knn_default_k_is_twenty_neighbours():
    # 10 neighbours of class 0 slightly nearer than 10 of class 1, and a 21st of class 1:
    # twenty neighbours vote class 0, twenty-one would vote class 1
    angles = [math.acos(c) for c in [0.95] * 10 + [0.949] * 10 + [0.948]]
    x_tr = torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)
    y_tr = torch.tensor([0] * 10 + [1] * 11)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert knn_classify(x_tr, y_tr, q, torch.tensor([0]))["top1"] == 100.0
    assert knn_classify(x_tr, y_tr, q, torch.tensor([0]), k=21)["top1"] == 0.0


def test_cli_argument_types_and_choices(tmp_path, capsys, tiny_weights):
    parser = evaluate.build_parser()
    args = parser.parse_args(["transfer", "--seed", "3", "--num-workers", "2",
                              "--weight-decay", "0.1", "0.2"])  # fmt: skip
    assert (args.seed, args.num_workers, args.weight_decay) == (3, 2, [0.1, 0.2])
    with pytest.raises(SystemExit):
        parser.parse_args(["transfer", "--classifier", "svm"])
    with pytest.raises(SystemExit):
        parser.parse_args(["linear", "--protocol", "simclr"])
    assert parser.parse_args(["transfer", "--classifier", "knn"]).classifier == "knn"
    capsys.readouterr()
    assert evaluate.main(["semisup", "--weights", str(tiny_weights)]) == 2
    assert capsys.readouterr().err == (
        "Error: semisup needs --out FILE.json or --run-dir (where it writes its runs).\n"
    )


def test_feature_cache_key_and_model_fingerprint(tmp_path, caplog, tiny_weights):
    model = load_weights_folder(tiny_weights)
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for k, v in model.backbone_state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    assert eval_data.model_fingerprint(model) == h.hexdigest()[:16]
    # the data path is part of the cache key (two folders never share features)
    for path in ("a", "b", "b"):
        eval_data.cached_features(model, "digits", path, "test", subset=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits_test_*.pt"))) == 2
    with caplog.at_level(logging.INFO, logger="training.eval_data"):
        eval_data.cached_features(model, "digits", "a", "test", subset=8, cache_dir=tmp_path)
    assert any(m.startswith("Features of digits/test from cache ") for m in caplog.messages)


def test_reference_linear_cli_seed_reaches_the_head(tmp_path, tiny_weights):
    confusion = []
    for seed in ("0", "1"):
        out = tmp_path / f"lin{seed}.json"
        argv = ["linear", "--protocol", "barlow_twins", "--weights", str(tiny_weights), "--data",
                "digits", "--epochs", "1", "--seed", seed, "--out", str(out)]  # fmt: skip
        assert evaluate.main(argv) == 0
        result = json.loads(out.read_text())
        assert result["settings"]["train_images"] == 901  # no subset: the seed is the head's
        confusion.append(result["per_class"]["confusion"])
    assert confusion[0] != confusion[1]


def test_semisup_refuses_the_evaluation_only_digits_source(tmp_path, capsys, tiny_weights):
    argv = ["semisup", "--weights", str(tiny_weights), "--data", "digits", "--fraction", "0.1",
            "--out", str(tmp_path / "s.json")]  # fmt: skip
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "digits is an evaluation-only source" in err and "transfer" in err
    assert not (tmp_path / "s_base").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, fmnist_test) -> Path:
    """ImageFolder train/test splits of real Fashion-MNIST images: 3 classes x 8 images."""
    images, labels = fmnist_test
    root = tmp_path_factory.mktemp("folder")
    for c in range(3):
        picked = np.flatnonzero(labels == c)[:16]
        for n, i in enumerate(picked):
            d = root / ("train" if n < 8 else "test") / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(d / f"{i}.png")
    return root


def test_fast_linear_and_reference_linear_cli_on_an_image_folder(
    tmp_path, small_folder, tiny_weights
):
    common = ["--weights", str(tiny_weights), "--dataset", "imagefolder", "--data-path",
              str(small_folder), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    out = tmp_path / "fast.json"
    assert evaluate.main(["linear", *common, "--out", str(out)]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["protocol"], s["epochs"], s["lr"], s["weight_decay"]) == ("fast", 100, 0.1, 0.0)
    out = tmp_path / "ref.json"
    assert evaluate.main(["linear", "--protocol", "barlow_twins", *common, "--epochs", "1",
                          "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["dataset"] == f"imagefolder:{small_folder}"
    assert (result["settings"]["train_images"], result["settings"]["test_images"]) == (24, 24)
    assert result["per_class"]["classes"] == ["class0", "class1", "class2"]
    # flat images (no class folders) have no labels: evaluation says how to fix it
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(flat / "x.png")
    with pytest.raises(EvalError) as e:
        eval_data.labelled_source("imagefolder", str(tmp_path / "flat"), "train")
    assert str(e.value) == (
        "imagefolder train has unlabelled images; evaluation needs class subfolders "
        "(ImageFolder) or a label column."
    )


def test_class_names_come_from_the_source():
    args = evaluate.build_parser().parse_args(["knn"])
    assert evaluate._class_names(args) == list(FashionMNIST("test").classes)
    assert evaluate._class_names(args)[0] == "T-shirt/top"


def _train_linear_reference(x, y, classes, epochs, lr, wd, batch_size, seed) -> torch.Tensor:
    """train_linear's classifier in float64: N(0, 0.01) init, per-epoch shuffles, minibatch
    SGD with momentum 0.9 and weight decay, cosine annealing per step (weights returned)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(classes, x.shape[1]).normal_(0, 0.01, generator=g).double()
    b = torch.zeros(classes, dtype=torch.float64)
    x, buf, step = x.double(), None, 0
    steps = math.ceil(len(x) / batch_size)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            w, b = w.requires_grad_(), b.requires_grad_()
            loss = torch.nn.functional.cross_entropy(x[idx] @ w.T + b, y[idx])
            gw, gb = torch.autograd.grad(loss, (w, b))
            grad = (gw + wd * w.detach(), gb + wd * b.detach())
            buf = (
                grad
                if buf is None
                else tuple(0.9 * m + g_ for m, g_ in zip(buf, grad, strict=True))
            )
            rate = lr * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps)))
            w, b = w.detach() - rate * buf[0], b.detach() - rate * buf[1]
            step += 1
    return w


def test_train_linear_matches_minibatch_sgd_in_float64(digits):
    x_tr, y_tr, _, _ = digits
    x = probes._standardize(x_tr[:100])[0]
    y = y_tr[:100]
    clf = probes.train_linear(x, y, 10, epochs=3, lr=0.5, weight_decay=0.01, batch_size=32, seed=2)
    ref = _train_linear_reference(x, y, 10, 3, 0.5, 0.01, 32, 2)
    torch.testing.assert_close(clf.weight.data.double(), ref, rtol=1e-4, atol=1e-5)
    # the defaults: 100 epochs at lr 0.1, no weight decay, batches of 1024, seed 0
    default = probes.train_linear(x[:40], y[:40], 10)
    torch.testing.assert_close(
        default.weight.data.double(), _train_linear_reference(x[:40], y[:40], 10, 100, 0.1, 0.0, 1024, 0),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_semisup_protocol_fast_is_refused(tmp_path, capsys, tiny_weights):
    argv = ["semisup", "--protocol", "fast", "--weights", str(tiny_weights), "--out",
            str(tmp_path / "s.json")]  # fmt: skip
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err == (
        "Error: semisup --protocol takes barlow_twins or vicreg (whose settings).\n"
    )


def test_cached_features_subset_seed_and_safe_loading(tmp_path, tiny_weights, monkeypatch):
    model = load_weights_folder(tiny_weights)
    x, y = eval_data.cached_features(model, "digits", None, "test", 20, tmp_path, seed=3)
    targets = eval_data.DigitsDataset("test").targets
    assert y.tolist() == [targets[i] for i in subset_indices(len(targets), 20, 3)]
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    x2, _ = eval_data.cached_features(model, "digits", None, "test", 20, tmp_path, seed=3)
    assert calls == [{"weights_only": True}] and torch.equal(x, x2)  # from the cache, safely


def test_markdown_table_layout():
    result = {"protocol": "knn", "dataset": "digits", "checkpoint": "w", "metrics": {"top1": 50.0},
              "settings": {"k": 5}, "per_class": {"classes": ["a", "b"], "top1": [40.0, 60.0]}}  # fmt: skip
    assert evaluate.markdown_table(result).splitlines() == [
        "## knn on digits", "", "Model: `w`", "", "| metric | value |", "|---|---|",
        "| top1 | 50.00 |", "", "| class | top-1 |", "|---|---|", "| a | 40.0 |", "| b | 60.0 |",
        "", "Settings: k=5",
    ]  # fmt: skip


def test_digits_split_is_the_documented_seeded_half():
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.default_rng(0)
    train = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        train += idx[: (len(idx) + 1) // 2].tolist()
    assert eval_data.DigitsDataset("train").indices == sorted(train)


def test_semisup_on_an_image_folder_passes_its_path(tmp_path, small_folder, tiny_weights):
    out = tmp_path / "s.json"
    argv = ["semisup", "--weights", str(tiny_weights), "--dataset", "imagefolder", "--data-path",
            str(small_folder), "--fraction", "0.1", "--epochs", "1", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    ft = json.loads((tmp_path / "s_finetuned" / "metrics.json").read_text())
    assert ft["settings"]["data_path"] == str(small_folder)
    assert json.loads(out.read_text())["settings"]["labelled_images"] == 3  # one per class
