"""Checks of a training config's values: choices, ranges (:data:`RANGES`), list lengths and loss
arguments (:func:`validate`); the checks that need this machine (:func:`check_runtime`).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smi_hub.schema import (
    ARCHS,
    MAX_BASE_WIDTH,
    MAX_IMAGE_SIZE,
    MAX_PROJECTOR_DIM,
    MIN_IMAGE_SIZE,
)
from training.config import ConfigError, LossConfig, PretrainConfig
from training.losses import build_loss


@dataclass(frozen=True)
class Range:
    """A closed or open interval of finite numbers that a config value must lie in."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __str__(self) -> str:
        def fmt(x: float) -> str:
            if math.isinf(x):
                return "inf"
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        closing = ")" if self.hi_open or math.isinf(self.hi) else "]"
        return f"{'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}{closing}"

    def check(self, key: str, value: float) -> None:
        """Raise :class:`ConfigError` naming ``key``, ``value`` and the interval if outside."""
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if not (math.isfinite(value) and above and below):
            kind = "an integer" if isinstance(value, int) else "a finite number"
            note = f" ({self.note})" if self.note else ""
            raise ConfigError(f"{key}: must be {kind} in {self}, got {value!r}{note}.")


POSITIVE = Range(0.0, lo_open=True)
NON_NEGATIVE = Range(0.0)
PROBABILITY = Range(0.0, 1.0)
COUNT = Range(1)

# Allowed values of every numeric setting (each item of a list setting); None values of
# optional settings (data.subset, train.grad_clip, train.max_steps) are skipped.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1),
    # the weights loader's limits: whatever trains can also be exported and loaded
    "model.base_width": Range(1, MAX_BASE_WIDTH),
    "model.image_size": Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "model.projector_dims": Range(2, MAX_PROJECTOR_DIM),
    "model.mean": PROBABILITY,
    "model.std": POSITIVE,
    "data.subset": Range(1, note="null: the whole dataset"),
    "data.num_workers": NON_NEGATIVE,
    "data.max_bad_fraction": Range(0.0, 1.0, hi_open=True),
    "data.augment.crop_scale": Range(0.0, 1.0, lo_open=True),
    "data.augment.hflip_prob": PROBABILITY,
    "data.augment.color_jitter_prob": PROBABILITY,
    "data.augment.grayscale_prob": PROBABILITY,
    "data.augment.blur_prob": PROBABILITY,
    "data.augment.blur_sigma": POSITIVE,
    "data.augment.solarize_prob": PROBABILITY,
    "train.epochs": COUNT,
    "train.batch_size": Range(2, note="the losses and BatchNorm need at least 2 images"),
    "train.lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.momentum": Range(0.0, 1.0, hi_open=True),
    "train.lars_eta": POSITIVE,
    "train.bias_bn_lr_ratio": POSITIVE,
    "train.min_lr_ratio": PROBABILITY,
    "train.grad_clip": Range(0.0, lo_open=True, note="null: no clipping"),
    "train.max_nonfinite": COUNT,
    "train.max_steps": Range(1, note="null: no cap"),
    "checkpoint.every_steps": COUNT,
    "checkpoint.keep_last": COUNT,
    "log.every_steps": COUNT,
}
LENGTHS = {
    "model.mean": (3, "R, G, B"),
    "model.std": (3, "R, G, B"),
    "data.augment.crop_scale": (2, "min, max"),
    "data.augment.color_jitter": (4, "brightness, contrast, saturation, hue"),
    "data.augment.blur_prob": (2, "view A, view B"),
    "data.augment.blur_sigma": (2, "min, max"),
    "data.augment.solarize_prob": (2, "view A, view B"),
}
# Keyword arguments of each loss: a Range for numbers, None for true/false flags.
LOSS_KWARGS: dict[str, dict[str, Range | None]] = {
    "smi": {
        "lambda_offdiag": NON_NEGATIVE,
        "diag_weight": NON_NEGATIVE,
        "eps": Range(0.0, 1.0, lo_open=True, hi_open=True),
        "std_eps": POSITIVE,
        "gather": None,
    },
    "barlow_twins": {"lambd": NON_NEGATIVE, "bn_eps": POSITIVE, "gather": None},
    "vicreg": {
        "sim_weight": NON_NEGATIVE,
        "var_weight": NON_NEGATIVE,
        "cov_weight": NON_NEGATIVE,
        "gamma": POSITIVE,
        "eps": POSITIVE,
        "gather": None,
    },
}
LOSS_NAMES = ("smi", "barlow_twins", "vicreg")
SOURCES = ("fashion_mnist", "imagefolder", "hf")
OPTIMIZERS = ("lars", "sgd", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_DEVICES = ("auto", "cpu", "gpu")


def _get(cfg: PretrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}.")


def _check_text(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key}: must not be empty, got {value!r}.")


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check every setting against its choices and allowed range (see :data:`RANGES`).

    Runs before anything is built, so a bad value stops the run at once with a
    :class:`ConfigError` naming the key, the value and what is allowed. Checks that depend on
    this machine (device, output folder) are in :func:`check_runtime`.
    """
    _check_choice("device", cfg.device, DEVICES)
    _check_choice("model.arch", cfg.model.arch, tuple(ARCHS))
    _check_choice("loss.name", cfg.loss.name, LOSS_NAMES)
    _check_choice("data.source", cfg.data.source, SOURCES)
    _check_choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    _check_choice("train.precision", cfg.train.precision, PRECISIONS)
    _check_choice("data.augment.device", cfg.data.augment.device, AUGMENT_DEVICES)
    for key in ("output_dir", "data.path", "data.split", "data.image_key", "data.label_key"):
        _check_text(key, _get(cfg, key))
    if cfg.data.source == "fashion_mnist":
        _check_choice("data.split", cfg.data.split, ("train", "test"))
    elif not cfg.data.path:
        raise ConfigError(
            f"data.path is required for data.source={cfg.data.source}; pass data.path=/path/to/data."
        )
    if not cfg.model.projector_dims:
        raise ConfigError("model.projector_dims must list at least one width for pretraining.")
    for key, (n, names) in LENGTHS.items():
        if len(_get(cfg, key)) != n:
            raise ConfigError(f"{key}: needs {n} values ({names}), got {_get(cfg, key)}.")
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if item is not None:
                allowed.check(key if i is None else f"{key}[{i}]", item)
    a = cfg.data.augment
    for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        Range(0.0, 0.5 if name == "hue" else math.inf).check(
            f"data.augment.color_jitter[{i}] ({name})", a.color_jitter[i]
        )
    for key in ("crop_scale", "blur_sigma"):
        lo, hi = getattr(a, key)
        if lo > hi:
            raise ConfigError(f"data.augment.{key}: [min, max] needs min <= max, got [{lo}, {hi}].")
    Range(0.0, float(cfg.train.epochs)).check(
        f"train.warmup_epochs (at most train.epochs={cfg.train.epochs}, or the learning rate "
        "is still warming up when the run ends)",
        cfg.train.warmup_epochs,
    )
    if cfg.log.monitor_samples != 0:
        Range(2).check("log.monitor_samples (0 turns the monitors off)", cfg.log.monitor_samples)
    if cfg.data.subset is not None and cfg.data.subset < cfg.train.batch_size:
        raise ConfigError(
            f"data.subset: {cfg.data.subset} images are fewer than one batch "
            f"(train.batch_size={cfg.train.batch_size}); raise data.subset or lower the batch."
        )
    _check_loss(cfg.loss)
    return cfg


def check_runtime(cfg: PretrainConfig) -> None:
    """The checks :func:`validate` cannot do without this machine: the device exists and
    ``output_dir`` is (or can be created as) a writable folder (created here)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: 'cuda' was requested but no CUDA GPU is visible; use device=cpu or "
            "device=auto."
        )
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output_dir: {cfg.output_dir!r} is an existing file, not a folder; choose another "
            "output_dir=..."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"output_dir: {cfg.output_dir!r} is not a writable folder ({reason}); choose "
            "another output_dir=..."
        ) from e


def _check_loss(loss: LossConfig) -> None:
    allowed = LOSS_KWARGS[loss.name]
    for k, v in loss.kwargs.items():
        key = f"loss.kwargs.{k}"
        if k not in allowed:
            raise ConfigError(
                f"{key}: {loss.name} takes no argument {k!r}; its arguments are "
                f"{', '.join(allowed)}."
            )
        if allowed[k] is None:
            if not isinstance(v, bool):
                raise ConfigError(f"{key}: expected true or false, got {v!r}.")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            allowed[k].check(key, v)
        else:
            raise ConfigError(
                f"{key}: expected a number in {allowed[k]}, got {v!r} (in YAML flow style "
                "write {key: value} with a space after the colon)."
            )
    try:
        build_loss(loss.name, **loss.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.kwargs: {e}") from e
