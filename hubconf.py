"""torch.hub entry points of smi-hub; each delegates to ``smi_hub.load``.

    model = torch.hub.load("smi-hub/smi-hub", "smi_default")            # embedded default
    model = torch.hub.load(repo_dir, "smi_resnet18", source="local", weights="https://...")

Every entry takes ``pretrained`` (False: random weights of the architecture), ``device``,
``num_classes`` (a fresh classifier head on the features, as timm's ``num_classes``), and
``weights``: a weights folder, Hugging Face repo id or URL (``#sha256=`` pinned) to load
instead of the registered weights (its architecture must match the entry's).

    model = torch.hub.load("smi-hub/smi-hub", "smi_default", num_classes=10)  # to fine-tune
"""

from __future__ import annotations

dependencies = ["torch", "torchvision", "safetensors", "huggingface_hub", "PIL", "tqdm"]

import smi_hub as _smi_hub  # noqa: E402
from smi_hub.registry import REGISTRY as _REGISTRY  # noqa: E402


def _entry(registry_name: str, arch: str | None, pretrained: bool, weights, **kwargs):
    source = registry_name if weights is None else weights
    return _smi_hub.load(source, pretrained=pretrained, arch=arch, **kwargs)


def smi_default(pretrained: bool = True, weights=None, **kwargs):
    """Embedded default: SMI ResNet-18 (width 16, small stem) trained on Fashion-MNIST."""
    return _entry("smi_resnet18_fmnist", None, pretrained, weights, **kwargs)


def smi_resnet18(pretrained: bool = True, weights=None, **kwargs):
    """SMI ResNet-18: the embedded Fashion-MNIST model (or ``weights=`` of another ResNet-18)."""
    return _entry("smi_resnet18_fmnist", "resnet18", pretrained, weights, **kwargs)


def smi_resnet50(pretrained: bool = True, weights=None, **kwargs):
    """SMI ResNet-50 on ImageNet-1k (not published yet: pass ``weights=`` or pretrained=False)."""
    return _entry("smi_resnet50_imagenet", "resnet50", pretrained, weights, **kwargs)


def _make(name: str):
    arch = _REGISTRY[name].model_config["arch"]

    def entry(pretrained: bool = True, weights=None, **kwargs):
        return _entry(name, arch, pretrained, weights, **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"{_REGISTRY[name].description} (status: {_REGISTRY[name].status})." + (
        ""
        if _REGISTRY[name].available
        else " No weights are published yet, so the defaults raise WeightsNotPublishedError: "
        "pass weights= (a weights folder, Hugging Face repo id or #sha256= pinned URL of this "
        "architecture) or pretrained=False for the untrained architecture."
    )
    return entry


smi_resnet18_fmnist = _make("smi_resnet18_fmnist")
smi_resnet50_imagenet = _make("smi_resnet50_imagenet")
barlow_twins_resnet50_imagenet = _make("barlow_twins_resnet50_imagenet")
vicreg_resnet50_imagenet = _make("vicreg_resnet50_imagenet")
