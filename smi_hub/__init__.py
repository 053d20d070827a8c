"""smi-hub: SMI self-supervised models, their weights, features, retrieval and localization.

Importing is cheap and offline: no network access, and faiss, gradio and datasets are only
imported when a function needs them.
"""

from smi_hub.errors import (
    CheckpointError,
    ChecksumError,
    DownloadError,
    ImageLoadError,
    NonFiniteError,
    SMIHubError,
    UnsupportedFormatError,
    WeightsError,
    WeightsNotPublishedError,
)
from smi_hub.feature_store import FeatureStore
from smi_hub.features import FeatureResult, extract_features
from smi_hub.gallery import default_gallery
from smi_hub.hf_datasets import add_embeddings
from smi_hub.hub import load
from smi_hub.index import EmbeddingIndex, SearchResult
from smi_hub.localization import localization_map, overlay
from smi_hub.models import SMIModel, load_weights_folder
from smi_hub.registry import DEFAULT_MODEL, list_models
from smi_hub.store_export import export_store
from smi_hub.store_manifest import FeatureStoreError
from smi_hub.transforms import get_transforms
from smi_hub.weights import save_weights_folder

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "ChecksumError",
    "DownloadError",
    "EmbeddingIndex",
    "FeatureResult",
    "FeatureStore",
    "FeatureStoreError",
    "ImageLoadError",
    "NonFiniteError",
    "SMIHubError",
    "SMIModel",
    "SearchResult",
    "UnsupportedFormatError",
    "WeightsError",
    "WeightsNotPublishedError",
    "add_embeddings",
    "default_gallery",
    "export_store",
    "extract_features",
    "get_transforms",
    "list_models",
    "load",
    "load_weights_folder",
    "localization_map",
    "overlay",
    "save_weights_folder",
]
