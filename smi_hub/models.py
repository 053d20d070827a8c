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

from smi_hub.errors import ChecksumError, UploadError, WeightsError
from smi_hub.fileio import sha256_file
from smi_hub.schema import (
    ARCH_KEYS,
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_num_classes,
    default_resize_ratio,
    validate_config,
)
from smi_hub.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    UnverifiedWeightsWarning,
    _network_errors,
    check_tensors,
    read_config,
    resolve_hf_folder,
    save_weights_folder,
)

BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None -> all, int k -> the last k, else these
    (negative from the end); out-of-range values raise ``ValueError``."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: take the last 1 to {n} stages.")
        return list(range(n - indices, n))
    take = []
    for i in indices:
        j = n + i if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"Stage index {i} is out of range for {n} stages ({list(STAGES)}).")
        take.append(j)
    return take


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

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier head (``nn.Identity`` when there is none), or its name ``"fc"``
        with ``name_only``, as timm."""
        if name_only:
            return "fc"
        return self.fc if self.fc is not None else nn.Identity()

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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass instead of storing
        them (less memory, about one more forward of compute), as timm."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups of a ResNet (for layer-wise learning-rate decay): the stem,
        then one group per stage (``coarse``) or per block; the head and projector fall into
        timm's last group."""
        return dict(
            stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exempt from weight decay beyond timm's default rule (which
        already exempts every bias and norm weight): none, as timm's ResNet."""
        return set()

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

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: feature maps of stages 0 (stem, before the max-pool) to 4
        (``layer4``). ``indices``: the last n stages if an int, all if None, else these stage
        indices (negative from the end). Returns ``(final map, intermediates)``, or only the
        list with ``intermediates_only``. ``norm`` is accepted for timm compatibility (ResNets
        have no final norm). See :meth:`forward_stages` for maps keyed by stage name."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}.")
        self._check_input(x)
        take = _take_indices(len(STAGES), indices)
        intermediates: list[torch.Tensor] = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        last = max(take) if stop_early else len(STAGES) - 1
        for i in range(1, last + 1):
            x = self._stage(i, x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

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

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        with_projector: bool = False,
        training: dict | None = None,
        results: dict | None = None,
        name: str | None = None,
        repo_id: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a weights folder (see ``smi_hub.save_weights_folder``): backbone and head only
        unless ``with_projector``; ``training``/``results`` default to those of the loaded
        weights, so a load -> save round trip keeps the provenance. A folder with files of
        others is refused unless ``overwrite`` (which replaces only the weights files)."""
        return save_weights_folder(
            self,
            save_directory,
            with_projector=with_projector,
            training=training,
            results=results,
            name=name,
            repo_id=repo_id,
            overwrite=overwrite,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        with_projector: bool = False,
        commit_message: str = "Upload smi-hub weights folder",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
    ) -> object:
        """Create ``repo_id`` if needed and upload the weights folder (``model.safetensors``,
        ``config.json``, ``README.md``: nothing else) in one commit; returns the commit info."""
        import tempfile

        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(token=token)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.save_pretrained(
                    Path(tmp) / "weights", with_projector=with_projector, repo_id=repo_id
                )
                return api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    commit_message=commit_message,
                    revision=branch,
                    create_pr=create_pr,
                )
        except HfHubHTTPError as e:  # as smi_hub.load wraps downloads
            raise UploadError(
                f"Uploading to the Hugging Face repo {repo_id!r} failed: {e}. Check the repo "
                "id and that you may write to it (`hf auth login`, HF_TOKEN or token=)."
            ) from e
        except _network_errors() as e:
            raise UploadError(
                f"Could not reach the Hugging Face Hub to upload {repo_id!r}: "
                f"{type(e).__name__}: {e}. Check the network connection (and HF_ENDPOINT / "
                "proxy settings; HF_HUB_OFFLINE=1 forbids uploads) and retry; "
                "save_pretrained(folder) keeps the weights folder locally meanwhile."
            ) from e

    def _save_pretrained(self, save_directory: Path) -> None:
        """Hugging Face mixin hook: write the smi-hub weights folder format."""
        save_weights_folder(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        num_classes: int | None = None,
    ) -> SMIModel:
        """Load a weights folder or a Hugging Face repo id (downloaded, or from the cache when
        ``HF_HUB_OFFLINE=1``) strictly; the architecture comes from its ``config.json``.
        ``num_classes``: as ``smi_hub.load(..., num_classes=K)`` (a fresh K-way head unless
        the loaded head already has K classes; 0 removes it).

        Replaces the mixin's version, which reads ``config.json`` through ``hf_hub_download``
        first and so leaks huggingface_hub's errors (e.g. ``LocalEntryNotFoundError`` offline
        with an empty cache); here every failure is a ``WeightsError`` that says how to fix it.
        """
        if not strict:
            raise ValueError(
                "SMIModel weights always load strictly (strict=False is not supported); build "
                "SMIModel(...) and call load_state_dict(..., strict=False) yourself to load a "
                "partial state dict."
            )
        if num_classes is not None:
            check_num_classes(num_classes)  # before anything is downloaded
        model = cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
        )
        return with_num_classes(model, num_classes).eval()

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


class FeatureInfo(list):
    """timm's ``FeatureInfo`` of the maps a features-only model returns: a list of dicts
    (``num_chs``, ``reduction``, ``module``) with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class SMIFeatures(nn.Module):
    """A backbone returning a list of feature maps, as timm's ``features_only=True`` models
    (``smi_hub.load(name, features_only=True, out_indices=(1, 2, 3, 4))``). ``out_indices``
    are stage indices: 0 the stem activation, 1-4 ``layer1``-``layer4`` (negative from the
    end); only as deep as needed is computed."""

    def __init__(self, model: SMIModel, out_indices: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        take = _take_indices(len(STAGES), list(out_indices))
        model.projector, model.projector_dims = None, []
        model.reset_classifier(0)
        self.model = model
        self.out_indices = take
        self.feature_info = FeatureInfo(model.feature_info[i] for i in take)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(  # type: ignore[return-value]
            x, indices=self.out_indices, stop_early=True, intermediates_only=True
        )


def with_num_classes(model: SMIModel, num_classes: int | None) -> SMIModel:
    """``model`` with a ``num_classes``-way head (checked by :func:`check_num_classes`): a
    fresh one unless the head already has that size (a fine-tuned classifier is kept)."""
    if num_classes is not None and check_num_classes(num_classes) != model.num_classes:
        model.reset_classifier(num_classes)
    return model


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
