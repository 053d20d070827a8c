"""SMIModel: a torchvision-layout ResNet backbone plus the SMI projector MLP.

The backbone's modules sit at the top level of the model (``conv1``, ``bn1``, ``layer1`` ...
``layer4``), so backbone tensor names are exactly torchvision's ResNet names and a backbone-only
state dict loads with ``strict=True`` into ``torchvision.models.resnetXX()`` once its ``fc`` is
removed. The projector lives under ``projector.*``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from smi_hub.errors import ChecksumError, WeightsError
from smi_hub.fileio import sha256_file
from smi_hub.hf_hub_mixin import HFHubMixin
from smi_hub.schema import (
    ARCH_KEYS,
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_num_classes,
    default_resize_ratio,
    validate_config,
)
from smi_hub.timm_compat import STAGES, TimmCompatMixin
from smi_hub.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    UnverifiedWeightsWarning,
    check_tensors,
    read_config,
    resolve_hf_folder,
)

BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """One ResNet stage with torchvision's module names (``0.conv1``, ``0.downsample.0`` ...)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def build_projector(in_dim: int, dims: Sequence[int], hidden_bias: bool = False) -> nn.Sequential:
    """Barlow Twins-style projector: (Linear-BN-ReLU) x (len(dims) - 1), then a last Linear
    without bias. ``hidden_bias``: the hidden Linears have a bias (VICReg's projector)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in dims[:-1]:
        linear = nn.Linear(prev, width, bias=hidden_bias)
        layers += [linear, nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        prev = width
    layers.append(nn.Linear(prev, dims[-1], bias=False))
    return nn.Sequential(*layers)


class SMIModel(
    nn.Module,
    TimmCompatMixin,
    HFHubMixin,
    PyTorchModelHubMixin,
    library_name="smi-hub",
    tags=["self-supervised-learning", "smi", "image-feature-extraction"],
    license="apache-2.0",
    repo_url="https://github.com/smi-hub/smi-hub",
):
    """ResNet backbone + projector trained with the SMI objective.

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        base_width: channels of the first stage (64 is torchvision's ResNet; smaller values
            give proportionally narrower models with the same tensor names).
        small_stem: 3x3 stride-1 first convolution and no max-pool, for 28-96 px images.
        projector_dims: widths of the projector layers; empty for a backbone-only model,
            whose ``forward`` then returns the pooled backbone features.
        image_size: input resolution the weights were trained at (metadata for transforms).
        mean, std: per-channel normalization the weights expect (metadata for transforms).
        zero_init_residual: initialize the last BatchNorm weight of each residual block to 0,
            so each block starts as the identity (torchvision's option; the Barlow Twins and
            VICReg references pretrain with it). Initialization only: not part of ``config``.
        projector_bias: the projector's hidden Linear layers have biases (VICReg's
            projector; Barlow Twins' has none). In ``config`` only when true.
        num_classes: size of a linear classifier head ``fc`` on the pooled features (0: no
            head). With a head, ``forward`` returns logits, as torchvision's and timm's ResNets.
        class_names: one name per class (metadata for ``smi-hub predict``); default
            ``class_0`` ... In ``config`` (with ``num_classes``) only when there is a head.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        base_width: int = 64,
        small_stem: bool = False,
        projector_dims: Sequence[int] = (8192, 8192, 8192),
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        zero_init_residual: bool = False,
        projector_bias: bool = False,
        num_classes: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"Unknown arch {arch!r}; choose one of {sorted(ARCHS)}.")
        if base_width < 1:
            raise ValueError(f"base_width must be a positive integer, got {base_width}.")
        check_num_classes(num_classes)
        if any(int(d) < 1 for d in projector_dims):
            raise ValueError(f"projector_dims must be positive widths, got {list(projector_dims)}.")
        self.arch = arch
        self.base_width = int(base_width)
        self.small_stem = bool(small_stem)
        self.projector_dims = [int(d) for d in projector_dims]
        self.image_size = int(image_size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.projector_bias = bool(projector_bias)

        kind, blocks = ARCHS[arch]
        block = BLOCKS[kind]
        w = self.base_width
        if small_stem:
            self.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        inplanes = w
        for i, n in enumerate(blocks):
            planes = w * 2**i
            stage = _make_stage(block, inplanes, planes, n, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
            inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        self.projector = (
            build_projector(self.num_features, self.projector_dims, self.projector_bias)
            if self.projector_dims
            else None
        )
        self.fc: nn.Linear | None = None
        self.num_classes = 0
        self.class_names: list[str] = []
        self.reset_classifier(num_classes, class_names=class_names)
        self.grad_checkpointing = False
        self._init_weights(zero_init_residual)
        self.weights_config: dict = {}  # config.json of the loaded weights (provenance)

    def _init_weights(self, zero_init_residual: bool = False) -> None:
        """torchvision's ResNet initialization (Kaiming fan-out convs, BN weight 1 bias 0;
        with ``zero_init_residual`` the last BN of each residual block gets weight 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def config(self) -> dict:
        """The constructor arguments; ``SMIModel(**model.config)`` rebuilds the architecture."""
        config = {
            "arch": self.arch,
            "base_width": self.base_width,
            "small_stem": self.small_stem,
            "projector_dims": list(self.projector_dims),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.projector_bias:  # absent when false: earlier configs stay valid and equal
            config["projector_bias"] = True
        if self.num_classes:  # likewise absent for backbone-only models
            config["num_classes"] = self.num_classes
            config["class_names"] = list(self.class_names)
        return config

    @property
    def pretrained_cfg(self) -> dict:
        """timm's ``pretrained_cfg`` schema, so ``timm.data.resolve_data_config({}, model=m)``
        gives the same evaluation transform as ``smi_hub.get_transforms(m)``."""
        cfg = {
            "architecture": self.arch,
            "input_size": (3, self.image_size, self.image_size),
            "crop_pct": 1.0 / default_resize_ratio(self.image_size),
            "crop_mode": "center",
            "interpolation": "bicubic",
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "num_classes": self.num_classes,
            "first_conv": "conv1",
            "classifier": "fc",
            "license": "apache-2.0",
        }
        if self.class_names:
            cfg["label_names"] = list(self.class_names)
        if self.weights_config.get("weights_sha256"):
            cfg["weights_sha256"] = self.weights_config["weights_sha256"]
        return cfg

    def reset_classifier(
        self,
        num_classes: int,
        global_pool: str | None = None,
        *,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Replace the classifier head by a freshly initialized ``num_classes``-way ``fc``
        (0 removes it), with timm's signature. ``global_pool``: None keeps the pooling, as
        timm; only ``"avg"`` (what our ResNets use) is accepted otherwise. ``class_names``
        (keyword): one name per class (default ``class_0`` ...)."""
        check_num_classes(num_classes)
        if global_pool not in (None, "avg"):
            hint = (
                " (class names go by keyword: reset_classifier(n, class_names=[...]))"
                if not isinstance(global_pool, str)
                else ""
            )
            raise ValueError(
                f"global_pool = {global_pool!r}: SMIModel pools by global average only; pass "
                f"None or 'avg'{hint}."
            )
        names = [str(c) for c in class_names] if class_names is not None else []
        if names and len(names) != num_classes:
            raise ValueError(f"{len(names)} class_names for num_classes={num_classes}.")
        self.num_classes = int(num_classes)
        self.class_names = names or [f"class_{i}" for i in range(self.num_classes)]
        self.fc = nn.Linear(self.num_features, self.num_classes) if self.num_classes else None

    @property
    def feature_info(self) -> list[dict]:
        """timm's ``feature_info`` of a ResNet: channels, stride and module of the stem
        activation and of each stage (the maps ``forward_intermediates`` returns). Our stem
        activation is named ``relu`` (timm's ``act1``); the small-image stem has stride 1."""
        block = BLOCKS[ARCHS[self.arch][0]]
        stem = 1 if self.small_stem else 2
        info = [dict(num_chs=self.base_width, reduction=stem, module="relu")]
        for i in range(4):
            reduction = stem * (1 if self.small_stem else 2) * 2**i
            chs = self.base_width * 2**i * block.expansion
            info.append(dict(num_chs=chs, reduction=reduction, module=f"layer{i + 1}"))
        return info

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``layer{i}``, block by block under gradient checkpointing when enabled."""
        stage = getattr(self, f"layer{i}")
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        from torch.utils.checkpoint import checkpoint

        for block in stage:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"SMIModel expects a float batch of RGB images B x 3 x H x W, got shape "
                f"{tuple(x.shape)}; convert grayscale/RGBA images to RGB first "
                "(smi_hub.get_transforms does)."
            )

    def forward_stages(
        self, x: torch.Tensor, layers: Sequence[str] = STAGES[1:]
    ) -> dict[str, torch.Tensor]:
        """Spatial feature maps of the requested stages by name (``stem`` (after the max-pool),
        ``layer1`` ... ``layer4``), computed only as deep as needed."""
        self._check_input(x)
        unknown = [name for name in layers if name not in STAGES]
        if unknown:
            raise ValueError(f"Unknown layers {unknown}; choose from {list(STAGES)}.")
        out: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if "stem" in layers:
            out["stem"] = x
        last = max(STAGES.index(name) for name in layers) if layers else 0
        for i in range(1, last + 1):
            x = self._stage(i, x)
            if f"layer{i}" in layers:
                out[f"layer{i}"] = x
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage spatial feature map, B x C x h x w."""
        return self.forward_stages(x, layers=("layer4",))["layer4"]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head: global-average-pool a ``forward_features`` map (a B x C tensor is
        taken as already pooled), then the head: the classifier ``fc`` if there is one, else
        the SMI projector if loaded, else nothing. ``pre_logits=True`` returns the pooled
        features. So ``model(x) == forward_head(forward_features(x))``, as in timm."""
        if x.ndim == 4:
            x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return x
        if self.fc is not None:
            return self.fc(x)
        return self.projector(x) if self.projector is not None else x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled backbone features, B x C (2048 for ResNet-50)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits when the model has a classifier head; otherwise the projector embedding (the
        space the SMI loss is computed in), or the pooled features without a projector."""
        return self.forward_head(self.forward_features(x))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the backbone only: torchvision ResNet names, no ``fc``, no projector."""
        return {
            k: v for k, v in self.state_dict().items() if not k.startswith(("projector.", "fc."))
        }

    def weights_state_dict(self, with_projector: bool = False) -> dict[str, torch.Tensor]:
        """What a weights folder stores: the backbone, the ``fc`` head if any, and the projector
        only when asked (torchvision/timm load the rest with ``strict=True``)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if with_projector or not k.startswith("projector.")
        }

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **model_kwargs,
    ) -> SMIModel:
        """Hugging Face mixin hook: resolve the folder or repo, then load strictly."""
        folder = resolve_hf_folder(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        model_kwargs.pop("strict", None)  # loading is always strict
        return load_weights_folder(folder, device=map_location)


def load_state_dict_strict(model: SMIModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` requiring every key and shape to match.

    A weights file without ``projector.*`` tensors is accepted only by a model built without a
    projector; anything else missing, unexpected or of the wrong shape raises ``WeightsError``
    naming the offending tensors.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:

        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (
                f" ... (+{len(items) - 5} more)" if len(items) > 5 else ""
            )

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {head(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches: {head(wrong_shape)}")
        raise WeightsError(
            f"Weights do not match the {model.arch} architecture "
            f"(base_width={model.base_width}, small_stem={model.small_stem}, "
            f"projector_dims={model.projector_dims}): " + "; ".join(parts) + ". "
            "Check that config.json describes the same architecture the weights were saved from."
        )
    model.load_state_dict(state_dict, strict=True)


def build_model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained ``SMIModel`` with the architecture described by ``config`` (validated
    first, see :func:`validate_config`)."""
    validate_config(config)
    kwargs = {k: config[k] for k in ARCH_KEYS if k in config}
    try:
        return SMIModel(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"config.json describes an invalid architecture: {e}") from e


def load_weights_folder(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    expected_sha256: str | None = None,
) -> torch.nn.Module:
    """Build the ``SMIModel`` a weights folder describes and load its weights strictly.

    The sha256 of ``model.safetensors`` is checked against ``expected_sha256`` when given, else
    against the one recorded in ``config.json``. The model is returned in eval mode.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"Weights folder {folder} does not exist or is not a directory.")
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise WeightsError(
            f"{weights} not found. Weights must be a safetensors file named {WEIGHTS_NAME}; "
            "pickled .pt/.bin files are not loaded (they can run arbitrary code)."
        )
    want = expected_sha256 or config.get("weights_sha256")
    if not want:
        warnings.warn(
            f"{folder / CONFIG_NAME} records no weights_sha256, so {weights} cannot be "
            "verified (corruption or tampering would go unnoticed). Re-export the folder "
            "(smi-hub export / SMIModel.save_pretrained always record it) or pass sha256=.",
            UnverifiedWeightsWarning,
            stacklevel=2,
        )
    else:
        got = sha256_file(weights)
        if got != want:
            raise ChecksumError(
                f"sha256 of {weights} is {got}, expected {want}: the file is corrupt, truncated "
                "or was modified. Download or export it again."
            )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"{weights} is not a readable safetensors file ({e}); it may be truncated or "
            "corrupt. Download or export it again."
        ) from e
    model = build_model_from_config(config)
    check_tensors(state, model.state_dict(), source=str(weights))
    load_state_dict_strict(model, state)
    model.weights_config = config
    if device is not None:
        model.to(device)
    return model.eval()
