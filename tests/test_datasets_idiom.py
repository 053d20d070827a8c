"""The ``datasets`` idioms people write first, on real Fashion-MNIST photos: ``ds.map`` with
``extract_features`` per batch (rows aligned, a null or a clear error per unreadable file),
``with_format("torch")`` pixel batches, string labels kept, and ``add_embeddings`` on a
``DatasetDict`` and a streaming ``IterableDataset``."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.errors import ImageLoadError

pytestmark = [
    pytest.mark.slow,  # 1-2 s each through datasets.map; extraction stays in test_features*.py
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Skipped"),
]


@pytest.fixture(scope="module")
def model():
    return smi_hub.load()


@pytest.fixture(scope="module")
def photos():
    x, y = fashion_mnist.load_arrays("test")
    return [Image.fromarray(a) for a in x[:20]], [fashion_mnist.CLASSES[i] for i in y[:20]]


@pytest.fixture
def path_ds(tmp_path, photos):
    images, names = photos
    paths = []
    for i, image in enumerate(images[:12]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    (tmp_path / "5.png").write_bytes(b"not a png")  # one unreadable file
    return datasets.Dataset.from_dict({"path": paths, "label": names[:12]})


def _reference(model, path_ds):
    """Each readable file on its own (an independent per-row computation)."""
    out = []
    for p in path_ds["path"]:
        try:
            out.append(smi_hub.extract_features(model, [p], progress=False).features[0].numpy())
        except Exception:
            out.append(None)
    return out


def test_map_idiom_null_rows_stay_aligned(model, path_ds):
    ref = _reference(model, path_ds)
    assert ref[5] is None and sum(r is None for r in ref) == 1
    mapped = path_ds.map(
        lambda b: {"emb": smi_hub.extract_features(model, b["path"], on_error="null",
                                                   progress=False).column()},
        batched=True, batch_size=4,
    )  # fmt: skip
    assert len(mapped) == 12
    for got, want in zip(mapped["emb"], ref, strict=True):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-5)
    # the literal idiom (.features.numpy()) is aligned too: a NaN row, no ArrowInvalid
    mapped = path_ds.map(
        lambda b: {"emb": smi_hub.extract_features(model, b["path"], on_error="null",
                                                   progress=False).features.numpy()},
        batched=True, batch_size=4,
    )  # fmt: skip
    emb = np.asarray(mapped["emb"], dtype=np.float32)
    assert np.isnan(emb[5]).all() and np.isfinite(np.delete(emb, 5, axis=0)).all()
    np.testing.assert_allclose(emb[6], ref[6], atol=1e-5)


def test_map_idiom_raise_names_the_file(model, path_ds):
    with pytest.raises(ImageLoadError, match=r"5\.png.*on_error='null'"):
        path_ds.map(
            lambda b: {"emb": smi_hub.extract_features(model, b["path"], on_error="raise",
                                                       progress=False).features.numpy()},
            batched=True, batch_size=4,
        )  # fmt: skip
    with pytest.raises(ValueError, match="on_error must be"):
        smi_hub.extract_features(model, path_ds["path"], on_error="ignore")


def test_with_format_torch_pixel_batches(model, photos):
    images, names = photos
    ds = datasets.Dataset.from_dict({"image": images[:16], "label": names[:16]})
    ds = ds.cast_column("image", datasets.Image())
    batch = ds.with_format("torch")[:16]["image"]
    assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.uint8
    got = smi_hub.extract_features(model, batch, progress=False).features
    want = smi_hub.extract_features(model, images[:16], progress=False).features
    torch.testing.assert_close(got, want)
    mapped = ds.with_format("torch").map(
        lambda b: {"emb": smi_hub.extract_features(model, b["image"], progress=False).features},
        batched=True, batch_size=8,
    )  # fmt: skip
    torch.testing.assert_close(mapped[:]["emb"], want)
    with pytest.raises(ValueError, match="pass raw pixels as uint8"):
        smi_hub.extract_features(model, batch.float(), progress=False)


def test_string_labels_are_kept(model, photos):
    images, names = photos
    ds = datasets.Dataset.from_dict({"image": images[:6], "label": names[:6]})
    ds = ds.cast_column("image", datasets.Image())
    assert smi_hub.extract_features(model, ds, progress=False).labels == names[:6]
    ints = ds.cast_column("label", datasets.ClassLabel(names=list(fashion_mnist.CLASSES)))
    labels = smi_hub.extract_features(model, ints, progress=False).labels
    assert labels.tolist() == [fashion_mnist.CLASSES.index(n) for n in names[:6]]


def test_add_embeddings_dataset_dict_and_stream(model, photos):
    images, names = photos
    parts = {"train": slice(0, 12), "test": slice(12, 20)}
    dd = datasets.DatasetDict({
        k: datasets.Dataset.from_dict({"image": images[s], "label": names[s]}).cast_column(
            "image", datasets.Image())
        for k, s in parts.items()
    })  # fmt: skip
    out = smi_hub.add_embeddings(dd, model, progress=False)
    assert isinstance(out, datasets.DatasetDict) and set(out) == {"train", "test"}
    for split, part in out.items():
        want = smi_hub.add_embeddings(dd[split], model, progress=False)["embeddings"]
        np.testing.assert_allclose(np.asarray(part["embeddings"]), np.asarray(want), atol=1e-6)
        assert part["label"] == dd[split]["label"]
    with pytest.raises(smi_hub.errors.SMIHubError, match="dict of one FeatureStore"):
        smi_hub.add_embeddings(dd, smi_hub.extract_features(model, dd["train"], progress=False))

    stream = dd["train"].to_iterable_dataset()
    lazy = smi_hub.add_embeddings(stream, model, batch_size=5)
    assert isinstance(lazy, datasets.IterableDataset)
    rows = list(lazy)
    want = out["train"]["embeddings"]
    assert [r["label"] for r in rows] == names[:12]
    np.testing.assert_allclose(np.asarray([r["embeddings"] for r in rows]), np.asarray(want),
                               atol=1e-5)  # fmt: skip
