"""training/evaluate.py's result-computing functions pinned against independent references
(float64 numpy, plain loops) on real data: the gaps mutation testing found (docs/testing.md)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from training import evaluate
from training.evaluate import (
    EvalError,
    knn_classify,
    knn_predict,
    linear_probe,
    low_shot,
    sample_shots,
    topk_accuracy,
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's real 8x8 digits as 64-d pixel features, split in two halves."""
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
    out = evaluate._standardize(train, test)
    assert len(out) == 2
    np.testing.assert_allclose(out[0].numpy(), (ref - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        out[1].numpy(), (test.double().numpy() - mean) / std, rtol=1e-4, atol=1e-5
    )
    # two rows: their own spread; one row: centred only (no spread to divide by)
    two = evaluate._standardize(train[:2])[0].double().numpy()
    np.testing.assert_allclose(np.abs(two[:, 2:]), np.sqrt(0.5) * (two[:, 2:] != 0), atol=1e-5)
    one = evaluate._standardize(train[:1], test[:1])
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
    lin = low_shot(x_tr, y_tr, x_te, y_te, (None,), (1,), "linear", 3, 0.05, 0.01)
    ref = linear_probe(x_tr, y_tr, x_te, y_te, (0.05,), (0.01,), 3, 256, seed=1, progress=False)
    assert lin["runs"] == {"all": [ref["metrics"]["top1"]]}


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
