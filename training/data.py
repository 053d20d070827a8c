"""Image sources (ImageFolder, Hugging Face ``datasets``, Fashion-MNIST), the two-view
augmentation, and a fault-tolerant wrapper that skips unreadable images.

Every source yields ``(RGB PIL image, label)`` (label -1 when unknown) and raises
:class:`smi_hub.ImageLoadError` for an image it cannot decode; grayscale images are converted
to RGB (``smi_hub.images.to_rgb``) so they go through the same pipeline as colour ones.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from smi_hub.errors import ImageLoadError
from smi_hub.fashion_mnist import FashionMNIST
from smi_hub.images import IMAGE_EXTENSIONS, load_image, to_rgb

log = logging.getLogger("training.data")

MAX_CONSECUTIVE_BAD = 16
_HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


class DataError(RuntimeError):
    """A dataset cannot be used for training (missing, empty, or mostly unreadable)."""


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageNet-style folder: ``root/<class>/<image>``; images directly under ``root`` (no
    class folders) are accepted with label -1. Files are decoded lazily with ``load_image``.
    """

    def __init__(self, root: str | os.PathLike, transform=None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; set data.path to an ImageFolder root.")
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                        samples.append((os.path.join(dirpath, f), label))
        for f in sorted(self.root.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(f), -1))
        if not samples:
            raise DataError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}; expected "
                "root/<class>/<image> (ImageNet layout) or images directly in the folder."
            )
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label


class HFImageDataset(torch.utils.data.Dataset):
    """A Hugging Face ``datasets`` image dataset, from ``save_to_disk`` or local data files.

    Images are decoded here (not by ``datasets``) so a corrupt one raises ``ImageLoadError``
    for this sample only.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        image_key: str = "image",
        label_key: str = "label",
        transform=None,
    ) -> None:
        import datasets

        p = Path(path)
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p} has splits {list(ds)}, not {split!r}; set data.split.")
                ds = ds[split]
        elif p.is_file() and p.suffix.lower() in _HF_FILE_BUILDERS:
            builder = _HF_FILE_BUILDERS[p.suffix.lower()]
            try:
                ds = datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
            except Exception as e:  # datasets raises many types for unusable files
                raise DataError(f"datasets could not read {p} as {builder}: {e}") from e
        elif p.exists():
            try:
                ds = datasets.load_dataset(str(p), split=split)
            except Exception as e:  # datasets raises many types for unusable folders
                raise DataError(f"datasets.load_dataset({str(p)!r}) failed: {e}") from e
        else:
            raise DataError(
                f"{p} not found; data.path must be a folder saved with Dataset.save_to_disk or "
                "local data files (no downloads during training)."
            )
        if image_key not in ds.column_names:
            raise DataError(
                f"{p}: no column {image_key!r} (columns: {ds.column_names}); set data.image_key."
            )
        if isinstance(ds.features[image_key], datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))
        self.ds = ds
        self.image_key = image_key
        self.label_key = label_key if label_key in ds.column_names else None
        feature = ds.features.get(label_key) if self.label_key else None
        self.classes = list(getattr(feature, "names", None) or [])
        self.targets = list(ds[label_key]) if self.label_key else [-1] * len(ds)
        missing = [i for i, t in enumerate(self.targets) if t is None]
        if missing:
            raise DataError(
                f"{p}: {len(missing)} row(s) have no {label_key!r} (None; first: row "
                f"{missing[0]}); fill or drop them (ds.filter(lambda r: r[{label_key!r}] is not "
                "None)) and save the dataset again, or use another label column."
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self, i: int) -> str:
        return f"{self.ds.info.dataset_name or 'dataset'}[{i}]"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.ds[int(i)]
        value = row[self.image_key]
        where = self.describe(i)
        try:
            if isinstance(value, Image.Image):
                value.load()
                image = to_rgb(value)
            elif isinstance(value, dict) and value.get("bytes"):
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    im.load()
                    image = to_rgb(im)
            elif isinstance(value, dict) and value.get("path"):
                image = load_image(value["path"])
            else:
                raise ImageLoadError(f"{where}: empty image entry {value!r}.")
        except ImageLoadError:
            raise
        except Exception as e:
            raise ImageLoadError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e
        label = int(row[self.label_key]) if self.label_key else -1
        return (self.transform(image) if self.transform else image), label


class FashionMNISTRGB(torch.utils.data.Dataset):
    """Fashion-MNIST images as 3-channel RGB PIL images (gray replicated)."""

    def __init__(self, split: str = "train", root=None, transform=None, indices=None) -> None:
        self.base = FashionMNIST(split, root=root, indices=indices)
        self.classes = list(self.base.classes)
        self.targets = [int(self.base.labels[j]) for j in self.base.indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def describe(self, i: int) -> str:
        return f"fashion-mnist[{int(self.base.indices[i])}]"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i]
        image = to_rgb(image)
        return (self.transform(image) if self.transform else image), label


def build_source(
    source: str,
    path: str | None = None,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
) -> torch.utils.data.Dataset:
    """The untransformed dataset of ``(RGB PIL image, label)`` for a ``data.source`` name."""
    if source == "fashion_mnist":
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST has splits train and test, not {split!r}.")
        try:
            return FashionMNISTRGB(split, root=path)
        except FileNotFoundError as e:
            raise DataError(str(e)) from e
    if path is None:
        raise DataError(f"A path is required for data source {source!r}.")
    if source == "imagefolder":
        root = Path(path)
        if (root / split).is_dir() and split:
            root = root / split  # ImageNet layout: root/train/<class>/...
        return ImageFolderDataset(root)
    if source == "hf":
        return HFImageDataset(path, split=split, image_key=image_key, label_key=label_key)
    raise DataError(f"Unknown data source {source!r}; choose fashion_mnist, imagefolder or hf.")


def view_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip_prob: float = 0.5,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    color_jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 1.0,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    solarize_prob: float = 0.0,
) -> v2.Compose:
    """One augmentation branch (torchvision v2) from an RGB PIL image to a normalized tensor."""
    ops: list[Any] = [
        v2.RandomResizedCrop(
            image_size,
            scale=tuple(crop_scale),
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(hflip_prob),
    ]
    if color_jitter_prob > 0 and any(color_jitter):
        ops.append(v2.RandomApply([v2.ColorJitter(*color_jitter)], p=color_jitter_prob))
    if grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(grayscale_prob))
    if blur_prob > 0:
        kernel = max(3, int(round(image_size * 0.1)) // 2 * 2 + 1)  # ~10% of the image, odd
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur_prob))
    if solarize_prob > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize_prob))
    ops += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_ratio: float = 1.0
) -> v2.Compose:
    """Deterministic evaluation preprocessing: resize (short side), center crop, normalize.

    ``resize_ratio`` 1.14 gives ImageNet's 256/224 convention; 1.0 keeps small images whole.
    """
    return v2.Compose(
        [
            v2.Resize(
                int(round(image_size * resize_ratio)),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class TwoViews:
    """Apply two (different) augmentation branches to one image."""

    def __init__(self, view_a, view_b) -> None:
        self.view_a, self.view_b = view_a, view_b

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view_a(image), self.view_b(image)


def two_view_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: Any
) -> TwoViews:
    """The asymmetric two-view pair described by an ``AugmentConfig``."""

    def branch(i: int) -> v2.Compose:
        return view_transform(
            image_size,
            mean,
            std,
            crop_scale=augment.crop_scale,
            hflip_prob=augment.hflip_prob,
            color_jitter=augment.color_jitter,
            color_jitter_prob=augment.color_jitter_prob,
            grayscale_prob=augment.grayscale_prob,
            blur_prob=augment.blur_prob[i],
            blur_sigma=augment.blur_sigma,
            solarize_prob=augment.solarize_prob[i],
        )

    return TwoViews(branch(0), branch(1))


class SafeTwoViewDataset(torch.utils.data.Dataset):
    """Two augmented views per image; unreadable images are skipped, counted and warned about.

    Item ``i`` of epoch ``e`` is augmented with a torch RNG seeded from ``(seed, e, i)``, so
    the views are the same whatever the number of workers, ranks, or a resume in between.
    An unreadable image is replaced by the next readable one (``i+1``, ``i+2`` ...); the item
    then reports how many it skipped. ``MAX_CONSECUTIVE_BAD`` failures in a row mean the
    dataset is mostly unreadable: ``DataError``.
    """

    def __init__(self, base: torch.utils.data.Dataset, transform, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _describe(self, i: int) -> str:
        describe = getattr(self.base, "describe", None)
        return describe(i) if describe else f"item {i}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = len(self.base)
        skipped = 0
        errors = []
        for k in range(MAX_CONSECUTIVE_BAD):
            j = (i + k) % n
            try:
                image, _ = self.base[j]
            except ImageLoadError as e:
                log.warning("Skipping unreadable image %s: %s", self._describe(j), e)
                errors.append(str(e))
                skipped += 1
                continue
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues a lazy CUDA seeding
                # with a captured stack trace, which cost more than the augmentations
                torch.default_generator.manual_seed(_mix_seed(self.seed, self.epoch, i))
                a, b = self.transform(image)
            return a, b, skipped
        raise DataError(
            f"{MAX_CONSECUTIVE_BAD} images in a row could not be read (first: {errors[0]}); the "
            "dataset looks mostly unreadable. Check data.path and the files' integrity."
        )


def _mix_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index) (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def check_readable(
    dataset: torch.utils.data.Dataset, max_bad_fraction: float, probe: int = 64, seed: int = 0
) -> int:
    """Decode up to ``probe`` random items; raise ``DataError`` if more than half are unreadable
    (or more than ``max_bad_fraction`` when the dataset is smaller than ``probe``).
    Returns the number of unreadable items seen."""
    n = len(dataset)
    if n == 0:
        raise DataError("The dataset is empty.")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[: min(probe, n)]
    bad = []
    for i in idx:
        try:
            dataset[int(i)]
        except ImageLoadError as e:
            bad.append(str(e))
    limit = max_bad_fraction if len(idx) == n else max(0.5, max_bad_fraction)
    if bad and len(bad) / len(idx) > limit:
        raise DataError(
            f"{len(bad)} of {len(idx)} probed images are unreadable (e.g. {bad[0]}); the "
            "dataset is mostly unreadable. Check data.path and the files' integrity, or raise "
            "data.max_bad_fraction."
        )
    return len(bad)


class ResumableSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler: a per-epoch permutation from ``(seed, epoch)``, split across ranks,
    full batches only (``drop_last=False``: the last, partial batch too, shared among the ranks
    when each gets an image), that can start at a given batch (to resume mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < (batch_size if drop_last else 1) * num_replicas:
            raise DataError(
                f"The dataset has {num_samples} images, fewer than one global batch "
                f"({batch_size} x {num_replicas} ranks); lower train.batch_size."
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size * self.num_replicas)
        return full + int(not self.drop_last and rest >= self.num_replicas)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        global_bs = self.batch_size * self.num_replicas
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[b * global_bs : (b + 1) * global_bs]
            if len(chunk) < global_bs:  # the last, partial batch (drop_last=False)
                yield chunk[self.rank :: self.num_replicas]
            else:
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def subset_indices(n: int, subset: int | None, seed: int = 0) -> list[int] | None:
    """A fixed random subset of ``subset`` indices (sorted), or None for all."""
    if subset is None or subset >= n:
        return None
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=subset, replace=False).tolist())


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))


class IndexedSubset(torch.utils.data.Dataset):
    """A subset of a source that keeps its ``describe``, ``classes`` and ``targets``."""

    def __init__(self, base: torch.utils.data.Dataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.classes = getattr(base, "classes", [])
        targets = getattr(base, "targets", None)
        self.targets = [targets[i] for i in self.indices] if targets is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, i: int) -> str:
        describe = getattr(self.base, "describe", None)
        return describe(self.indices[i]) if describe else f"item {self.indices[i]}"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[self.indices[i]]
