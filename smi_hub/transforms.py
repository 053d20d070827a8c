"""Evaluation preprocessing: the transform a model's weights expect."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from smi_hub.images import to_rgb
from smi_hub.registry import DEFAULT_MODEL, REGISTRY, preprocessing
from smi_hub.weights import read_config


class ToRGB:
    """Convert a PIL image of any mode to RGB (grayscale replicated, alpha on white)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def _config_of(name_or_model: Any) -> tuple[dict[str, Any], float | None]:
    if isinstance(name_or_model, torch.nn.Module):
        cfg = dict(getattr(name_or_model, "config", {}) or {})
        if not cfg:
            raise TypeError(
                "get_transforms needs an SMIModel (with .config), a registry name, a weights "
                f"folder or a config dict; got {type(name_or_model).__name__}."
            )
        crop_pct = (getattr(name_or_model, "pretrained_cfg", None) or {}).get("crop_pct")
        return cfg, 1.0 / crop_pct if crop_pct else None
    if isinstance(name_or_model, dict):
        return name_or_model, name_or_model.get("resize_ratio")
    if isinstance(name_or_model, str | os.PathLike):
        name = str(name_or_model)
        if name in REGISTRY:
            entry = REGISTRY[name]
            return (entry.folder_config() or entry.model_config), entry.resize_ratio
        if os.path.isdir(name):
            cfg = read_config(name)
            return cfg, cfg.get("resize_ratio")
        raise KeyError(
            f"{name!r} is neither a registered model ({', '.join(sorted(REGISTRY))}) nor a "
            "weights folder; pass a loaded model instead."
        )
    raise TypeError(f"get_transforms cannot use a {type(name_or_model).__name__}.")


def get_transforms(name_or_model: Any = None) -> T.Compose:
    """Preprocessing for a registry name, weights folder, config dict or loaded model.

    RGB conversion (grayscale replicated), bicubic resize of the short side to
    ``image_size * resize_ratio`` (1.0 for small images, 256/224 for 224 px models), center
    crop to ``image_size``, ``ToTensor`` and ``Normalize(mean, std)``.
    """
    cfg, ratio = _config_of(DEFAULT_MODEL if name_or_model is None else name_or_model)
    p = preprocessing(cfg, ratio)
    return T.Compose(
        [
            ToRGB(),
            T.Resize(p["resize"], interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(p["center_crop"]),
            T.ToTensor(),
            T.Normalize(p["mean"], p["std"]),
        ]
    )
