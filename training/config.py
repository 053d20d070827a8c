"""Training configuration: typed dataclasses, YAML files and ``key=value`` overrides.

A config file is a YAML mapping whose sections mirror :class:`PretrainConfig`; every key is
checked (unknown keys and values of the wrong type raise :class:`ConfigError` naming the key
and the fix). Overrides use dotted keys with YAML values: ``train.epochs=10``,
``loss.name=vicreg``, ``model.projector_dims=[512,512]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from smi_hub.fileio import atomic_write_text
from smi_hub.schema import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_BASE_WIDTH,
    MAX_IMAGE_SIZE,
    MAX_PROJECTOR_DIM,
    MIN_IMAGE_SIZE,
)
from training.losses import build_loss

LOSS_NAMES = ("smi", "barlow_twins", "vicreg")
SOURCES = ("fashion_mnist", "imagefolder", "hf")
OPTIMIZERS = ("lars", "sgd", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A training or evaluation config is invalid; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """Arguments of :class:`smi_hub.SMIModel`."""

    arch: str = "resnet50"
    base_width: int = 64
    small_stem: bool = False
    projector_dims: list[int] = field(default_factory=lambda: [8192, 8192, 8192])
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    zero_init_residual: bool = False
    projector_bias: bool = False


@dataclass
class LossConfig:
    """Objective by name (``smi``, ``barlow_twins``, ``vicreg``) and its keyword arguments."""

    name: str = "smi"
    kwargs: dict[str, float] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Two-view augmentation (defaults: the Barlow Twins pair; index 0 = view A, 1 = view B).

    Colour operations are harmless on grayscale inputs: they are converted to RGB first, where
    saturation, hue and grayscale conversion leave a gray image gray.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip_prob: float = 0.5
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_prob: list[float] = field(default_factory=lambda: [0.0, 0.2])
    # Where the per-image augmentations after the crop run (docs/training.md, "Input
    # pipeline"): ``cpu`` = all of them in the DataLoader workers (PIL); ``gpu`` = workers only
    # decode, crop and flip, the rest runs batched on the training device (training.
    # batch_augment; on a CPU run that device is the CPU); ``auto`` = ``gpu`` when training on
    # CUDA, else ``cpu``.
    device: str = "auto"


@dataclass
class DataConfig:
    """Where the training images come from.

    ``source``: ``fashion_mnist`` (Debian IDX files; ``path`` overrides their folder),
    ``imagefolder`` (``path``: a folder of class subfolders, or of images), or ``hf``
    (``path``: a ``datasets`` folder saved with ``save_to_disk``, or local data files / a
    folder ``datasets.load_dataset`` understands; ``split``, ``image_key``).
    """

    source: str = "imagefolder"
    path: str | None = None
    split: str = "train"
    image_key: str = "image"
    label_key: str = "label"
    subset: int | None = None
    num_workers: int = 8
    max_bad_fraction: float = 0.05
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    """Optimization. ``lr`` is the peak learning rate for ``batch_size`` (the global batch)."""

    epochs: int = 100
    batch_size: int = 2048
    optimizer: str = "lars"
    lr: float = 0.2
    lr_scale_batch: bool = True
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    lars_eta: float = 0.001
    exclude_bias_bn: bool = True
    bias_bn_lr_ratio: float = 1.0
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.001
    precision: str = "bf16"
    channels_last: bool = True
    sync_bn: bool = True
    grad_clip: float | None = None
    max_nonfinite: int = 5
    max_steps: int | None = None


@dataclass
class CheckpointConfig:
    """Atomic checkpoints every ``every_steps`` optimizer steps and at each epoch end."""

    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class LogConfig:
    """Progress bar, JSONL metrics, TensorBoard and collapse monitors."""

    every_steps: int = 20
    progress: bool = True
    tensorboard: bool = True
    monitor_samples: int = 1024


@dataclass
class PretrainConfig:
    """Everything ``python -m training.pretrain`` needs; see docs/training.md."""

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/``torch.load(weights_only=True)`` safe)."""
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping (section) but got {value!r}; write it as "
                f"'{key}: {{...}}' in YAML or set its fields with {key}.FIELD=VALUE."
            )
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}: expected a list of {_type_name(item_tp)} but got {value!r}; write "
                f"e.g. {key}=[1,2,3]."
            )
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping but got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false but got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer but got {value!r}.")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads '1e-4' (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number but got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string but got {value!r}.")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{full}'.{hint} Valid keys here: {', '.join(names)}."
            )
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


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


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "loss.name=vicreg"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override {item!r} is not KEY=VALUE; write e.g. train.epochs=10 (no spaces "
                "around '=')."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override {item!r} has an empty key.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Override {item!r}: value is not valid YAML ({e}).") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r} conflicts with another override of {part}.")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> PretrainConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} not found; see training/configs/ for examples.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a YAML mapping of config sections.")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return validate(_build(PretrainConfig, data))


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Rebuild a config saved in a checkpoint or ``config.yaml``."""
    return validate(_build(PretrainConfig, data))


def save_config(cfg: PretrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
