"""Batch feature extraction from folders, path lists, datasets and tensors."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from smi_hub.errors import ImageLoadError
from smi_hub.images import list_images, load_image, to_rgb

LAYERS = ("pooled", "spatial", "layer1", "layer2", "layer3", "layer4", "projector")


@dataclass
class FeatureResult:
    """Output of :func:`extract_features`.

    Attributes:
        features: N x C (``pooled`` / ``projector``) or N x C x h x w (spatial layers), float32,
            on the CPU, one row per successfully read input, in input order.
        paths: identifier of each row: the file path for files, else the sample index.
        failed: ``(path, reason)`` of every input that could not be read (skipped).
        labels: N int64 labels when the dataset provided them, else None.
    """

    features: torch.Tensor
    paths: list[Any] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


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
            label = None
            if self.image_key is not None:
                image = item[self.image_key]
                label = item.get("label") if isinstance(item, dict) else None
            elif isinstance(item, tuple | list):
                image = item[0]
                label = item[1] if len(item) > 1 else None
            else:
                image = item
            if isinstance(image, str | os.PathLike):
                image = load_image(image)
            if isinstance(image, Image.Image):
                image = self.transform(to_rgb(image))
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"sample {i} is a {type(image).__name__}, not an image/tensor")
            if isinstance(label, torch.Tensor):
                label = int(label.item())
            return image, i, label if isinstance(label, int) else None, None
        except Exception as e:
            return None, i, None, f"sample {i}: {type(e).__name__}: {e}"


def _collate(batch: list) -> tuple[torch.Tensor | None, list[int], list, list[tuple[int, str]]]:
    ok = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[3]) for b in batch if b[0] is None]
    x = torch.stack([b[0] for b in ok]) if ok else None
    return x, [b[1] for b in ok], [b[2] for b in ok], bad


def _hf_image_key(ds: Any) -> str:
    features = getattr(ds, "features", None) or {}
    for key, feat in features.items():
        if type(feat).__name__ == "Image":
            return key
    for key in ("image", "img", "pixel_values"):
        if key in getattr(ds, "column_names", []):
            return key
    raise ValueError(
        f"No image column in this Hugging Face dataset (columns: {ds.column_names}); "
        "cast one with ds.cast_column(name, datasets.Image())."
    )


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    if layer == "pooled":
        return model.embed(x)
    if layer in ("spatial", "layer4"):
        return model.forward_features(x)
    if layer == "projector":
        return model(x)
    return model.forward_intermediates(x, layers=(layer,))[layer]


def extract_features(
    model: torch.nn.Module | str,
    images_or_dataset: Any,
    layer: str = "pooled",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    transform: Callable | None = None,
    progress: bool = True,
) -> FeatureResult:
    """Features of many images with an ``SMIModel`` (or a name for :func:`smi_hub.load`).

    Args:
        model: an ``SMIModel`` or anything ``smi_hub.load`` accepts.
        images_or_dataset: a folder of images (searched recursively), one image path, a list
            of paths or PIL images, a Hugging Face ``datasets.Dataset`` with an image column,
            a torch ``Dataset`` yielding images / tensors (or ``(image, label)`` tuples), or a
            preprocessed tensor batch B x 3 x H x W.
        layer: ``pooled`` (global average pooled backbone features), ``spatial`` (= ``layer4``
            map), ``layer1`` ... ``layer4`` (spatial maps), or ``projector`` (SMI embedding).
        batch_size, num_workers: DataLoader settings (workers decode and preprocess images).
        device: where to run (default: where the model is). The model is moved there.
        channels_last: run in channels-last memory format (faster on many CPUs and GPUs).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); features are returned as float32.
        transform: preprocessing of PIL images (default ``get_transforms(model)``).
        progress: show a progress bar.

    Unreadable files are skipped, listed in ``result.failed`` and reported with a warning.
    """
    from smi_hub.transforms import get_transforms

    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}.")
    if isinstance(model, str | os.PathLike):
        from smi_hub.hub import load

        model = load(model)
    if layer == "projector" and getattr(model, "projector", None) is None:
        raise ValueError(
            "layer='projector' needs a model with a projector; this weights folder holds only "
            "the backbone (export with --with-projector), or use layer='pooled'."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    model.eval()
    tfm = transform or get_transforms(model)

    data = images_or_dataset
    ids: list[Any] | None = None
    if isinstance(data, torch.Tensor):
        if data.ndim == 3:
            data = data.unsqueeze(0)
        if data.ndim != 4:
            raise ValueError(f"A tensor input must be B x 3 x H x W, got {tuple(data.shape)}.")
        dataset: Dataset | None = None  # sliced directly below, no per-sample overhead
    elif isinstance(data, str | os.PathLike):
        path = Path(data)
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise ValueError(f"{path} holds no image files ({', '.join(_exts())}).")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder of images.")
        ids = [str(p) for p in files]
        dataset = _Files(files, tfm)
    elif _is_hf_dataset(data):
        dataset = _Wrapped(data, tfm, image_key=_hf_image_key(data))
    elif isinstance(data, Dataset):
        dataset = _Wrapped(data, tfm)
    elif isinstance(data, Sequence) and all(isinstance(p, str | os.PathLike) for p in data):
        ids = [str(p) for p in data]
        dataset = _Files(list(data), tfm)
    elif isinstance(data, Sequence) and all(isinstance(p, Image.Image) for p in data):
        dataset = _Wrapped(list(data), tfm)
    else:
        raise TypeError(
            "images_or_dataset must be a folder, a path, a list of paths or PIL images, a "
            f"datasets.Dataset, a torch Dataset or a tensor batch; got {type(data).__name__}."
        )

    if dataset is None:
        loader: Any = (
            (data[i : i + batch_size], list(range(i, min(i + batch_size, len(data)))), [], [])
            for i in range(0, len(data), batch_size)
        )
        total = (len(data) + batch_size - 1) // batch_size
    else:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        total = len(loader)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    from tqdm.auto import tqdm

    chunks: list[torch.Tensor] = []
    rows: list[int] = []
    labels: list[Any] = []
    failed: list[tuple[str, str]] = []
    try:
        with torch.inference_mode(), autocast:
            for x, idx, lab, bad in tqdm(
                loader, total=total, desc=f"features ({layer})", unit="batch", disable=not progress
            ):
                for i, reason in bad:
                    failed.append((ids[i] if ids is not None else str(i), reason))
                if x is None:
                    continue
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                out = _forward(model, x, layer)
                chunks.append(out.float().contiguous().cpu())
                rows.extend(idx)
                labels.extend(lab)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    if failed:
        shown = "; ".join(reason for _, reason in failed[:3])
        more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
        warnings.warn(
            f"Skipped {len(failed)} unreadable input(s): {shown}{more}",
            RuntimeWarning,
            stacklevel=2,
        )
    empty = torch.empty(0, getattr(model, "num_features", 0))
    features = torch.cat(chunks) if chunks else empty
    label_tensor = (
        torch.tensor(labels, dtype=torch.long)
        if labels and all(isinstance(v, int) for v in labels)
        else None
    )
    paths = [ids[i] for i in rows] if ids is not None else rows
    return FeatureResult(features=features, paths=paths, failed=failed, labels=label_tensor)


def _exts() -> tuple[str, ...]:
    from smi_hub.images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS
