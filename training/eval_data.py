"""Models and labelled data for evaluation: a backbone from a checkpoint, weights folder,
registry name or random init; the evaluation sources (Fashion-MNIST, image folders, Hugging
Face datasets, scikit-learn's digits); features extracted once and cached per model, dataset
and split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smi_hub.fileio import atomic_write
from smi_hub.hub import load as hub_load
from smi_hub.images import to_rgb
from smi_hub.models import SMIModel, load_weights_folder
from smi_hub.registry import preprocessing
from training.checkpoint import find_latest, load_checkpoint
from training.data import DataError, IndexedSubset, build_source, eval_transform, subset_indices
from training.probes import EvalError, progress_bar

log = logging.getLogger(__name__)
EVAL_SOURCES = ("fashion_mnist", "imagefolder", "hf", "digits")


# --------------------------------------------------------------------------------------------
# Models, datasets and cached features
# --------------------------------------------------------------------------------------------

_MODEL_KEYS = (
    "arch", "base_width", "small_stem", "projector_dims", "image_size", "mean", "std",
    "zero_init_residual", "projector_bias",
)  # fmt: skip


def load_model(
    checkpoint: str | None = None,
    weights: str | None = None,
    run_dir: str | None = None,
    random_init: bool = False,
    model_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[SMIModel, str]:
    """The model to evaluate and a description of where it came from.

    Exactly one source of weights: a training ``checkpoint``, ``weights`` (a weights folder,
    or a registry name / Hugging Face id / URL that ``smi_hub.load`` resolves), a ``run_dir``
    (its newest checkpoint) or ``random_init`` (architecture from the other arguments or
    ``model_config``, weights drawn with ``seed``: the random-initialisation baseline).
    """
    if run_dir and not checkpoint and not weights:
        found = find_latest(Path(run_dir) / "checkpoints")
        if found is None and not random_init:
            raise EvalError(f"No checkpoint in {run_dir}/checkpoints; train first or pass one.")
        checkpoint = str(found) if found else None
    if random_init:
        cfg = model_config
        if cfg is None and checkpoint:
            cfg = load_checkpoint(checkpoint)["model_config"]
        if cfg is None and weights:
            cfg = hub_load(weights, pretrained=False).config
        if cfg is None:
            raise EvalError(
                "--random-init needs an architecture: pass --config, --checkpoint, --weights "
                "or --run-dir to copy it from."
            )
        torch.manual_seed(seed)
        return SMIModel(**{k: v for k, v in cfg.items() if k in _MODEL_KEYS}), "random-init"
    if checkpoint and weights:
        raise EvalError("Pass either --checkpoint or --weights, not both.")
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model = SMIModel(**state["model_config"])
        model.load_state_dict(state["model"])
        return model, str(checkpoint)
    if weights:
        if Path(weights).is_dir():
            return load_weights_folder(weights, device="cpu"), str(weights)
        return hub_load(weights, device="cpu"), str(weights)
    raise EvalError(
        "No model given: pass --checkpoint PATH, --weights FOLDER|NAME, --run-dir DIR or "
        "--random-init (with an architecture source)."
    )


def model_fingerprint(model: SMIModel) -> str:
    """sha256 over the backbone tensors and architecture (names the feature cache)."""
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for k, v in model.backbone_state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_resize_ratio(model: SMIModel) -> float:
    """The evaluation resize the model's weights expect: short side ``image_size * ratio``,
    then center crop ``image_size``. From its ``pretrained_cfg`` (timm's ``crop_pct`` =
    1 / ratio, or a recorded ``resize_ratio``), else ``smi_hub.registry.preprocessing`` of
    its config (256/224 for 224 px models, 1.0 up to 64 px)."""
    pre = getattr(model, "pretrained_cfg", None) or {}
    recorded = pre.get("resize_ratio")
    if recorded is None and pre.get("crop_pct"):
        recorded = 1.0 / float(pre["crop_pct"])
    resize = preprocessing(model.config, recorded)["resize"]
    return resize / model.image_size


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits, 10 classes, as RGB
    PIL images (the 0-16 ink levels scaled to 0-255, gray replicated to 3 channels).

    It ships without a split: ``train`` and ``test`` are a fixed stratified half of each class
    (seed 0, the odd image of a class to train): 901 and 896 images. Evaluation resizes the 8x8 images up to the model's input
    (bicubic, short side ``image_size * resize_ratio``, e.g. 28 px for the Fashion-MNIST models).
    """

    def __init__(self, split: str = "train") -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test"):
            raise DataError(f"digits has splits train and test, not {split!r}.")
        digits = load_digits()
        images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(0)
        keep = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(labels == c))
            half = (len(idx) + 1) // 2
            keep.append(idx[:half] if split == "train" else idx[half:])
        order = np.sort(np.concatenate(keep))
        self.images, self.targets = images[order], [int(t) for t in labels[order]]
        self.indices = order.tolist()
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, i: int) -> str:
        return f"digits[{self.indices[i]}]"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return to_rgb(Image.fromarray(self.images[i], mode="L")), self.targets[i]


def build_eval_source(
    source: str,
    path: str | None = None,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
) -> torch.utils.data.Dataset:
    """``training.data.build_source`` plus the packaged evaluation-only source ``digits``."""
    if source == "digits":
        return DigitsDataset(split)
    if source not in EVAL_SOURCES:
        raise EvalError(f"Unknown --dataset {source!r}; choose one of {', '.join(EVAL_SOURCES)}.")
    return build_source(source, path, split, image_key, label_key)


@torch.no_grad()
def extract(
    model: SMIModel,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N x C, float32) and labels (N) of a dataset of (tensor, label).

    Unreadable images raise; evaluation sets are expected to be clean."""
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y in progress_bar(loader, desc, unit="batch"):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        feats.append(model.embed(x).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


class Transformed(torch.utils.data.Dataset):
    """``(transform(image), label)`` over a dataset of ``(image, label)``."""

    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def labelled_source(
    source: str,
    path: str | None,
    split: str,
    subset: int | None = None,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
) -> torch.utils.data.Dataset:
    """One labelled split (a fixed random ``subset`` of it when given) of ``(PIL, label)``."""
    base = build_eval_source(source, path, split, image_key, label_key)
    idx = subset_indices(len(base), subset, seed)
    if idx is not None:
        base = IndexedSubset(base, idx)
    labels = getattr(base, "targets", None)
    if labels is not None and len(labels) and min(labels) < 0:
        raise EvalError(
            f"{source} {split} has unlabelled images; evaluation needs class subfolders "
            "(ImageFolder) or a label column."
        )
    return base


def cached_features(
    model: SMIModel,
    source: str,
    path: str | None,
    split: str,
    subset: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    resize_ratio: float | None = None,
    image_key: str = "image",
    label_key: str = "label",
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split, read from / written to ``cache_dir`` when given.
    ``resize_ratio`` None: the model's own preprocessing (:func:`default_resize_ratio`)."""
    if resize_ratio is None:
        resize_ratio = default_resize_ratio(model)
    key = json.dumps(
        [
            model_fingerprint(model),
            source,
            str(path),
            split,
            subset,
            resize_ratio,
            seed,
            image_key,
            label_key,
        ]  # fmt: skip
    )
    name = f"{source}_{split}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    cache = Path(cache_dir) / name if cache_dir else None
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
        log.info("Features of %s/%s from cache %s", source, split, cache)
        return data["features"], data["labels"]
    base = labelled_source(source, path, split, subset, seed, image_key, label_key)
    transform = eval_transform(model.image_size, model.mean, model.std, resize_ratio)
    feats, labels_t = extract(
        model, Transformed(base, transform), batch_size, num_workers, device, f"{split} features"
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save({"features": feats, "labels": labels_t}, tmp))
    return feats, labels_t
