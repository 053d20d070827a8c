"""The inputs of :func:`smi_hub.extract_features`: folders, path lists, datasets and tensors as
sources with a fingerprint (what a resumed store must match), and their batches."""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from smi_hub.errors import ImageLoadError
from smi_hub.images import IMAGE_EXTENSIONS, list_images, load_image, to_rgb

_IMAGE_KEYS = ("image", "img", "pixel_values")


class _Files(Dataset):
    """Image files -> (tensor | None, index, error message)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int | None, str | None]:
        try:
            image = load_image(self.paths[i])
            return self.transform(image), i, None, None
        except ImageLoadError as e:
            return None, i, None, str(e)
        except Exception as e:  # a transform failing on an odd image: report, don't abort
            return None, i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"


def _array_to_pil(image: Any) -> Any:
    """uint8 H x W (x C) or C x H x W arrays/tensors (e.g. ``with_format("torch")`` image
    columns) -> PIL, so they get the model's preprocessing instead of passing through raw."""
    import numpy as np

    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            return image
        image = image.numpy()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        return image
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(np.ascontiguousarray(image))


def _sample(
    item: Any, i: int, transform: Callable, image_key: str | None
) -> tuple[torch.Tensor | None, int, int | None, str | None]:
    """One dataset item -> (tensor | None, index, label, error message)."""
    try:
        label = None
        if isinstance(item, dict):
            key = image_key or next((k for k in _IMAGE_KEYS if k in item), None)
            if key is None:
                raise KeyError(f"no image column among {sorted(item)}")
            image, label = item[key], item.get("label")
        elif isinstance(item, tuple | list):
            image = item[0]
            label = item[1] if len(item) > 1 else None
        else:
            image = item
        if isinstance(image, str | os.PathLike):
            image = load_image(image)
        image = _array_to_pil(image)
        if isinstance(image, Image.Image):
            image = transform(to_rgb(image))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"sample {i} is a {type(image).__name__}, not an image/tensor")
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            label = int(label)
        return image, i, label if isinstance(label, int | str) else None, None
    except Exception as e:
        return None, i, None, f"sample {i}: {type(e).__name__}: {e}"


class _Wrapped(Dataset):
    """A torch / Hugging Face dataset -> (tensor | None, index, label, error message)."""

    def __init__(self, base: Any, transform: Callable, image_key: str | None = None) -> None:
        self.base = base
        self.transform = transform
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int | None, str | None]:
        try:
            item = self.base[i]
        except Exception as e:
            return None, i, None, f"sample {i}: {type(e).__name__}: {e}"
        return _sample(item, i, self.transform, self.image_key)


def _collate(batch: list) -> tuple[torch.Tensor | None, list[int], list, list[tuple[int, str]]]:
    ok = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[3]) for b in batch if b[0] is None]
    x = torch.stack([b[0] for b in ok]) if ok else None
    return x, [b[1] for b in ok], [b[2] for b in ok], bad


def _hf_image_key(ds: Any) -> str | None:
    """The image column of a Hugging Face dataset (None: decide per row, for streams)."""
    features = getattr(ds, "features", None) or {}
    for key, feat in features.items():
        if type(feat).__name__ == "Image":
            return key
    columns = getattr(ds, "column_names", None)
    if columns is None:
        return None
    for key in _IMAGE_KEYS:
        if key in columns:
            return key
    raise ValueError(
        f"No image column in this Hugging Face dataset (columns: {columns}); "
        "cast one with ds.cast_column(name, datasets.Image())."
    )


def _is_hf(obj: Any, *names: str) -> bool:
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in names


@dataclass
class _Source:
    """Inputs, addressable by position: a tensor batch, a map-style dataset, or a stream.

    ``n`` is the number of inputs (for a stream: known once it was iterated); ``ids`` the file
    paths when the inputs are files (else rows are named by position); ``fingerprint`` computes
    what a resumed run must match (only called when a store is written: hashing a large input
    costs more than extracting its features on a GPU).
    """

    kind: str  # "tensor" | "dataset" | "stream"
    data: Any
    n: int | None
    ids: list[str] | None
    fingerprint: Callable[[], str]
    transform: Callable | None = None
    image_key: str | None = None


def _tensor_digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest()


def _images_digest(images: Sequence[Image.Image]) -> str:
    digest = hashlib.sha256()
    for im in images:
        digest.update(f"{im.mode}{im.size}".encode() + im.tobytes())
    return digest.hexdigest()


def _file_fingerprint(files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f}\t-\n".encode())
    return "files:" + digest.hexdigest()


def read_path_list(path: str | os.PathLike) -> list[str]:
    """Paths in a list file, one per line (blank lines and ``#`` comments skipped); relative
    paths are taken relative to the list file's folder."""
    path = Path(path)
    base = path.parent
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(str(p if p.is_absolute() else base / p))
    return out


def _source(data: Any, tfm: Callable) -> _Source:
    """Classify ``images_or_dataset`` (see :func:`extract_features`)."""
    if _is_hf(data, "DatasetDict", "IterableDatasetDict"):
        raise ValueError(
            f"This is a DatasetDict with splits {sorted(data)}; choose one: "
            f"ds[{sorted(data)[0]!r}] (CLI: --split {sorted(data)[0]})."
        )
    if isinstance(data, torch.Tensor) and data.dtype == torch.uint8:
        # raw pixels, e.g. a batch of a with_format("torch") image column (B x 1 x 28 x 28):
        # each image gets the model's preprocessing, as a list of PIL images would
        images = list(data.unsqueeze(0) if data.ndim == 2 else data)
        fp = lambda: f"uint8:{tuple(data.shape)}:{_tensor_digest(data.contiguous())}"  # noqa: E731
        return _Source("dataset", _Wrapped(images, tfm), len(images), None, fp)
    if isinstance(data, torch.Tensor):
        if data.ndim == 3:
            data = data.unsqueeze(0)
        if data.ndim != 4 or data.shape[1] != 3:
            raise ValueError(
                f"A float tensor input must be a preprocessed batch B x 3 x H x W, got "
                f"{tuple(data.shape)}; pass raw pixels as uint8 (B x C x H x W or B x H x W), "
                "PIL images or paths to get the model's preprocessing."
            )
        data = data.contiguous()
        fp = lambda: f"tensor:{tuple(data.shape)}:{_tensor_digest(data)}"  # noqa: E731
        return _Source("tensor", data, len(data), None, fp)
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if str(data) == "":
            raise FileNotFoundError("The input path is empty; name a folder, image or list file.")
        if path.is_dir():
            files = [str(p) for p in list_images(path)]
            if not files:
                raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        elif path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
            files = read_path_list(path)
            if not files:
                raise ValueError(f"{path} lists no image paths (one path per line).")
        elif path.is_file():
            files = [str(path)]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder of images.")
        return _Source(
            "dataset", _Files(files, tfm), len(files), files, lambda: _file_fingerprint(files)
        )
    if _is_hf(data, "Dataset"):
        key = _hf_image_key(data)
        fp = f"hf:{getattr(data, '_fingerprint', None)}:{len(data)}"
        base = data.with_format(None) if data.format.get("type") else data
        return _Source("dataset", _Wrapped(base, tfm, key), len(data), None, lambda: fp)
    if _is_hf(data, "IterableDataset"):
        key = _hf_image_key(data)
        base = data.with_format(None) if getattr(data, "_formatting", None) else data
        return _Source("stream", base, None, None, lambda: f"stream:{data!r}", tfm, key)
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            fp = f"stream:{type(data).__name__}"
            return _Source("stream", data, None, None, lambda: fp, tfm)
        fp = f"dataset:{type(data).__name__}:{len(data)}"
        return _Source("dataset", _Wrapped(data, tfm), len(data), None, lambda: fp)
    if isinstance(data, Sequence) and all(isinstance(p, str | os.PathLike) for p in data):
        files = [str(p) for p in data]
        return _Source(
            "dataset", _Files(files, tfm), len(files), files, lambda: _file_fingerprint(files)
        )
    if isinstance(data, Sequence) and all(isinstance(p, Image.Image) for p in data):
        images = list(data)
        return _Source(
            "dataset", _Wrapped(images, tfm), len(images), None, lambda: _images_digest(images)
        )
    raise TypeError(
        "images_or_dataset must be a folder, a path, a list file, a list of paths or PIL images, "
        "a datasets.Dataset / IterableDataset, a torch Dataset or a tensor batch; got "
        f"{type(data).__name__}."
    )


Batch = tuple[torch.Tensor | None, list[int], list, list[tuple[int, str]]]


def _batches(
    src: _Source,
    block: int,
    select: Callable[[int], bool],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    collate: Callable = _collate,
) -> Iterator[tuple[int, Batch]]:
    """``(k, batch)`` for the inputs of every selected block ``k`` (inputs
    ``[k * block, (k + 1) * block)``), in order. Batches never cross a block boundary and start
    at its first input, so a block's features do not depend on which blocks were selected."""
    if src.kind == "stream":
        yield from _stream_batches(src, block, select, batch_size)
        return
    assert src.n is not None
    for k in range(-(-src.n // block)):
        if not select(k):
            continue
        lo, hi = k * block, min((k + 1) * block, src.n)
        if src.kind == "tensor":
            for i in range(lo, hi, batch_size):
                j = min(i + batch_size, hi)
                yield k, (src.data[i:j], list(range(i, j)), [], [])
            continue
        loader = DataLoader(
            Subset(src.data, range(lo, hi)),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )
        for batch in loader:
            yield k, batch


def _stream_batches(
    src: _Source, block: int, select: Callable[[int], bool], batch_size: int
) -> Iterator[tuple[int, Batch]]:
    buf: list = []
    current = -1
    n = 0
    assert src.transform is not None
    for i, item in enumerate(src.data):
        n = i + 1
        k = i // block
        if buf and (k != current or len(buf) == batch_size):
            yield current, _collate(buf)
            buf = []
        current = k
        if select(k):
            buf.append(_sample(item, i, src.transform, src.image_key))
    if buf:
        yield current, _collate(buf)
    src.n = n
