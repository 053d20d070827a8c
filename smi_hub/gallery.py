"""The default demo / retrieval gallery: labelled Fashion-MNIST test images as PNG files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from smi_hub import fashion_mnist
from smi_hub.errors import SMIHubError
from smi_hub.settings import cache_dir

GALLERY_FORMAT = 1
MANIFEST = "gallery.json"


class DatasetMissingError(SMIHubError, FileNotFoundError):
    """The installed dataset a gallery is built from is missing."""


def class_dirname(name: str) -> str:
    """Folder name of a class: ``T-shirt/top`` -> ``T-shirt_top``, ``Ankle boot`` -> ``Ankle_boot``."""
    return name.replace("/", "_").replace(" ", "_")


def gallery_indices(labels: np.ndarray, per_class: int, offset: int = 0) -> list[int]:
    """Test-split indices of the gallery: the ``offset``-th to ``offset+per_class``-th image of
    each class, in split order (``offset=per_class`` gives disjoint held-out images)."""
    chosen: list[int] = []
    for c in range(len(fashion_mnist.CLASSES)):
        idx = np.flatnonzero(labels == c)[offset : offset + per_class]
        chosen.extend(int(i) for i in idx)
    return sorted(chosen)


def _manifest(per_class: int, indices: list[int]) -> dict:
    return {
        "format_version": GALLERY_FORMAT,
        "source": "fashion_mnist test split",
        "per_class": per_class,
        "classes": {class_dirname(c): c for c in fashion_mnist.CLASSES},
        "indices": indices,
    }


def default_gallery(root: str | os.PathLike | None = None, per_class: int = 30) -> Path:
    """Folder of ``<class_name>/<test index>.png`` images from the Fashion-MNIST test split.

    Built once and reused (default location ``<cache_dir>/gallery/fashion_mnist_<per_class>``;
    ``SMI_HUB_CACHE`` moves it). Needs the dataset from ``apt-get install dataset-fashion-mnist``.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    folder = (
        Path(root) if root is not None else cache_dir() / "gallery" / f"fashion_mnist_{per_class}"
    )
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("per_class") == per_class and all(
            (folder / class_dirname(c)).is_dir() for c in fashion_mnist.CLASSES
        ):
            return folder
    try:
        images, labels = fashion_mnist.load_arrays("test")
    except FileNotFoundError as e:
        raise DatasetMissingError(
            "The default gallery is built from the Fashion-MNIST test split, which is not "
            f"installed: {e} On Debian/Ubuntu: `apt-get install -y dataset-fashion-mnist`."
        ) from e
    indices = gallery_indices(labels, per_class)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for c in fashion_mnist.CLASSES:
            (staging / class_dirname(c)).mkdir()
        for i in indices:
            name = class_dirname(fashion_mnist.CLASSES[int(labels[i])])
            Image.fromarray(images[i], mode="L").save(staging / name / f"{i:05d}.png")
        (staging / MANIFEST).write_text(json.dumps(_manifest(per_class, indices), indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def label_of(path: str | os.PathLike) -> str:
    """Class name of a gallery image (its parent folder, mapped back to the class name)."""
    folder = Path(path).parent.name
    for c in fashion_mnist.CLASSES:
        if class_dirname(c) == folder:
            return c
    return folder
