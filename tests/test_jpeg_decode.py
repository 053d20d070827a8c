"""Device JPEG decoding for extract (smi_hub.jpeg_decode), run on CPU tensors: the same code
that decodes with nvjpeg on CUDA, checked against the careful CPU path on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import smi_hub
from smi_hub import jpeg_decode
from smi_hub.cli import main
from smi_hub.feature_sources import _Files
from smi_hub.jpeg_decode import collate_encoded, device_decoder, read_jpeg

CPU = torch.device("cpu")
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Stated tolerance of device decoding (on CPU tensors) against the CPU path, in grey levels of
# the preprocessed pixels: decode_jpeg on the CPU is libjpeg-turbo like Pillow (equal pixels);
# the resize is torchvision's float kernel in Pillow's two rounded passes against Pillow's
# fixed-point one: at most 1 level apart. Features: relative L2 error of each row.
MEAN_LEVELS, MAX_LEVELS = 0.01, 1.001
FEATURE_REL_ERR = 1e-3


@pytest.fixture(scope="module")
def model() -> smi_hub.SMIModel:
    torch.manual_seed(0)
    m = smi_hub.SMIModel(arch="resnet18", base_width=8, projector_dims=[], image_size=224)
    return m.eval()


def _jpeg(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, fmnist_test):
    """Real photos as JPEGs (colour and grayscale, progressive too), Fashion-MNIST images, and
    the odd files device decoding must hand to the CPU path."""
    from sklearn.datasets import load_sample_images  # here: seconds at collection otherwise

    folder = tmp_path_factory.mktemp("jpegs")
    photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")]
    photos += list(load_sample_images().images)
    for i, p in enumerate(photos):
        (folder / f"a{i:02d}.jpg").write_bytes(_jpeg(p))
    (folder / "b_progressive.jpg").write_bytes(_jpeg(data.coffee(), progressive=True))
    for i in range(6):
        (folder / f"c_fmnist{i}.jpg").write_bytes(_jpeg(fmnist_test[0][i]))
    astro = Image.fromarray(data.astronaut())
    astro.convert("CMYK").save(folder / "d_cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    astro.save(folder / "e_rotated.jpg", quality=90, exif=exif)
    astro.save(folder / "f_photo.png")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(folder / "g_16bit.png")
    raw = _jpeg(data.chelsea())
    (folder / "h_truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "i_not_an_image.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg\xff\xd9")
    (folder / "j_cut_with_eoi.jpg").write_bytes(raw[: len(raw) // 2] + b"\xff\xd9")
    return folder


def _files(folder) -> list[str]:
    return [str(p) for p in sorted(folder.iterdir())]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) * STD * 255).abs()


def test_read_jpeg_sends_only_plain_jpegs_to_the_device(photo_dir):
    plain = {p for p in _files(photo_dir) if read_jpeg(p) is not None}
    names = sorted(p.rsplit("/", 1)[1] for p in plain)
    expected = [f"a{i:02d}.jpg" for i in range(7)] + ["b_progressive.jpg"]
    expected += [f"c_fmnist{i}.jpg" for i in range(6)] + ["j_cut_with_eoi.jpg"]
    assert names == expected
    assert read_jpeg(str(photo_dir / "missing.jpg")) is None


@pytest.mark.slow
def test_device_preprocessing_matches_get_transforms_on_real_photos(model, photo_dir):
    tfm = smi_hub.get_transforms(model)
    files = [p for p in _files(photo_dir) if read_jpeg(p) is not None and "cut" not in p]
    decoder = device_decoder(files, tfm, CPU, "device")
    x, idx, _, bad = decoder(collate_encoded([decoder.files[i] for i in range(len(files))]))
    ref = torch.stack([_Files(files, tfm)[i][0] for i in range(len(files))])
    assert idx == list(range(len(files))) and bad == []
    assert all(decoder.files[i][0].ndim == 1 for i in range(len(files)))  # bytes, decoded here
    d = _levels(x, ref)
    assert d.mean() <= MEAN_LEVELS and d.max() <= MAX_LEVELS
    with torch.no_grad():
        fa, fb = model.embed(x), model.embed(ref)
    assert ((fa - fb).norm(dim=1) / fb.norm(dim=1)).max() <= FEATURE_REL_ERR


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_extract_with_device_decode_equals_the_cpu_path(model, photo_dir, workers, monkeypatch):
    decoded = []
    real = jpeg_decode.decode_jpeg
    monkeypatch.setattr(
        jpeg_decode,
        "decode_jpeg",
        lambda inputs, **kw: decoded.extend(inputs) or real(inputs, **kw),
    )
    with pytest.warns(RuntimeWarning, match="Skipped 2 unreadable"):
        cpu = smi_hub.extract_features(
            model, photo_dir, batch_size=4, progress=False, decode="cpu", num_workers=workers
        )
    with pytest.warns(RuntimeWarning, match="Skipped 2 unreadable"):
        dev = smi_hub.extract_features(
            model, photo_dir, batch_size=4, progress=False, decode="device", num_workers=workers
        )
    assert dev.paths == cpu.paths  # order and ids
    assert dev.failed == cpu.failed  # the same files, the same reasons
    assert [p.rsplit("/", 1)[1] for p, _ in dev.failed] == ["h_truncated.jpg", "i_not_an_image.jpg"]
    rel = (dev.features - cpu.features).norm(dim=1) / cpu.features.norm(dim=1)
    assert rel.max() <= FEATURE_REL_ERR
    odd = [k for k, p in enumerate(dev.paths) if read_jpeg(p) is None]
    assert len(odd) == 4  # CMYK, EXIF-rotated, PNG, 16-bit PNG: the CPU path, bit for bit
    assert torch.equal(dev.features[odd], cpu.features[odd])
    assert len(decoded) == len(dev.paths) - len(odd)  # every plain JPEG decoded as a batch


@pytest.mark.slow
def test_a_file_the_decoder_refuses_falls_back_to_the_cpu_path(model, photo_dir, monkeypatch):
    refused = str(photo_dir / "a01.jpg")
    bad_bytes = read_jpeg(refused)
    real = jpeg_decode.decode_jpeg

    def nvjpeg_like(inputs, **kw):
        if any(torch.equal(t, bad_bytes) for t in inputs):
            raise RuntimeError("nvjpeg: unsupported sampling")
        return real(inputs, **kw)

    monkeypatch.setattr(jpeg_decode, "decode_jpeg", nvjpeg_like)
    files = [str(photo_dir / n) for n in ("a00.jpg", "a01.jpg", "a02.jpg", "h_truncated.jpg")]
    tfm = smi_hub.get_transforms(model)
    decoder = device_decoder(files, tfm, CPU, "device")
    x, idx, labels, bad = decoder(collate_encoded([decoder.files[i] for i in range(4)]))
    assert idx == [0, 1, 2] and labels == [None] * 3
    assert [i for i, _ in bad] == [3] and "h_truncated.jpg" in bad[0][1]
    assert torch.equal(x[1], _Files(files, tfm)[1][0])  # the careful path's tensor
    assert (
        _levels(x[[0, 2]], torch.stack([_Files(files, tfm)[i][0] for i in (0, 2)])).max() <= 1.001
    )

    def refuse_all(inputs, **kw):
        raise RuntimeError("nvjpeg: out of memory")

    monkeypatch.setattr(jpeg_decode, "decode_jpeg", refuse_all)
    x, idx, _, bad = decoder(collate_encoded([decoder.files[i] for i in range(4)]))
    assert idx == [0, 1, 2] and [i for i, _ in bad] == [3]
    assert torch.equal(x, torch.stack([_Files(files, tfm)[i][0] for i in range(3)]))


def test_decode_modes(model, photo_dir):
    tfm = smi_hub.get_transforms(model)
    files = _files(photo_dir)
    assert device_decoder(files, tfm, CPU, "auto") is None  # auto: device decode only on CUDA
    assert device_decoder(files, tfm, CPU, "cpu") is None
    assert device_decoder(files, tfm, torch.device("cuda"), "auto") is not None
    custom = smi_hub.get_transforms(model)
    custom.transforms.insert(1, lambda im: im)
    assert device_decoder(files, custom, torch.device("cuda"), "auto") is None
    assert device_decoder(None, tfm, torch.device("cuda"), "auto") is None
    with pytest.raises(ValueError, match="custom transform"):
        device_decoder(files, custom, CPU, "device")
    with pytest.raises(ValueError, match="image files"):
        smi_hub.extract_features(model, torch.zeros(2, 3, 32, 32), decode="device")
    with pytest.raises(ValueError, match="decode must be one of"):
        device_decoder(files, tfm, CPU, "gpu")


@pytest.mark.slow
def test_cli_extract_decode_device(model, photo_dir, tmp_path, capsys):
    weights = tmp_path / "weights"
    smi_hub.save_weights_folder(model, weights)
    files = tmp_path / "list.txt"
    files.write_text("\n".join(_files(photo_dir)[:3]) + "\n")
    for mode in ("cpu", "device"):
        out = tmp_path / mode
        argv = ["extract", str(files), "-o", str(out), "--model", str(weights), "--decode", mode]
        assert main(argv) == 0
    cpu, dev = (
        smi_hub.FeatureStore.open(tmp_path / "cpu"),
        smi_hub.FeatureStore.open(tmp_path / "device"),
    )
    assert dev.paths == cpu.paths
    a, b = dev.to_tensor(), cpu.to_tensor()
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() <= FEATURE_REL_ERR


def test_extract_decodes_where_the_library_does_by_default():
    """`smi-hub extract` without --decode decodes where `extract_features` does by default
    (auto: on the device only on CUDA), as its --help says."""
    import inspect

    from smi_hub.cli import build_parser

    args = build_parser().parse_args(["extract", "photos/", "-o", "store/"])
    default = inspect.signature(smi_hub.extract_features).parameters["decode"].default
    assert args.decode == default == "auto"
