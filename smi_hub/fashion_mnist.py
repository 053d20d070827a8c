"""Reader for Fashion-MNIST's IDX files as installed by Debian's ``dataset-fashion-mnist``.

``apt-get install -y dataset-fashion-mnist`` puts the four ``*-idx?-ubyte.gz`` files in
``/usr/share/datasets/fashion-mnist``; set ``SMI_FASHION_MNIST_DIR`` to read them elsewhere.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): 2 zero bytes, dtype code, ndim, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes of data), "
            f"file has {len(data) - offset}."
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def data_dir() -> Path:
    """Folder holding the IDX files (``SMI_FASHION_MNIST_DIR`` or the Debian location)."""
    return Path(os.environ.get("SMI_FASHION_MNIST_DIR", DEFAULT_DIR))


def load_arrays(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels (N int64) of the ``train`` or ``test`` split."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}.")
    root = Path(root) if root is not None else data_dir()
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install -y dataset-fashion-mnist` (Debian) or set SMI_FASHION_MNIST_DIR "
            "to a folder holding the four *-ubyte.gz files."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return images, labels.astype(np.int64)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as a map-style dataset of ``(PIL grayscale image, label)``.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000).
        root: folder with the IDX files; defaults to :func:`data_dir`.
        transform: applied to the PIL image.
        indices: optional subset of sample indices to expose, in that order.
    """

    classes = CLASSES

    def __init__(self, split: str = "train", root=None, transform=None, indices=None) -> None:
        self.images, self.labels = load_arrays(split, root)
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        image = Image.fromarray(self.images[j], mode="L")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[j])
