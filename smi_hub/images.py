"""Reading images of any mode into RGB, with clear errors for unusable files.

Every image, whatever its mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, YCbCr ...), goes
through the same RGB pipeline: grayscale is replicated to three channels, alpha is composited
on white, 16-bit and float images are rescaled to 8 bits by their value range.
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` fully (EXIF orientation applied) and return it as RGB.

    Raises ``ImageLoadError`` naming the file for missing, non-image, truncated or oversized
    files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file.")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ImageLoadError(
                    f"{path}: {im.width}x{im.height} pixels is more than the limit of "
                    f"{max_pixels:,}; downscale the image first or raise max_pixels."
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageLoadError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise ImageLoadError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from e


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images.")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
