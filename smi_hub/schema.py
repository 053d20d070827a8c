"""What a model config may say: architectures, preprocessing constants and the sane ranges of
``config.json`` fields, checked before anything is built. Knows nothing of torch modules."""

from __future__ import annotations

import math
import re
from typing import Any

from smi_hub.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch -> (residual block kind, blocks per stage); smi_hub.models builds them
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
ARCH_KEYS = (
    "arch",
    "base_width",
    "small_stem",
    "projector_dims",
    "projector_bias",
    "image_size",
    "mean",
    "std",
    "num_classes",
    "class_names",
)
# sane ranges of config.json fields, checked before anything is built: a ResNet-50 of width
# 256 is 16x the usual 64 (about 400 M parameters); larger values are refused, not allocated
MAX_BASE_WIDTH = 256
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
MAX_NORM = 10.0  # |mean| and std, in units of the [0, 1] pixel range
MAX_PROJECTOR_DIM, MAX_PROJECTOR_LAYERS = 65_536, 8
MAX_NUM_CLASSES = 100_000


def default_resize_ratio(image_size: int) -> float:
    """Evaluation resize (short side = ``image_size * ratio``, then center crop): 1.0 keeps
    small images (up to 64 px) whole, 256/224 is ImageNet's convention."""
    return 1.0 if image_size <= 64 else 256 / 224


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_int(config: dict[str, Any], key: str, lo: int, hi: int) -> str | None:
    value = config[key]
    if not _is_int(value) or not lo <= value <= hi:
        return f"{key} = {value!r}: must be an integer from {lo} to {hi:,}"
    return None


def _check_channels(
    config: dict[str, Any], key: str, lo: float, hi: float, open_lo: bool
) -> str | None:
    value = config[key]
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(_is_number(v) and (lo < v if open_lo else lo <= v) and v <= hi for v in value)
    )
    if not ok:
        low = f"> {lo}" if open_lo else f">= {lo}"
        return (
            f"{key} = {value!r}: must be 3 finite numbers (one per RGB channel), each {low} "
            f"and <= {hi}"
        )
    return None


def _check_config_fields(config: dict[str, Any]) -> list[str]:
    problems: list[str | None] = []
    if "arch" in config and not (isinstance(config["arch"], str) and config["arch"] in ARCHS):
        problems.append(f"arch = {config['arch']!r}: must be one of {sorted(ARCHS)}")
    if "base_width" in config:
        problems.append(_check_int(config, "base_width", 1, MAX_BASE_WIDTH))
    if "small_stem" in config and not isinstance(config["small_stem"], bool):
        problems.append(f"small_stem = {config['small_stem']!r}: must be true or false")
    if "image_size" in config:
        problems.append(_check_int(config, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE))
    if "mean" in config:
        problems.append(_check_channels(config, "mean", -MAX_NORM, MAX_NORM, open_lo=False))
    if "std" in config:
        problems.append(_check_channels(config, "std", 0.0, MAX_NORM, open_lo=True))
    if "projector_dims" in config:
        dims = config["projector_dims"]
        if (
            not isinstance(dims, list | tuple)
            or len(dims) > MAX_PROJECTOR_LAYERS
            or not all(_is_int(d) and 1 <= d <= MAX_PROJECTOR_DIM for d in dims)
        ):
            problems.append(
                f"projector_dims = {dims!r}: must be a list of at most {MAX_PROJECTOR_LAYERS} "
                f"integers from 1 to {MAX_PROJECTOR_DIM:,} (empty: no projector)"
            )
    if config.get("num_classes") is not None:
        problems.append(_check_int(config, "num_classes", 0, MAX_NUM_CLASSES))
    names = config.get("class_names")
    if names is not None and not (
        isinstance(names, list | tuple)
        and len(names) <= MAX_NUM_CLASSES
        and all(isinstance(n, str) for n in names)
    ):
        problems.append(
            f"class_names = {str(names)[:80]}: must be a list of at most {MAX_NUM_CLASSES:,} "
            "strings"
        )
    sha = config.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        problems.append(f"weights_sha256 = {sha!r}: must be 64 lowercase hex digits")
    return [p for p in problems if p]


def validate_config(config: dict[str, Any], source: str = "config.json") -> None:
    """Check the architecture fields of a weights config against sane ranges before anything
    is built (a hostile ``base_width`` would otherwise allocate terabytes).

    Raises ``WeightsError`` naming each bad field, its value and the allowed range.
    """
    problems = _check_config_fields(config)
    if problems:
        raise WeightsError(
            f"{source} has invalid values: " + "; ".join(problems) + ". Fix these fields or "
            "re-export the weights folder (smi-hub export / SMIModel.save_pretrained)."
        )


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` as an int from 0 (no head) to :data:`MAX_NUM_CLASSES`, the range
    config.json allows; anything else (1.5, True, "3", [3], 10**7) raises a clear error
    before any head is allocated."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(
            f"num_classes = {num_classes!r}: must be an integer from 0 (no head) to "
            f"{MAX_NUM_CLASSES:,}, got a {type(num_classes).__name__}."
        )
    if not 0 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(
            f"num_classes = {num_classes!r}: must be an integer from 0 (no head) to "
            f"{MAX_NUM_CLASSES:,} (the range config.json allows)."
        )
    return num_classes
