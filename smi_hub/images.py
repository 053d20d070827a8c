"""Reading images of any mode into RGB, with clear errors for unusable files.

Every image, whatever its mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, YCbCr ...), goes
through the same RGB pipeline: grayscale is replicated to three channels, alpha is composited
on white, CMYK is converted with ``R = 255 (1 - C/255)(1 - K/255)``, and high-bit-depth images
are scaled to 8 bits by their format's range: 16-bit (``I;16*``, and ``I`` images whose values
fit in 0..65535, which is how 16-bit files often open) by ``v * 255 / 65535``, float (``F``)
images in [0, 1] by 255; other ``I`` / ``F`` images by their min..max (a constant one is clipped
to 0..255).

Before any pixel is decoded, :func:`load_image` reads the size from the header and refuses
images over ``max_pixels`` or whose decode and conversion would need more than
``max_decode_bytes`` of memory (:func:`decode_cost`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smi_hub.errors import ImageLoadError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
MAX_PIXELS = 64_000_000  # about 8000 x 8000; larger files are refused (decompression bombs)
MAX_DECODE_BYTES = 2 << 30  # memory budget of decoding one image and converting it to RGB
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def decode_cost(width: int, height: int, mode: str, transparency_key: bool = False) -> int:
    """Bytes of memory that decoding a ``width`` x ``height`` image of ``mode`` and converting
    it to RGB needs (Pillow's storage of the decoded mode plus :func:`to_rgb`'s temporaries).
    ``transparency_key``: the image has a PNG ``tRNS`` colour key (``"transparency"`` in its
    ``info``), which sends ``L`` and ``RGB`` images through RGBA too."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if mode in _HIGH_BIT:
        work = 8 + 8 + 1 + 1 + 4  # float64 copy, scaled copy, uint8, L, RGB
    elif mode in _ALPHA or mode == "P" or (transparency_key and mode in ("L", "RGB")):
        work = 4 * 4  # RGBA, white background, composite, RGB
    else:
        work = 0 if mode == "RGB" else 4
    return width * height * (stored + work)


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit-depth pixel array scaled to 0..255 by its format's range (module docstring)."""
    lo, hi = float(arr.min()), float(arr.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.clip(arr, 0, 255)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
    keyed = "transparency" in image.info and image.mode in ("P", "L", "RGB")  # PNG tRNS key
    if image.mode == "RGB" and not keyed:
        return image
    if image.mode in _HIGH_BIT:
        arr = np.asarray(image).astype(np.float64)
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        return Image.fromarray(_to_uint8(arr, image.mode), mode="L").convert("RGB")
    if image.mode in _ALPHA or keyed:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
) -> Image.Image:
    """Open ``path`` fully (EXIF orientation applied) and return it as RGB.

    The size is read from the header first: images over ``max_pixels`` pixels, or whose
    decoding would need more than ``max_decode_bytes`` (:func:`decode_cost`), are refused
    before any pixel is decoded.

    Raises ``ImageLoadError`` naming the file for missing, non-image, truncated or oversized
    files.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_symlink() and not path.exists():
            raise ImageLoadError(f"{path}: broken symbolic link (its target does not exist).")
        if path.is_dir():
            raise ImageLoadError(
                f"{path}: a folder that could not be listed (permission denied?); its images "
                "were not read. Make it readable (chmod a+rx) and run again."
            )
        raise ImageLoadError(f"{path}: no such file.")
    try:
        with Image.open(path) as im:
            check_size(
                im.width, im.height, im.mode, max_pixels, max_decode_bytes, str(path),
                transparency_key="transparency" in im.info,
            )  # fmt: skip
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(
            f"{path}: the image is more than the limit of {max_pixels:,} pixels ({e}); "
            "downscale it first."
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        raise ImageLoadError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from e


def check_size(
    width: int,
    height: int,
    mode: str,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    name: str = "image",
    transparency_key: bool = False,
) -> None:
    """Raise ``ImageLoadError`` if an image of this size and mode (and PNG transparency key,
    see :func:`decode_cost`) is over either limit."""
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} pixels is more than the limit of {max_pixels:,}; "
            "downscale the image first or raise max_pixels."
        )
    cost = decode_cost(width, height, mode, transparency_key)
    if cost > max_decode_bytes:
        raise ImageLoadError(
            f"{name}: decoding this {width}x{height} {mode} image needs about "
            f"{cost / 2**20:,.0f} MiB, more than the budget of {max_decode_bytes / 2**20:,.0f} "
            "MiB; downscale it or convert it to 8-bit RGB first, or raise max_decode_bytes."
        )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension), sorted by path.

    Entries that cannot be read are listed too, so that reading them reports the problem
    (:func:`load_image` raises ``ImageLoadError`` naming it, callers list it as failed) instead
    of skipping them silently: broken symbolic links with an image extension, and sub-folders
    that could not be listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images.")
    found: list[Path] = []

    def unlistable(error: OSError) -> None:
        found.append(Path(error.filename))

    for root, _, names in os.walk(folder, onerror=unlistable):
        for name in names:
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or not p.exists()):
                found.append(p)
    return sorted(found)
