"""smi-hub: SMI self-supervised models, their weights, features, retrieval and localization."""

from smi_hub.errors import (
    ChecksumError,
    ImageLoadError,
    SMIHubError,
    UnsupportedFormatError,
    WeightsError,
    WeightsNotPublishedError,
)
from smi_hub.models import SMIModel
from smi_hub.weights import load_weights_folder, save_weights_folder

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "ImageLoadError",
    "SMIHubError",
    "SMIModel",
    "UnsupportedFormatError",
    "WeightsError",
    "WeightsNotPublishedError",
    "load_weights_folder",
    "save_weights_folder",
]
