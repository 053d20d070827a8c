"""Gaps a mutation run (make mutation, docs/testing.md) found, and the suite's own rule: no
silent skips (tests/conftest.py)."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smi_hub.errors import ImageLoadError
from smi_hub.images import check_size, decode_cost, list_images, load_image, to_rgb

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.slow
def test_a_skip_fails_the_run_unless_marked_gpu(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(
        test_allowed="""
import pytest

def test_ok():
    pass

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA")

@pytest.mark.xfail(reason="known", strict=True)
def test_known():
    assert False
"""
    )
    ok = pytester.runpytest("-p", "no:cacheprovider")
    ok.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert ok.ret == pytest.ExitCode.OK

    pytester.makepyfile(
        test_silent="""
import pytest

def test_missing_dependency():
    pytest.importorskip("no_such_module_anywhere")
"""
    )
    pytester.makepyfile(
        test_module_skip="""
import pytest

pytest.importorskip("no_such_module_anywhere")

def test_never_collected():
    pass
"""
    )
    bad = pytester.runpytest("-p", "no:cacheprovider")
    assert bad.ret == pytest.ExitCode.TESTS_FAILED
    bad.stdout.fnmatch_lines(
        [
            "*skipped tests not marked gpu (the run fails)*",
            "test_module_skip.py: *no_such_module_anywhere*",
            "test_silent.py::test_missing_dependency: *no_such_module_anywhere*",
        ]
    )


# ---- smi_hub.images: the exact conversion rules of its module docstring ----------------------


def _gray(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape[-1] == 3 and (rgb == rgb[..., :1]).all()  # gray replicated
    return rgb[..., 0]


def test_sixteen_bit_images_scale_by_65535():
    values = np.array([[0, 1, 128, 257, 32768, 65535]], dtype=np.uint16)
    expected = np.rint(values / 65535 * 255)
    assert (_gray(Image.fromarray(values, mode="I;16")) == expected).all()
    as_int = Image.fromarray(values.astype(np.int32), mode="I")  # how 16-bit PNGs often open
    assert (_gray(as_int) == expected).all()
    # an I image outside 0..65535 is scaled by its own range
    wide = np.array([[-1000, 0, 70000]], dtype=np.int32)
    assert _gray(Image.fromarray(wide, mode="I")).tolist() == [[0, 4, 255]]  # 1000 / 71000


def test_high_bit_depth_rules_at_their_edges():
    """Where the 16-bit rule and the min..max rule give different pixels, each mode takes its
    documented rule, rounded to the nearest integer."""
    fits = np.array([[0, 1000, 30000]], dtype=np.int32)  # an I image within 0..65535: 16-bit
    as16 = np.rint(fits / 65535 * 255)
    assert (_gray(Image.fromarray(fits, mode="I")) == as16).all()
    top = np.array([[20000, 30000, 65407, 65535]], dtype=np.int32)  # up to 65535 exactly
    assert (_gray(Image.fromarray(top, mode="I")) == np.rint(top / 65535 * 255)).all()
    over = np.array([[10000, 30000, 65536]], dtype=np.int32)  # past 65535: min..max
    assert (_gray(Image.fromarray(over, mode="I")) == np.rint((over - 10000) / 55536 * 255)).all()
    unit = np.linspace(0.0, 1.0, 101, dtype=np.float32)[None]  # F in [0, 1]: times 255
    expected = np.rint(unit.astype(np.float64) * 255)
    assert (_gray(Image.fromarray(unit, mode="F")) == expected).all()
    upper = np.linspace(0.5, 1.0, 51, dtype=np.float32)[None]  # reaching 1.0 exactly
    expected = np.rint(upper.astype(np.float64) * 255)
    assert (_gray(Image.fromarray(upper, mode="F")) == expected).all()
    spread = np.linspace(-3.0, 7.0, 101, dtype=np.float32)[None]  # min..max
    expected = np.rint((spread.astype(np.float64) + 3.0) * (255.0 / 10.0))
    assert (_gray(Image.fromarray(spread, mode="F")) == expected).all()


def test_list_images_lists_images_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.JPG", "notes.txt", "c.png.bak"):
        (tmp_path / name).write_bytes(b"x")
    assert list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "sub" / "b.JPG"]
    with pytest.raises(FileNotFoundError) as e:
        list_images(tmp_path / "nowhere")
    assert str(e.value) == f"{tmp_path / 'nowhere'} is not a folder of images."
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "sub")  # a folder where an image was expected
    assert str(e.value) == (
        f"{tmp_path / 'sub'}: a folder that could not be listed (permission denied?); its "
        "images were not read. Make it readable (chmod a+rx) and run again."
    )


def test_float_images_scale_by_255_or_their_range():
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    assert _gray(Image.fromarray(unit, mode="F")).tolist() == [[0, 64, 128, 255]]
    wider = np.array([[0.0, 0.5, 2.0]], dtype=np.float32)  # not in [0, 1]: min..max
    assert _gray(Image.fromarray(wider, mode="F")).tolist() == [[0, 64, 255]]
    for constant, gray in [(300.0, 255), (-5.0, 0), (0.4, 102), (100.0, 100)]:
        flat = np.full((2, 2), constant, dtype=np.float32)  # constant: clipped to 0..255
        assert (_gray(Image.fromarray(flat, mode="F")) == gray).all(), constant
    # NaN and infinities count as 0 before scaling
    odd = np.array([[0.0, 0.5, np.nan, np.inf, -np.inf]], dtype=np.float32)
    assert _gray(Image.fromarray(odd, mode="F")).tolist() == [[0, 128, 0, 0, 0]]


def test_rgb_images_are_returned_as_they_are():
    rgb = Image.new("RGB", (3, 2), (10, 20, 30))
    assert to_rgb(rgb) is rgb


@pytest.mark.parametrize(
    "mode, per_pixel",
    [
        ("1", 1 + 4),
        ("L", 1 + 4),
        ("P", 1 + 16),  # a palette may be transparent: composited like RGBA
        ("LA", 4 + 16),
        ("RGBA", 4 + 16),
        ("RGB", 4 + 0),  # no conversion
        ("CMYK", 4 + 4),
        ("I;16", 2 + 22),  # float64 copy, scaled copy, uint8, L, RGB
        ("I", 4 + 22),
        ("F", 4 + 22),
    ],
)
def test_decode_cost_per_mode(mode, per_pixel):
    assert decode_cost(30, 20, mode) == 600 * per_pixel


def test_size_limits_and_their_messages():
    check_size(100, 100, "RGB", max_pixels=10_000, max_decode_bytes=40_000)  # exactly at both
    with pytest.raises(ImageLoadError) as e:
        check_size(100, 101, "RGB", max_pixels=10_000)
    assert str(e.value) == (
        "image: 100x101 pixels is more than the limit of 10,000; downscale the image first or "
        "raise max_pixels."
    )
    with pytest.raises(ImageLoadError) as e:
        check_size(1024, 1024, "F", max_decode_bytes=2**20 * 25)
    assert str(e.value) == (
        "image: decoding this 1024x1024 F image needs about 26 MiB, more than the budget of "
        "25 MiB; downscale it or convert it to 8-bit RGB first, or raise max_decode_bytes."
    )


def test_load_image_messages_name_the_file_and_the_error(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r": not a readable image \(UnidentifiedImageError: "):
        load_image(junk)
    big = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(big)
    with pytest.raises(ImageLoadError, match=r"^.*big\.png: 64x64 pixels is more than the limit"):
        load_image(big, max_pixels=100)
    with pytest.raises(ImageLoadError, match=r"downscale it first\.$"), pillow_bomb_limit():
        load_image(big)


@contextlib.contextmanager
def pillow_bomb_limit():
    """Pillow's own decompression-bomb error, raised as Pillow raises it for huge files."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 64 x 64 is more than twice that: DecompressionBombError
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _png(image: Image.Image, **save) -> Image.Image:
    """``image`` as a PNG file decodes it: the tRNS key lands in ``info["transparency"]``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    reopened = Image.open(io.BytesIO(buf.getvalue()))
    reopened.load()
    return reopened


def test_png_transparency_key_composites_on_white_in_every_mode():
    """The tRNS key of an L, RGB or P PNG, and the alpha of an LA PNG, composite on white (the
    module docstring); colours that only nearly match the key stay, compared to numpy."""
    gray = np.array([[0, 90, 91], [180, 90, 255]], dtype=np.uint8)
    keyed_l = _png(Image.fromarray(gray, mode="L"), transparency=90)
    assert keyed_l.mode == "L" and keyed_l.info["transparency"] == 90
    assert (_gray(keyed_l) == np.where(gray == 90, 255, gray)).all()

    key = (10, 20, 30)
    rgb = np.array([[key, (10, 20, 31), (0, 0, 0)], [(30, 20, 10), key, (10, 0, 30)]], np.uint8)
    keyed_rgb = _png(Image.fromarray(rgb, mode="RGB"), transparency=key)
    assert keyed_rgb.mode == "RGB" and keyed_rgb.info["transparency"] == key
    hit = (rgb == key).all(axis=-1, keepdims=True)
    assert (np.asarray(to_rgb(keyed_rgb)) == np.where(hit, 255, rgb)).all()

    alpha = np.array([[0, 255, 128], [64, 255, 0]], dtype=np.uint8)
    la = _png(Image.fromarray(np.stack([gray, alpha], axis=-1), mode="LA"))
    a = alpha / 255
    assert np.abs(_gray(la) - (gray * a + 255 * (1 - a))).max() <= 1

    palette = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], dtype=np.uint8)
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    indexed = Image.fromarray(idx, mode="P")
    indexed.putpalette(palette.reshape(-1).tolist())
    keyed_p = _png(indexed, transparency=1)  # palette entry 1 is transparent
    assert keyed_p.mode == "P" and keyed_p.info["transparency"] == 1
    expected = np.where((idx == 1)[..., None], 255, palette[idx])
    assert (np.asarray(to_rgb(keyed_p)) == expected).all()


@pytest.mark.parametrize(("mode", "key"), [("L", 90), ("RGB", (10, 20, 30))])
def test_a_transparency_key_is_priced_as_the_composite_it_gets(tmp_path, mode, key):
    """An L or RGB PNG with a tRNS key goes through RGBA in to_rgb (17 or 20 bytes a pixel,
    not 5 or 4): the decode budget must count that, from the header, before decoding."""
    w, h = 100, 80
    keyed, plain = tmp_path / "keyed.png", tmp_path / "plain.png"
    Image.new(mode, (w, h), key).save(keyed, transparency=key)
    Image.new(mode, (w, h), key).save(plain)
    stored = 1 if mode == "L" else 4
    assert decode_cost(w, h, mode, transparency_key=True) == w * h * (stored + 16)
    assert decode_cost(w, h, mode) == w * h * (stored + (4 if mode == "L" else 0))
    budget = decode_cost(w, h, mode, transparency_key=True) - 1
    assert np.asarray(load_image(plain, max_decode_bytes=budget)).shape == (h, w, 3)
    with pytest.raises(ImageLoadError, match="more than the budget"):
        load_image(keyed, max_decode_bytes=budget)
    with pytest.raises(ImageLoadError, match="more than the budget"):
        check_size(w, h, mode, max_decode_bytes=budget, transparency_key=True)
    assert np.asarray(load_image(keyed, max_decode_bytes=budget + 1))[0, 0].tolist() == [255] * 3
