"""Training configuration: the typed dataclasses whose sections a YAML config file mirrors, and
:class:`ConfigError` (reading: :mod:`training.config_load`; checks: :mod:`training.config_checks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from smi_hub.schema import IMAGENET_MEAN, IMAGENET_STD


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
