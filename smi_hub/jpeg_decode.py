"""JPEG decoding on the model's device for :func:`smi_hub.extract_features`.

With device decoding, the DataLoader workers only read each file's bytes after the header checks
:func:`smi_hub.images.load_image` makes before decoding (size and decode-memory limits), and the
batch is decoded by ``torchvision.io.decode_jpeg`` on the model's device (nvjpeg on CUDA) and
preprocessed there as tensors: ``get_transforms``' resize (bicubic, antialiased, in Pillow's
two rounded passes), center crop, scaling to [0, 1] and normalization (:class:`TensorPreprocess`).

A file takes the careful CPU path (``load_image`` + the transform, in the worker) when it is not
a plain JPEG: another format, a mode other than RGB or grayscale (CMYK ...), an EXIF orientation
other than 1, a file that does not end with the JPEG end-of-image marker (truncated), or one
whose header is refused. A file the batched decoder cannot take is decoded alone, and if that
fails too it goes the careful CPU path in this process; so unreadable files are skipped and
reported exactly as without device decoding. Row order is the input order.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from smi_hub.errors import ImageLoadError
from smi_hub.images import check_size, load_image
from smi_hub.transforms import ToRGB

DECODE_MODES = ("auto", "cpu", "device")
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112
Item = tuple[torch.Tensor | None, int, None, str | None]
Batch = tuple[torch.Tensor | None, list[int], list, list[tuple[int, str]]]


class TensorPreprocess:
    """``get_transforms``' chain (ToRGB, Resize, CenterCrop, ToTensor, Normalize) on decoded
    uint8 C x H x W tensors, on whatever device they are. The resize runs as Pillow's does:
    the horizontal pass, rounded to 8 bits, then the vertical pass, rounded (torchvision's
    antialiased bicubic kernel on float values; one float pass instead differs from Pillow by
    up to 23 grey levels where a small image is upscaled, this by at most 1)."""

    def __init__(self, size: int, crop: T.CenterCrop, normalize: T.Normalize) -> None:
        self.size, self.crop, self.normalize = size, crop, normalize

    @classmethod
    def of(cls, transform: Callable) -> TensorPreprocess | None:
        """The tensor form of ``transform``, or None if it is not ``get_transforms``' chain
        (a custom transform keeps the CPU path)."""
        ops = getattr(transform, "transforms", None)
        kinds = (ToRGB, T.Resize, T.CenterCrop, T.ToTensor, T.Normalize)
        if not isinstance(transform, T.Compose) or len(ops) != len(kinds):
            return None
        if not all(type(op) is kind for op, kind in zip(ops, kinds, strict=True)):
            return None
        resize = ops[1]
        size = resize.size if isinstance(resize.size, int) else list(resize.size)
        if isinstance(size, list) and len(size) == 1:
            size = size[0]
        if (
            not isinstance(size, int)
            or resize.max_size is not None
            or resize.interpolation != T.InterpolationMode.BICUBIC
            or resize.antialias is False
        ):
            return None
        return cls(size, ops[2], ops[4])

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if h <= w:  # the short side to ``size``, the long one scaled and truncated (Resize)
            out_h, out_w = self.size, int(self.size * w / h)
        else:
            out_h, out_w = int(self.size * h / w), self.size
        x = image.float()
        for size in ([h, out_w], [out_h, out_w]):
            x = TF.resize(x, size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
            x = x.round_().clamp_(0, 255)
        return x

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 3 x H x W images (sizes may differ) -> a normalized float32 batch."""
        x = torch.stack([self.crop(self._resize(im)) for im in images])
        return self.normalize(x.div_(255))


def read_jpeg(path: str) -> torch.Tensor | None:
    """The bytes of ``path`` as a 1-D uint8 tensor if it is a plain JPEG the device decoder may
    take (module docstring) and passes ``load_image``'s header checks; None otherwise (the
    careful CPU path then reads it and reports any problem)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.endswith(_EOI):
            return None
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if im.getexif().get(_ORIENTATION, 1) != 1:
                return None
            check_size(im.width, im.height, im.mode, name=path)
    except Exception:  # missing, unreadable, not an image, over a limit: the careful path says
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class EncodedFiles(torch.utils.data.Dataset):
    """Image files -> (JPEG bytes | preprocessed tensor | None, index, None, error message):
    plain JPEGs as bytes for the device, every other file through ``load_image`` + the
    transform, as ``smi_hub.feature_sources`` reads files without device decoding."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        raw = read_jpeg(self.paths[i])
        if raw is not None:
            return raw, i, None, None
        return careful(self.paths[i], self.transform, i)


def careful(path: str, transform: Callable, i: int) -> Item:
    """The CPU path of one file: ``load_image`` + ``transform``, errors as messages."""
    try:
        return transform(load_image(path)), i, None, None
    except ImageLoadError as e:
        return None, i, None, str(e)
    except Exception as e:  # a transform failing on an odd image: report, don't abort
        return None, i, None, f"{path}: {type(e).__name__}: {e}"


def collate_encoded(batch: list[Item]) -> tuple[list[torch.Tensor], list[int], list, list]:
    """Workers' items -> (tensors: 1-D JPEG bytes or preprocessed images, indexes, labels,
    (index, reason) of the unreadable)."""
    ok = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[3]) for b in batch if b[0] is None]
    return [b[0] for b in ok], [b[1] for b in ok], [None] * len(ok), bad


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 marks its image decoders deprecated
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities")
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


class DeviceDecoder:
    """Finishes a batch of :class:`EncodedFiles` on ``device``: decodes the JPEG bytes (all in
    one call; one by one if that call fails), preprocesses them, falls back to the careful CPU
    path for a file the decoder refused, and returns ``smi_hub.feature_sources``' batch
    ``(x, indexes, labels, failed)`` with ``x`` on ``device``, rows in index order."""

    def __init__(self, files: EncodedFiles, preprocess: TensorPreprocess, device: torch.device):
        self.files, self.preprocess, self.device = files, preprocess, device

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded images (None where the decoder refused the file): one call for the batch;
        one call per file if that fails."""
        if not data:
            return []
        try:
            return list(_decode(data, self.device))
        except (RuntimeError, ValueError):
            out: list[torch.Tensor | None] = []
            for raw in data:
                try:
                    out.append(_decode([raw], self.device)[0])
                except (RuntimeError, ValueError):
                    out.append(None)
            return out

    def __call__(self, batch: tuple[list[torch.Tensor], list[int], list, list]) -> Batch:
        items, idx, _, bad = batch
        raw = [k for k, t in enumerate(items) if t.ndim == 1]
        decoded = dict(zip(raw, self._decode([items[k] for k in raw]), strict=True))
        images: dict[int, torch.Tensor] = {}
        ready = [k for k in raw if decoded.get(k) is not None]
        if ready:
            images = dict(zip(ready, self.preprocess([decoded[k] for k in ready]), strict=True))
        rows: list[torch.Tensor] = []
        keep: list[int] = []
        failed = list(bad)
        for k, i in enumerate(idx):
            if k in images:
                x = images[k]
            elif k in decoded:  # the decoder refused it: the careful path decides
                x, _, _, reason = careful(self.files.paths[i], self.files.transform, i)
                if x is None:
                    failed.append((i, reason))
                    continue
            else:
                x = items[k]
            rows.append(x.to(self.device))
            keep.append(i)
        x = torch.stack(rows) if rows else None
        return x, keep, [None] * len(keep), sorted(failed)


def device_decoder(
    paths: Sequence[str] | None, transform: Callable, device: torch.device, mode: str
) -> DeviceDecoder | None:
    """The decoder ``extract_features(decode=mode)`` uses for these image files, or None for
    the CPU path. ``mode``: ``cpu``; ``device`` (``ValueError`` if the input is not image files
    or ``transform`` is not ``get_transforms``' chain); ``auto`` = ``device`` on CUDA when
    possible, else ``cpu``."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {mode!r}.")
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None
    preprocess = TensorPreprocess.of(transform)
    if mode == "device":
        if paths is None:
            raise ValueError(
                "decode='device' decodes image files (a folder, a list file or paths); this "
                "input is decoded on the CPU: use decode='cpu' or 'auto'."
            )
        if preprocess is None:
            raise ValueError(
                "decode='device' applies get_transforms' preprocessing to tensors; a custom "
                f"transform ({transform!r}) runs on the CPU: use decode='cpu' or 'auto'."
            )
    if paths is None or preprocess is None:
        return None
    return DeviceDecoder(EncodedFiles(paths, transform), preprocess, device)


def extract_header(decoder: DeviceDecoder | None) -> dict[str, Any]:
    """What device decoding adds to a feature store's header (nothing for the CPU path), so a
    store is not resumed with the other decoder."""
    return {} if decoder is None else {"decode": "device"}
