"""extract_features' plumbing, pinned where mutation testing found it unchecked: how inputs are
classified and named, how batches and shards are cut, what a store records, and the messages.

Most tests use ``Probe``, a parameter-light stand-in for an ``SMIModel`` whose features are the
per-channel means of its input (an independent reference computed with a naive loop) and which
records the size of every batch it sees; images are Fashion-MNIST and skimage photos.
"""

from __future__ import annotations

import os
import re
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch.utils.data import Dataset, IterableDataset

import smi_hub
from smi_hub import feature_sources as S
from smi_hub import features as F
from smi_hub.feature_store import work_folder

TO_TENSOR = __import__("torchvision").transforms.PILToTensor()


def to_float(image: Image.Image) -> torch.Tensor:
    """The tests' preprocessing: RGB uint8 -> float 3 x H x W (no resizing)."""
    return TO_TENSOR(image).float()


class Probe(torch.nn.Module):
    """Features: per-channel means (pooled / projector: x2) of the input; records batch sizes."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("offset", torch.zeros(3))
        self.projector = torch.nn.Identity()
        self.batches: list[int] = []
        self.formats: list[bool] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.formats.append(x.is_contiguous(memory_format=torch.channels_last))
        return x.mean(dim=(2, 3)) * self.scale + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x[:, :, :2, :2] * self.scale

    def forward_stages(self, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.batches.append(x.shape[0])
        return {name: x[:, :, :1, :1] + int(name[-1]) for name in layers}


def means(images: list[Image.Image]) -> torch.Tensor:
    """Naive per-channel means of RGB images, pixel by pixel sums in float64."""
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
        out.append([arr[:, :, c].sum() / (arr.shape[0] * arr.shape[1]) for c in range(3)])
    return torch.tensor(out, dtype=torch.float32)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture(scope="module")
def fmnist(fmnist_test) -> tuple[list[Image.Image], list[int]]:
    images, labels = fmnist_test
    return [Image.fromarray(images[i]) for i in range(11)], [int(v) for v in labels[:11]]


def extract(model, inputs, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("transform", to_float)
    return smi_hub.extract_features(model, inputs, **kw)


# ---- inputs: conversion, samples, datasets ---------------------------------------------------


def test_array_to_pil_layouts(fmnist):
    gray = np.asarray(fmnist[0][0])
    rgb = data.astronaut()[:40, :30]
    cases = {
        "hw": (gray, gray),
        "hw1": (gray[:, :, None], gray),
        "1hw": (gray[None], gray),
        "hwc": (rgb, rgb),
        "chw": (rgb.transpose(2, 0, 1).copy(), rgb),
        "chw_torch": (torch.from_numpy(rgb.transpose(2, 0, 1).copy()), rgb),
        "hwc_noncontiguous": (rgb[:, ::-1], rgb[:, ::-1]),
    }
    for name, (given, want) in cases.items():
        out = S._array_to_pil(given)
        assert isinstance(out, Image.Image), name
        assert np.array_equal(np.asarray(out), want), name
    floats = torch.rand(3, 4, 4)
    assert S._array_to_pil(floats) is floats  # a preprocessed tensor passes through
    arr = np.zeros((4, 4), np.float32)
    assert S._array_to_pil(arr) is arr
    assert S._array_to_pil("x") == "x"
    # RGBA rows: a 4-channel last axis is never transposed either, even 3 rows high
    rgba = np.dstack([rgb[:3, :8], np.full((3, 8), 200, np.uint8)])
    assert np.array_equal(np.asarray(S._array_to_pil(rgba)), rgba)
    # a 3-channel last axis is never transposed, even when the first axis is 3
    square = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    assert np.array_equal(np.asarray(S._array_to_pil(square)), square)


def test_sample_reads_every_item_shape(fmnist, tmp_path):
    im, label = fmnist[0][0], fmnist[1][0]
    ref = to_float(im.convert("RGB"))
    path = tmp_path / "a.png"
    im.save(path)
    lab = torch.tensor([label])
    for item, want_label in [
        ({"image": im, "label": label}, label),
        ({"img": im, "label": lab}, label),
        ({"pixel_values": im}, None),
        ((im, label), label),
        ([im, lab], label),
        ((im,), None),
        (im, None),
        (str(path), None),
        (path, None),
        ((im, "coat"), "coat"),  # string labels are kept (datasets' string label columns)
        ((im, torch.tensor([1, 2])), None),
    ]:
        x, i, got, err = S._sample(item, 7, to_float, None)
        assert err is None and i == 7, item
        assert torch.equal(x, ref) and got == want_label, item
    # the first image column wins in _IMAGE_KEYS order, unless one is named
    other = fmnist[0][1]
    both = {"img": other, "image": im, "pixel_values": other}
    assert torch.equal(S._sample(both, 0, to_float, None)[0], ref)
    assert torch.equal(S._sample({"img": im, "pixel_values": other}, 0, to_float, None)[0], ref)
    named = S._sample(both, 0, to_float, "pixel_values")[0]
    assert torch.equal(named, to_float(other.convert("RGB")))
    # a tensor passes as it is, without the transform
    t = torch.rand(3, 5, 5)
    assert S._sample(t, 0, to_float, None)[0] is t


def test_sample_errors_name_the_sample():
    assert S._sample({"x": 1, "b": 2}, 4, to_float, None) == (
        None,
        4,
        None,
        "sample 4: KeyError: \"no image column among ['b', 'x']\"",
    )
    assert S._sample(42, 3, to_float, None) == (
        None,
        3,
        None,
        "sample 3: TypeError: sample 3 is a int, not an image/tensor",
    )

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i):
            raise IndexError("gone")

    assert S._Wrapped(Broken(), to_float)[1] == (None, 1, None, "sample 1: IndexError: gone")


def test_files_report_unreadable_images_and_failing_transforms(tmp_path, fmnist):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    fmnist[0][0].save(good)
    bad.write_bytes(b"junk")
    files = S._Files([good, bad], to_float)
    assert files.paths == [str(good), str(bad)] and len(files) == 2
    x, i, label, err = files[0]
    assert torch.equal(x, to_float(fmnist[0][0].convert("RGB"))) and (i, label, err) == (
        0,
        None,
        None,
    )
    _, i, label, err = files[1]
    assert (i, label) == (1, None) and err.startswith(f"{bad}: not a readable image")

    def failing(image):
        raise ArithmeticError("odd image")

    assert S._Files([good], failing)[0] == (None, 0, None, f"{good}: ArithmeticError: odd image")


def test_collate_separates_failures():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    x, idx, labels, bad = S._collate([(a, 0, 5, None), (None, 1, None, "r1"), (b, 2, None, None)])
    assert torch.equal(x, torch.stack([a, b])) and idx == [0, 2] and labels == [5, None]
    assert bad == [(1, "r1")]
    assert S._collate([(None, 3, None, "r")]) == (None, [], [], [(3, "r")])


def test_hf_image_key_and_kind(fmnist):
    images = fmnist[0][:2]
    typed = datasets.Dataset.from_dict(
        {"label": [0, 1], "photo": images},
        features=datasets.Features({"label": datasets.Value("int64"), "photo": datasets.Image()}),
    )
    assert S._hf_image_key(typed) == "photo"
    plain = datasets.Dataset.from_dict({"label": [0, 1], "pixel_values": [[0], [1]], "img": [0, 1]})
    assert S._hf_image_key(plain) == "img"
    with pytest.raises(ValueError) as e:
        S._hf_image_key(datasets.Dataset.from_dict({"a": [1]}))
    assert str(e.value) == (
        "No image column in this Hugging Face dataset (columns: ['a']); "
        "cast one with ds.cast_column(name, datasets.Image())."
    )

    class Columns:
        features = None
        column_names = ["x", "pixel_values"]

    assert S._hf_image_key(Columns()) == "pixel_values"
    assert S._hf_image_key(object()) is None  # a stream without known columns: per row
    assert S._is_hf(typed, "Dataset") and not S._is_hf(typed, "IterableDataset")
    assert S._is_hf(typed.to_iterable_dataset(), "Other", "IterableDataset")
    assert not S._is_hf([], "list")


def test_read_path_list(tmp_path):
    listing = tmp_path / "sub" / "list.txt"
    listing.parent.mkdir()
    listing.write_text("# a comment\n\n  a.png  \nimgs/b.png\n/abs/c.png\n   # indented comment\n")
    assert S.read_path_list(listing) == [
        str(tmp_path / "sub" / "a.png"),
        str(tmp_path / "sub" / "imgs" / "b.png"),
        "/abs/c.png",
    ]


def test_sources_and_their_messages(tmp_path, fmnist, probe):
    t = torch.rand(2, 3, 4, 4)
    src = S._source(t[0], to_float)
    assert (src.kind, src.n, src.ids) == ("tensor", 1, None) and src.data.shape == (1, 3, 4, 4)
    assert S._source(t, to_float).fingerprint != S._source(t + 1, to_float).fingerprint
    assert (
        S._source(t, to_float).fingerprint != S._source(t.reshape(1, 3, 8, 4), to_float).fingerprint
    )
    with pytest.raises(ValueError) as e:
        S._source(torch.rand(4, 4), to_float)
    assert str(e.value) == (
        "A float tensor input must be a preprocessed batch B x 3 x H x W, got (4, 4); pass raw "
        "pixels as uint8 (B x C x H x W or B x H x W), PIL images or paths to get the model's "
        "preprocessing."
    )
    with pytest.raises(ValueError, match=r"got \(1, 6, 4, 4\)"):
        S._source(t.reshape(1, 6, 4, 4), to_float)
    with pytest.raises(FileNotFoundError) as e:
        S._source("", to_float)
    assert str(e.value) == "The input path is empty; name a folder, image or list file."
    with pytest.raises(FileNotFoundError) as e:
        S._source(tmp_path / "none", to_float)
    assert str(e.value) == f"{tmp_path / 'none'}: no such file or folder of images."
    with pytest.raises(ValueError) as e:
        S._source(tmp_path, to_float)
    assert str(e.value).startswith(f"{tmp_path} holds no image files (.jpg, .jpeg, .png")
    for suffix in (".txt", ".LST", ".list"):
        empty = tmp_path / f"empty{suffix}"
        empty.write_text("# nothing\n")
        with pytest.raises(ValueError) as e:
            S._source(empty, to_float)
        assert str(e.value) == f"{empty} lists no image paths (one path per line)."
    with pytest.raises(TypeError) as e:
        S._source(3.5, to_float)
    assert str(e.value).endswith("a torch Dataset or a tensor batch; got float.")
    with pytest.raises(TypeError):
        S._source([fmnist[0][0], "a.png"], to_float)  # neither all paths nor all images

    fmnist[0][0].save(tmp_path / "x.png")
    one = S._source(tmp_path / "x.png", to_float)
    assert (one.kind, one.n, one.ids) == ("dataset", 1, [str(tmp_path / "x.png")])
    pils = S._source(fmnist[0][:3], to_float)
    assert (pils.kind, pils.n, pils.ids) == ("dataset", 3, None)
    assert pils.fingerprint != S._source(fmnist[0][1:4], to_float).fingerprint
    rotated = [im.rotate(90) for im in fmnist[0][:3]]
    assert pils.fingerprint != S._source(rotated, to_float).fingerprint
    as_l = S._source([im.convert("P") for im in fmnist[0][:3]], to_float)
    assert pils.fingerprint != as_l.fingerprint  # same bytes, other mode

    stream_dd = datasets.IterableDatasetDict(
        {"test": datasets.Dataset.from_dict({"a": [1]}).to_iterable_dataset()}
    )
    with pytest.raises(ValueError, match=r"splits \['test'\]; choose one: ds\['test'\]"):
        S._source(stream_dd, to_float)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": [1]}), "b": None})
    with pytest.raises(ValueError) as e:
        S._source(dd, to_float)
    assert str(e.value) == (
        "This is a DatasetDict with splits ['b', 'train']; choose one: ds['b'] (CLI: --split b)."
    )


def test_hf_dataset_with_a_typed_image_column_of_any_name(fmnist, probe):
    images, labels = fmnist
    ds = datasets.Dataset.from_dict(
        {"photo": images, "label": labels},
        features=datasets.Features({"photo": datasets.Image(), "label": datasets.Value("int64")}),
    )
    stream = ds.to_iterable_dataset()
    for variant in (ds, ds.with_format("pandas"), stream, stream.with_format("pandas")):
        out = extract(probe, variant, batch_size=4)
        torch.testing.assert_close(out.features, means(images))
        assert out.labels.tolist() == labels and out.failed == []
    with pytest.raises(ValueError, match="No image column"):
        extract(probe, datasets.Dataset.from_dict({"a": [1, 2]}))


def interrupt_after_one_batch(probe, inputs, out) -> None:
    """Write the first shard of a store (batches of 2, shards of 2), then die."""
    original = probe.embed

    def dies_on_the_second_batch(x):
        if probe.batches:
            raise InterruptedError
        return original(x)

    probe.embed = dies_on_the_second_batch
    with pytest.raises(InterruptedError):
        extract(probe, inputs, batch_size=2, out=out, shard_size=2)
    probe.embed = original


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_changed_file_restarts_a_store(fmnist, probe, tmp_path, as_folder):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    for i, im in enumerate(fmnist[0][:4]):
        files.append(folder / f"{i}.png")
        im.save(files[-1])
    inputs = folder if as_folder else files
    out = tmp_path / "s"
    interrupt_after_one_batch(probe, inputs, out)
    fmnist[0][5].save(files[0])  # another image under the same name: not resumed
    probe.batches.clear()
    with pytest.warns(RuntimeWarning, match="starting over"):
        store = extract(probe, inputs, batch_size=2, out=out, shard_size=2)
    assert probe.batches == [2, 2] and store.paths == [str(f) for f in files]
    torch.testing.assert_close(store.to_tensor(), means([fmnist[0][5], *fmnist[0][1:4]]))


def test_a_dataset_of_another_length_restarts_a_store(fmnist, probe, tmp_path):
    images = fmnist[0]
    out = tmp_path / "s"
    interrupt_after_one_batch(probe, Listed(images[:8]), out)
    probe.batches.clear()
    with pytest.warns(RuntimeWarning, match="starting over"):
        store = extract(probe, Listed(images[1:8]), batch_size=2, out=out, shard_size=2)
    assert sum(probe.batches) == 7
    torch.testing.assert_close(store.to_tensor(), means(images[1:8]))


def test_file_fingerprint_follows_size_and_time(tmp_path, fmnist):
    a = tmp_path / "a.png"
    fmnist[0][0].save(a)
    first = S._file_fingerprint([str(a)])
    assert first == S._file_fingerprint([str(a)])
    os.utime(a, ns=(0, a.stat().st_mtime_ns + 10**9))
    second = S._file_fingerprint([str(a)])
    assert second != first
    missing = S._file_fingerprint([str(tmp_path / "gone.png")])
    assert missing != S._file_fingerprint([str(tmp_path / "other.png")])
    assert missing.startswith("files:")


# ---- extraction: batches, shards, names, labels ----------------------------------------------


class Stream(IterableDataset):
    """Images with labels, no length: a stream."""

    def __init__(self, images, labels) -> None:
        self.images, self.labels = images, labels

    def __iter__(self):
        yield from zip(self.images, self.labels, strict=True)


class Listed(Dataset):
    def __init__(self, items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_in_memory_batches_names_and_labels(fmnist, probe):
    images, labels = fmnist
    ref = means(images)
    for inputs in (images, Listed(list(zip(images, labels, strict=True)))):
        probe.batches.clear()
        out = extract(probe, inputs, batch_size=4)
        assert probe.batches == [4, 4, 3]
        torch.testing.assert_close(out.features, ref)
        assert out.paths == list(range(11)) and len(out) == 11
    assert out.labels.dtype == torch.long and out.labels.tolist() == labels
    assert extract(probe, images).labels is None
    probe.batches.clear()
    stream = extract(probe, Stream(images, labels), batch_size=4)
    assert probe.batches == [4, 4, 3] and stream.labels.tolist() == labels
    torch.testing.assert_close(stream.features, ref)
    mixed = Listed([(images[0], 1), (images[1], "coat")])
    assert extract(probe, mixed).labels == [1, "coat"]  # kept as given, not dropped
    with pytest.raises(ValueError) as e:
        extract(probe, images, batch_size=0)
    assert str(e.value) == "batch_size must be >= 1, got 0."
    assert len(extract(probe, images, batch_size=1)) == 11
    with pytest.raises(ValueError) as e:
        extract(probe, images, layer="fc")
    assert str(e.value) == (
        "layer must be one of ['pooled', 'spatial', 'layer1', 'layer2', 'layer3', 'layer4', "
        "'projector'], got 'fc'."
    )


def test_layers_reach_the_right_model_method(fmnist, probe):
    x = torch.rand(5, 3, 6, 6)
    got = {layer: extract(probe, x, layer=layer).features for layer in F.LAYERS}
    torch.testing.assert_close(got["pooled"], x.mean(dim=(2, 3)))
    torch.testing.assert_close(got["projector"], 2 * x.mean(dim=(2, 3)))
    torch.testing.assert_close(got["spatial"], x[:, :, :2, :2])
    torch.testing.assert_close(got["layer4"], x[:, :, :2, :2])
    for k in (1, 2, 3):
        torch.testing.assert_close(got[f"layer{k}"], x[:, :, :1, :1] + k)
    probe.projector = None
    with pytest.raises(ValueError, match="with-projector"):
        extract(probe, x, layer="projector")


def test_shards_cut_batches_at_their_boundaries(fmnist, probe, tmp_path):
    images, labels = fmnist
    ref = means(images)
    pairs = list(zip(images, labels, strict=True))
    for name, inputs in [
        ("list", Listed(pairs)),
        ("stream", Stream(images, labels)),
        ("tensor", torch.stack([to_float(im.convert("RGB")) for im in images])),
    ]:
        probe.batches.clear()
        store = extract(probe, inputs, batch_size=3, out=tmp_path / name, shard_size=5)
        assert probe.batches == [3, 2, 3, 2, 1], name
        assert store.num_shards == 3 and store.num_inputs == 11
        torch.testing.assert_close(store.to_tensor(), ref)
        assert store.paths == list(range(11))
        if name != "tensor":
            assert store.labels().tolist() == labels
    assert store.manifest["preprocessing"] == "none (tensor input)"


def test_progress_bar_counts_batches(fmnist, probe, tmp_path, capsys):
    images = fmnist[0]
    extract(probe, images, batch_size=4, progress=True)
    assert "features (pooled): 100%" in capsys.readouterr().err.replace("\r", "\n")
    capsys.readouterr()
    extract(probe, images, batch_size=3, progress=True, out=tmp_path / "s", shard_size=5)
    err = capsys.readouterr().err
    assert "5/5" in err and re.search(r"\d(batch/s|s/batch)", err)
    extract(probe, Listed(images), batch_size=4, progress=True)  # a dataset has a length
    assert "3/3" in capsys.readouterr().err
    extract(probe, images, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


def test_store_header_records_what_made_it(fmnist, probe, tmp_path):
    store = extract(
        probe, fmnist[0], batch_size=4, out=tmp_path / "s", shard_size=4, channels_last=True
    )
    m = store.manifest
    assert m["model"] == "Probe" and m["layer"] == "pooled"
    assert m["weights_sha256"] == F.weights_digest(probe)
    assert m["preprocessing"] == repr(to_float)
    assert m["amp_dtype"] is None and m["channels_last"] is True
    bf = extract(
        probe, fmnist[0], out=tmp_path / "b", shard_size=4, amp_dtype=torch.bfloat16
    ).manifest
    assert bf["amp_dtype"] == "torch.bfloat16" and bf["channels_last"] is False


def test_resume_recomputes_only_missing_shards(fmnist, probe, tmp_path):
    images = fmnist[0]
    out = tmp_path / "s"

    class Killed(Exception):
        pass

    original = probe.embed

    def dies_on_the_third_batch(x):
        if len(probe.batches) == 2:
            raise Killed
        return original(x)

    probe.embed = dies_on_the_third_batch
    with pytest.raises(Killed):
        extract(probe, images, batch_size=4, out=out, shard_size=4)
    assert sorted(p.name for p in work_folder(out).glob("shard-*.json")) == [
        "shard-00000.safetensors.json",
        "shard-00001.safetensors.json",
    ]
    probe.embed = original
    probe.batches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same arguments: resumed, no "starting over"
        store = extract(probe, images, batch_size=4, out=out, shard_size=4)
    assert probe.batches == [3]
    torch.testing.assert_close(store.to_tensor(), means(images))
    # other arguments start over: every shard again
    for changed in ({"batch_size": 2}, {"shard_size": 8}, {"channels_last": True}):
        probe.embed = dies_on_the_third_batch
        probe.batches.clear()
        with pytest.raises(Killed):
            extract(probe, images, **{"batch_size": 4, "shard_size": 4, **changed}, out=out)
        probe.embed = original
        probe.batches.clear()
        args = {"batch_size": 4, "shard_size": 4, **changed, "out": out}
        with pytest.warns(RuntimeWarning, match="starting over"):
            extract(probe, images[::-1], **args)
        assert sum(probe.batches) == 11, changed


def test_failures_are_named_and_warned(fmnist, probe, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(fmnist[0][:3]):
        im.save(folder / f"{i}.png")
    for name in "abcde":
        (folder / f"bad_{name}.png").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning) as record:
        out = extract(probe, folder, batch_size=2)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("Skipped 5 unreadable input(s): ")
    assert message.endswith(" (+2 more)") and message.count("not a readable image") == 3
    assert message.count("; ") == 2
    assert [p for p, _ in out.failed] == [str(folder / f"bad_{n}.png") for n in "abcde"]
    assert out.paths == [str(folder / f"{i}.png") for i in range(3)]
    torch.testing.assert_close(out.features, means(fmnist[0][:3]))
    with pytest.warns(RuntimeWarning) as record:
        store = extract(probe, folder, batch_size=2, out=tmp_path / "s", shard_size=3)
    assert len(record) == 1
    assert str(record[0].message) == message
    assert store.failed == out.failed and store.paths == out.paths
    # four failures: one more; three: no "more"; none: no warning
    (folder / "bad_e.png").unlink()
    with pytest.warns(RuntimeWarning) as record:
        extract(probe, folder)
    assert str(record[0].message).endswith(" (+1 more)")
    (folder / "bad_d.png").unlink()
    with pytest.warns(RuntimeWarning) as record:
        extract(probe, folder)
    assert str(record[0].message).count("not a readable image") == 3
    assert "more" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(probe, fmnist[0][:2])
    # all unreadable: an empty N x num_features result
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning):
        empty = extract(probe, only_bad)
    assert empty.features.shape == (0, 3) and empty.paths == [] and empty.labels is None
    bare = torch.nn.Module()  # no num_features: N x 0
    bare.embed = probe.embed
    with pytest.warns(RuntimeWarning):
        assert extract(bare, only_bad).features.shape == (0, 0)


def test_empty_stream_is_refused(probe, tmp_path):
    with pytest.raises(ValueError) as e:
        extract(probe, Stream([], []), out=tmp_path / "s")
    assert str(e.value) == "The input holds no images."
    assert len(extract(probe, Stream([], []))) == 0


def test_model_is_put_in_eval_mode_and_its_layout_restored(fmnist, probe):
    x = torch.rand(4, 3, 6, 6)
    probe.train()
    extract(probe, x, channels_last=True)
    assert not probe.training
    assert probe.formats == [True]
    probe.formats.clear()
    extract(probe, x)
    assert probe.formats == [False]
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    probe.offset = None
    probe.add_module("bn", bn)
    probe.embed = lambda t: probe.bn(t).mean(dim=(2, 3))
    probe.train()
    out = extract(probe, x, channels_last=True).features
    torch.testing.assert_close(out, ((x - 0.5) / (1 + 1e-5) ** 0.5).mean(dim=(2, 3)))
    assert probe.bn.weight.is_contiguous()


def test_device_of_a_model_without_parameters():
    assert F._device_of(torch.nn.Identity()) == torch.device("cpu")
    assert F._device_of(torch.nn.Linear(2, 2).to(torch.device("meta"))) == torch.device("meta")


def test_weights_digest_is_the_state_dict_identity():
    class Two(torch.nn.Module):
        def __init__(self, order: str, a: torch.Tensor, b: torch.Tensor) -> None:
            super().__init__()
            for name in order:
                self.register_buffer(name, {"a": a, "b": b}[name])

    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)
    base = F.weights_digest(Two("ab", a, b))
    assert len(base) == 64 and base == F.weights_digest(Two("ba", a.clone(), b.clone()))
    variants = [
        Two("ab", a.reshape(3, 2), b),  # same bytes, other shape
        Two("ab", a, b.view(torch.int32)),  # same bytes, other dtype
        Two("ab", a.clone().index_fill_(1, torch.tensor([2]), 9.0), b),  # one value
        Two("ab", a.t(), b),  # not contiguous: its own bytes, in order
    ]
    digests = {F.weights_digest(m) for m in variants}
    assert base not in digests and len(digests) == len(variants)
    swapped = Two("ab", b, a)  # the same tensors under the other names
    assert F.weights_digest(swapped) != base
    assert F.weights_digest(Two("ab", a.t().contiguous(), b)) == F.weights_digest(variants[3])
