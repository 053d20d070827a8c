"""The bad-input suite (docs/reliability.md): weights folders, images and the command line.

Each parametrized case is one row of docs/reliability.md. Every case ends with a specific error
naming the problem (or is handled), checked before anything expensive is built or computed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_header_only
from PIL import Image
from safetensors.torch import load_file, save_file

import smi_hub
from smi_hub.cli import main
from smi_hub.errors import ChecksumError, ImageLoadError, UnsupportedFormatError, WeightsError
from smi_hub.fileio import sha256_file
from smi_hub.images import decode_cost, list_images, load_image, to_rgb
from smi_hub.weights import UnverifiedWeightsWarning, read_config

FMNIST = {"image_size": 28, "mean": [0.286] * 3, "std": [0.353] * 3}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small weights folder, saved once; tests copy it before changing it."""
    torch.manual_seed(0)
    m = smi_hub.SMIModel(
        arch="resnet18", base_width=4, small_stem=True, projector_dims=[8], **FMNIST
    )
    return smi_hub.save_weights_folder(m.eval(), tmp_path_factory.mktemp("w") / "tiny")


@pytest.fixture
def weights(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "weights"))


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


_DELETE = object()

# ============================================================================================
# Weights: config.json fields are validated before anything is built
# ============================================================================================

BAD_CONFIG = {
    "base_width_huge": ("base_width", 10_000_000),
    "base_width_large": ("base_width", 100_000),
    "base_width_zero": ("base_width", 0),
    "base_width_negative": ("base_width", -4),
    "base_width_float": ("base_width", 16.5),
    "base_width_bool": ("base_width", True),
    "base_width_string": ("base_width", "16"),
    "base_width_null": ("base_width", None),
    "arch_unknown": ("arch", "resnet1000"),
    "arch_number": ("arch", 50),
    "arch_list": ("arch", ["resnet18"]),
    "image_size_zero": ("image_size", 0),
    "image_size_negative": ("image_size", -28),
    "image_size_tiny": ("image_size", 1),
    "image_size_huge": ("image_size", 100_000),
    "image_size_float": ("image_size", 28.0),
    "mean_two_values": ("mean", [0.5, 0.5]),
    "mean_four_values": ("mean", [0.5] * 4),
    "mean_nan": ("mean", [float("nan")] * 3),
    "mean_inf": ("mean", [0.5, float("inf"), 0.5]),
    "mean_string": ("mean", "0.5"),
    "mean_huge": ("mean", [1e6] * 3),
    "mean_null": ("mean", None),
    "std_zero": ("std", [0, 0, 0]),
    "std_one_zero": ("std", [0.3, 0.0, 0.3]),
    "std_negative": ("std", [-0.3] * 3),
    "std_nan": ("std", [float("nan")] * 3),
    "std_inf": ("std", [float("inf")] * 3),
    "std_scalar": ("std", 0.3),
    "std_strings": ("std", ["a", "b", "c"]),
    "projector_negative": ("projector_dims", [-8]),
    "projector_zero": ("projector_dims", [0]),
    "projector_huge": ("projector_dims", [10**9]),
    "projector_not_list": ("projector_dims", 8),
    "projector_too_deep": ("projector_dims", [8] * 20),
    "projector_float": ("projector_dims", [8.5]),
    "small_stem_string": ("small_stem", "yes"),
    "num_classes_negative": ("num_classes", -1),
    "num_classes_huge": ("num_classes", 10**9),
    "num_classes_string": ("num_classes", "10"),
    "class_names_not_strings": ("class_names", [1, 2]),
    "weights_sha256_short": ("weights_sha256", "abc"),
    "weights_sha256_number": ("weights_sha256", 5),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_field_refused_before_building(weights, case, monkeypatch):
    key, value = BAD_CONFIG[case]
    edit_config(weights, **{key: value})
    built = []

    def build(self, *args, **kwargs):  # record instead of allocating (base_width 10 M ...)
        built.append(kwargs)
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(smi_hub.SMIModel, "__init__", build)
    for pretrained in (True, False):
        with pytest.raises(WeightsError) as e:
            smi_hub.load(weights, pretrained=pretrained)
        msg = str(e.value)
        assert f"{key} = " in msg and "config.json" in msg, msg
        assert "must be" in msg  # the allowed range
    with pytest.raises(WeightsError, match=key):
        smi_hub.get_transforms(str(weights))
    assert built == []  # refused before any layer was allocated


BAD_CONFIG_FILE = {
    "not_json": b"{not json",
    "not_utf8": b"\xff\xfe\x00garbage",
    "json_list": b"[1, 2, 3]",
    "json_string": b'"resnet18"',
    "empty": b"",
    "arch_missing": json.dumps({"base_width": 4}).encode(),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILE))
def test_unparsable_config_refused(weights, case):
    (weights / "config.json").write_bytes(BAD_CONFIG_FILE[case])
    with pytest.raises(WeightsError, match="config.json"):
        smi_hub.load(weights)


@pytest.mark.parametrize("version", [99, "1", 1.5], ids=["future", "string", "float"])
def test_format_version_refused(weights, version):
    edit_config(weights, format_version=version)
    with pytest.raises(UnsupportedFormatError, match="format_version"):
        read_config(weights)


def test_config_missing(weights):
    (weights / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json not found"):
        smi_hub.load(weights)


def test_valid_config_still_loads(weights):
    model = smi_hub.load(weights)
    assert model.base_width == 4 and model.image_size == 28


# ---- tensors: dtypes, non-finite values, the recorded sha256 ---------------------------------


def rewrite_weights(folder: Path, change) -> None:
    """Apply ``change`` to the state dict and record the new sha256 (a consistent folder)."""
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    edit_config(folder, weights_sha256=sha256_file(folder / "model.safetensors"))


BAD_DTYPES = {
    "int8_conv": ("conv1.weight", torch.int8),
    "int32_bn": ("bn1.weight", torch.int32),
    "uint8_projector": ("projector.0.weight", torch.uint8),
    "bool_bias": ("bn1.bias", torch.bool),
}


@pytest.mark.parametrize("case", list(BAD_DTYPES))
def test_non_float_tensors_refused(weights, case):
    name, dtype = BAD_DTYPES[case]

    def change(state):
        state[name] = state[name].to(dtype)

    rewrite_weights(weights, change)
    with pytest.raises(WeightsError, match=rf"{name}: torch\.{str(dtype).split('.')[1]}"):
        smi_hub.load(weights)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_warned(weights, value):
    def change(state):
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = value

    rewrite_weights(weights, change)
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite values in 1 tensor\(s\): layer1"):
        smi_hub.load(weights)


def test_half_precision_weights_accepted(weights):
    def change(state):
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v.half()

    rewrite_weights(weights, change)
    assert smi_hub.load(weights).conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("with_projector", [True, False], ids=["projector", "backbone"])
def test_sha256_always_written_and_checked(tmp_path, with_projector):
    m = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    out = smi_hub.save_weights_folder(m, tmp_path / "w", with_projector=with_projector)
    cfg = read_config(out)
    assert cfg["weights_sha256"] == sha256_file(out / "model.safetensors")
    edit_config(out, weights_sha256="0" * 64)
    with pytest.raises(ChecksumError, match="expected 0000"):
        smi_hub.load(out)


def test_missing_sha256_warns(weights):
    edit_config(weights, weights_sha256=_DELETE)
    with pytest.warns(UnverifiedWeightsWarning, match="records no weights_sha256"):
        model = smi_hub.load(weights)
    assert model.base_width == 4
    # an explicit sha256 verifies it without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWeightsWarning)
        smi_hub.load(weights, sha256=sha256_file(weights / "model.safetensors"))


# ---- permissions follow the umask ------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def test_weights_folder_modes_follow_umask(tmp_path, umask):
    m = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    before = os.umask(umask)
    try:
        out = smi_hub.save_weights_folder(m, tmp_path / "pub" / "w")
        smi_hub.save_weights_folder(m, out)  # overwriting keeps the modes too
    finally:
        os.umask(before)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    for d in (out, out.parent):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, d


# ============================================================================================
# Images: every mode to RGB, checked against numpy
# ============================================================================================


def rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out).astype(np.int64)


def gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.rint(a).astype(np.int64)[..., None], 3, axis=2)


RNG = np.random.default_rng(0)


def _alpha_case(mode: str):
    rgba = RNG.integers(0, 256, (9, 7, 4)).astype(np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent, opaque
    if mode == "LA":
        la = rgba[..., [0, 3]]
        image = Image.fromarray(la, mode="LA")
        color = np.repeat(la[..., :1], 3, axis=2).astype(np.float64)
        a = la[..., 1:].astype(np.float64) / 255
    else:
        image = Image.fromarray(rgba, mode="RGBA")
        color, a = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255
    return image, color * a + 255 * (1 - a)  # composited on white


def _p_transparency():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = RNG.integers(0, 256, (6, 8)).astype(np.uint8)
    idx[0, :] = 5
    image = Image.fromarray(idx, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    image.info["transparency"] = 5  # index 5 is transparent: white
    want = palette[idx].astype(np.float64)
    want[idx == 5] = 255
    return image, want


def _p_opaque():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = RNG.integers(0, 256, (6, 8)).astype(np.uint8)
    image = Image.fromarray(idx, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    return image, palette[idx].astype(np.float64)


def _i16(values: np.ndarray, mode: str = "I;16"):
    image = Image.fromarray(values.astype(np.uint16))
    if mode == "I;16B":
        image = Image.frombytes("I;16B", image.size, values.astype(">u2").tobytes())
    return image, gray3(values.astype(np.float64) * 255 / 65535)


def _int32(values: np.ndarray):
    return Image.fromarray(values.astype(np.int32), mode="I"), values.astype(np.float64)


def _float(values: np.ndarray):
    return Image.fromarray(values.astype(np.float32), mode="F"), values.astype(np.float64)


def _minmax(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) * 255 / (v.max() - v.min())


def _cmyk():
    cmyk = RNG.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    c = cmyk.astype(np.float64)
    want = 255 * (1 - c[..., :3] / 255) * (1 - c[..., 3:] / 255)
    return Image.fromarray(cmyk, mode="CMYK"), want


def _mode_cases():
    wide16 = RNG.integers(0, 65536, (8, 9))
    low16 = RNG.integers(0, 4096, (8, 9))  # 12-bit data in a 16-bit file: dark, like a viewer
    cases = {
        "RGBA": _alpha_case("RGBA"),
        "LA": _alpha_case("LA"),
        "P_transparency": _p_transparency(),
        "P_opaque": _p_opaque(),
        "CMYK": _cmyk(),
        "I16_full_range": _i16(wide16),
        "I16_12bit_data": _i16(low16),
        "I16_big_endian": _i16(wide16, "I;16B"),
        "I16_constant_white": _i16(np.full((4, 4), 65535)),
        "I16_constant_black": _i16(np.zeros((4, 4))),
    }
    v = RNG.integers(0, 65536, (5, 5))
    image, raw = _int32(v)
    cases["I32_16bit_values"] = (image, gray3(raw * 255 / 65535))
    v = RNG.integers(-(2**31), 2**31 - 1, (5, 5), dtype=np.int64)
    image, raw = _int32(v)
    cases["I32_full_range"] = (image, gray3(_minmax(raw)))
    image, raw = _int32(np.full((3, 3), -7))
    cases["I32_constant_negative"] = (image, gray3(np.zeros((3, 3))))
    v = RNG.random((6, 4))
    image, raw = _float(v)
    cases["F_unit_range"] = (image, gray3(raw * 255))
    v = RNG.normal(0, 100, (6, 4))
    image, raw = _float(v)
    cases["F_wide_range"] = (image, gray3(_minmax(raw)))
    image, raw = _float(np.full((3, 3), 1000.0))
    cases["F_constant_bright"] = (image, gray3(np.full((3, 3), 255.0)))
    return cases


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_to_rgb_against_numpy(case):
    image, want = MODE_CASES[case]
    got = rgb(image)
    want = np.broadcast_to(want, got.shape)
    assert np.abs(got - np.rint(want)).max() <= 1, case  # Pillow's integer rounding


def test_to_rgb_float_nan_is_black():
    v = np.array([[0.0, 0.5], [np.nan, 1.0]], dtype=np.float32)
    got = rgb(Image.fromarray(v, mode="F"))
    assert got[1, 0].tolist() == [0, 0, 0] and got[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["1", "L", "YCbCr", "RGB", "HSV"])
def test_to_rgb_plain_modes_match_pillow(mode):
    base = Image.fromarray(RNG.integers(0, 256, (6, 5, 3)).astype(np.uint8), mode="RGB")
    image = base.convert(mode)
    assert np.array_equal(rgb(image), np.asarray(image.convert("RGB")))


# ---- files: refused before decoding, with the file named -------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _good_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (20, 20)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BAD_FILES = {
    "missing": (lambda d: d / "missing.png", "no such file"),
    "folder": (lambda d: (d / "dir.png").mkdir() or d / "dir.png", "a folder"),
    "broken_symlink": (
        lambda d: (d / "link.png").symlink_to(d / "gone.png") or d / "link.png",
        "broken symbolic link",
    ),
    "text": (lambda d: _write(d / "t.png", b"hello"), "not a readable image"),
    "empty": (lambda d: _write(d / "e.png", b""), "not a readable image"),
    "truncated": (lambda d: _write(d / "c.png", _good_png()[:60]), "not a readable image"),
    "html_as_jpg": (lambda d: _write(d / "h.jpg", b"<html></html>"), "not a readable image"),
    "header_only": (lambda d: _write(d / "h.png", png_header_only(64, 64)), "not a readable"),
    "bomb_over_limit": (
        lambda d: _write(d / "b.png", png_header_only(9000, 9000)),
        "9000x9000 pixels is more than the limit of 64,000,000",
    ),
    "bomb_over_pillow_limit": (
        lambda d: _write(d / "p.png", png_header_only(30000, 30000)),
        "more than the limit",
    ),
    "bomb_huge_header": (
        lambda d: _write(d / "z.png", png_header_only(2**31 - 1, 2**31 - 1)),
        "more than the limit",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_files(tmp_path, case):
    make, expected = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("mode", "bits", "color", "budget_mib", "ok"),
    [
        ("1", 1, 0, 300, True),  # 40 MP 1-bit: 40 M x (1 + 4) bytes = 191 MiB
        ("1", 1, 0, 150, False),
        ("RGBA", 8, 6, 300, False),  # 40 MP RGBA: 40 M x 20 bytes = 763 MiB
        ("I;16", 16, 0, 300, False),  # 40 MP 16-bit: 40 M x 24 bytes = 916 MiB
    ],
    ids=["1bit_in_budget", "1bit_over_budget", "rgba_over_budget", "16bit_over_budget"],
)
def test_decode_budget_checked_from_header(tmp_path, mode, bits, color, budget_mib, ok):
    path = _write(tmp_path / "x.png", png_header_only(8000, 5000, bits, color))
    with Image.open(path) as im:
        assert im.mode == mode
    assert decode_cost(8000, 5000, mode) == 8000 * 5000 * {"1": 5, "RGBA": 20, "I;16": 24}[mode]
    with pytest.raises(ImageLoadError) as e:  # refused or, in budget, fails decoding the stub
        load_image(path, max_pixels=40_000_000, max_decode_bytes=budget_mib << 20)
    assert ("more than the budget" in str(e.value)) is not ok, str(e.value)


def test_exif_orientation_applied(tmp_path):
    im = Image.fromarray(RNG.integers(0, 256, (10, 30, 3)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


# ---- folders: what cannot be read is reported, never silently skipped ------------------------


def small_gallery(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(RNG.integers(0, 256, (28, 28)).astype(np.uint8)).save(root / f"a/{i}.png")
    return root


@pytest.mark.slow
def test_broken_symlink_listed_and_failed(tmp_path, tiny):
    g = small_gallery(tmp_path / "g")
    (g / "a" / "dead.png").symlink_to(tmp_path / "nowhere.png")
    assert g / "a" / "dead.png" in list_images(g)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        result = smi_hub.extract_features(smi_hub.load(tiny), g, progress=False)
    assert len(result) == 2
    assert [(Path(p).name, "broken symbolic link" in r) for p, r in result.failed] == [
        ("dead.png", True)
    ]


@pytest.mark.slow
def test_unreadable_subfolder_listed_and_failed(tmp_path, tiny, deny_listing):
    g = small_gallery(tmp_path / "g")
    (g / "locked").mkdir()
    Image.new("L", (28, 28)).save(g / "locked" / "x.png")
    deny_listing(g / "locked")
    assert g / "locked" in list_images(g)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        result = smi_hub.extract_features(smi_hub.load(tiny), g, progress=False)
    assert len(result) == 2 and len(result.failed) == 1
    path, reason = result.failed[0]
    assert path == str(g / "locked") and "could not be listed" in reason


def test_symlink_to_image_is_read(tmp_path):
    g = small_gallery(tmp_path / "g")
    (g / "link.png").symlink_to(g / "a" / "0.png")
    assert load_image(g / "link.png").size == (28, 28)
    assert g / "link.png" in list_images(g)


# ============================================================================================
# CLI: every user error is a message and an exit status, checked before any work
# ============================================================================================


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command loads a model or extracts anything."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started working before checking its arguments")

    import smi_hub.features
    import smi_hub.hub

    monkeypatch.setattr(smi_hub.hub, "load", forbidden)
    monkeypatch.setattr(smi_hub.features, "extract_features", forbidden)


def _cli_commands(tmp_path: Path, weights: Path) -> dict[str, list[str]]:
    g = small_gallery(tmp_path / "g")
    return {
        "extract": ["extract", str(g), "-o", str(tmp_path / "out"), "--model", str(weights)],
        "index": ["index", str(g), "-o", str(tmp_path / "idx"), "--model", str(weights)],
        "search": ["search", str(tmp_path / "idx"), str(g / "a" / "0.png")],
        "predict": ["predict", str(weights), str(g / "a" / "0.png")],
    }


DEVICES = {
    "banana": ("banana", "is not a device name"),
    "cuda_99": ("cuda:99", "--device cuda:99"),
    "cuda_text_index": ("cuda:x", "is not a device name"),
    "meta": ("meta", "runs on cpu, cuda or mps"),
    "cuda_without_gpu": ("cuda", "no CUDA GPU is usable here"),
}


@pytest.mark.parametrize("command", ["extract", "index", "search", "predict"])
@pytest.mark.parametrize("case", list(DEVICES))
def test_bad_device_exit_2(tmp_path, weights, capsys, no_work, command, case):
    device, expected = DEVICES[case]
    argv = [*_cli_commands(tmp_path, weights)[command], "--device", device]
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        expected = None  # a GPU machine: the device is fine, the (forbidden) work starts
    if expected is None:
        with pytest.raises(AssertionError, match="started working"):
            main(argv)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"smi-hub {command}: error:" in err and expected in err, err


def _outputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    afile = tmp_path / "taken.txt"
    afile.write_text("keep me")
    return {
        "existing_file": (str(afile), "exists and is not a folder"),
        "below_a_file": (str(afile / "sub"), "is a file"),
        "read_only": ("/sys/smi-hub-test-out", "cannot write in /sys"),
        "empty": ("", "is empty"),
        "blank": ("  ", "is empty"),
    }


@pytest.mark.parametrize("command", ["extract", "index", "export"])
@pytest.mark.parametrize("case", ["existing_file", "below_a_file", "read_only", "empty", "blank"])
def test_bad_output_checked_before_work(tmp_path, weights, capsys, no_work, command, case):
    out, expected = _outputs(tmp_path)[case]
    if command == "export":
        ckpt = tmp_path / "last.pt"
        ckpt.write_bytes(b"never read")
        argv = ["export", str(ckpt), out]
    else:
        argv = _cli_commands(tmp_path, weights)[command]
        argv[argv.index("-o") + 1] = out
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert (tmp_path / "taken.txt").read_text() == "keep me"


EMPTY_INPUTS = {
    "extract_input": lambda t: ["extract", "", "-o", str(t / "o")],
    "index_folder": lambda t: ["index", "", "-o", str(t / "o")],
    "search_index": lambda t: ["search", "", "q.png"],
    "search_query": lambda t: ["search", str(t), ""],
    "export_checkpoint": lambda t: ["export", "", str(t / "o")],
    "extract_model": lambda t: ["extract", str(t), "-o", str(t / "o"), "--model", ""],
    "predict_model": lambda t: ["predict", "", "x.png"],
    "predict_image": lambda t: ["predict", "m", "x.png", " "],
}


@pytest.mark.parametrize("case", list(EMPTY_INPUTS))
def test_empty_input_path(tmp_path, capsys, no_work, case):
    assert main(EMPTY_INPUTS[case](tmp_path)) == 2
    assert "is empty" in capsys.readouterr().err


BAD_NUMBERS = {
    "search_k_0": ["search", "idx", "q.png", "-k", "0"],
    "search_k_negative": ["search", "idx", "q.png", "-k", "-3"],
    "search_k_text": ["search", "idx", "q.png", "-k", "all"],
    "quickstart_k_0": ["quickstart", "-k", "0"],
    "quickstart_eval_0": ["quickstart", "--eval", "0"],
    "quickstart_eval_negative": ["quickstart", "--eval", "-5"],
    "quickstart_per_class_0": ["quickstart", "--per-class", "0"],
    "quickstart_queries_negative": ["quickstart", "--queries", "-1"],
    "extract_batch_size_0": ["extract", "x", "-o", "o", "--batch-size", "0"],
    "index_workers_negative": ["index", "x", "-o", "o", "--workers", "-2"],
    "predict_top_0": ["predict", "m", "x.png", "-k", "0"],
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_numbers_are_usage_errors(capsys, no_work, case):
    with pytest.raises(SystemExit) as e:
        main(BAD_NUMBERS[case])
    assert e.value.code == 2
    flag = BAD_NUMBERS[case][-2]
    assert f"error: argument {flag}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "index"])
def test_folder_of_only_bad_files_fails(tmp_path, weights, capsys, command):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not a png")
    (bad / "y.jpg").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        code = main([command, str(bad), "-o", str(tmp_path / "out"), "--model", str(weights)])
    assert code == 1
    err = capsys.readouterr().err
    assert "x.png" in err or "2 unreadable" in err or "no input could be read" in err, err


RESULTS = {
    "not_json": (b"{oops", "not_json.json"),
    "binary": (b"\x00\xff\x00", "binary.json"),
    "json_list": (b"[1, 2]", "json_list.json"),
    "missing": (None, "missing.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESULTS))
def test_export_results_file_named(tmp_path, weights, capsys, case, run_checkpoint):
    data, name = RESULTS[case]
    ckpt = run_checkpoint(smi_hub.load(weights))
    results = tmp_path / name
    if data is not None:
        results.write_bytes(data)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--results", str(results)]) == 1
    assert str(results) in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow  # a fresh interpreter imports torch (about 10 s)
def test_user_error_has_no_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smi_hub.cli",
            "extract",
            str(tmp_path),
            "-o",
            "",
            "--device",
            "banana",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("smi-hub extract: error:")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_transparency_key_composites_on_white(tmp_path, mode):
    """A grayscale or RGB PNG whose tRNS chunk marks one colour transparent: those pixels
    become white, the others keep their value (as an independent numpy composite says)."""
    from smi_hub.images import load_image

    values = np.array([[0, 90], [180, 0]], dtype=np.uint8)
    if mode == "L":
        img, key = Image.fromarray(values), 0
    else:
        img, key = Image.fromarray(np.stack([values] * 3, axis=-1)), (0, 0, 0)
    path = tmp_path / f"keyed_{mode}.png"
    img.save(path, transparency=key)
    out = np.asarray(load_image(path))
    expected = np.where(values == 0, 255, values)
    assert (out == expected[..., None]).all()
