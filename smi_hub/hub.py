"""``smi_hub.load``: one loader for registry names, folders, Hugging Face repos and URLs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from smi_hub.download import fetch_weights_url, is_url
from smi_hub.errors import ChecksumError, WeightsError, WeightsNotPublishedError
from smi_hub.hf_hub_mixin import with_num_classes
from smi_hub.models import SMIModel, build_model_from_config, load_weights_folder
from smi_hub.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, list_models, preprocessing
from smi_hub.schema import check_num_classes
from smi_hub.timm_compat import SMIFeatures
from smi_hub.weights import WEIGHTS_NAME, read_config, resolve_hf_folder


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).exists()


def _from_folder(folder: Path, pretrained: bool, expected_sha256: str | None = None) -> SMIModel:
    if pretrained:
        return load_weights_folder(folder, expected_sha256=expected_sha256)  # type: ignore[return-value]
    model = build_model_from_config(read_config(folder))
    return model.eval()  # type: ignore[return-value]


def _from_entry(entry: ModelEntry, pretrained: bool, progress: bool) -> SMIModel:
    if not pretrained:
        cfg = entry.folder_config() or entry.model_config
        return build_model_from_config(cfg).eval()  # type: ignore[return-value]
    if entry.status == "embedded":
        folder = entry.weights_folder
        assert folder is not None
        if not entry.available:
            raise WeightsNotPublishedError(
                f"The embedded default weights of {entry.name!r} are missing: {folder} holds no "
                "config.json/model.safetensors in this install. Build them from a source "
                "checkout (about 30 minutes on 2 CPU cores):\n"
                f"{entry.how_to_build()}\n"
                "or load another model: smi_hub.load('path/to/weights_folder'), a Hugging Face "
                "repo id or a URL. smi_hub.load(name, pretrained=False) gives the untrained "
                "architecture."
            )
        cfg = read_config(folder)
        if entry.sha256 and cfg.get("weights_sha256") not in (None, entry.sha256):
            raise ChecksumError(
                f"{folder}/config.json records sha256 {cfg.get('weights_sha256')} but the "
                f"registry pins {entry.sha256} for {entry.name!r}: the embedded folder was "
                "replaced without updating smi_hub/registry.py (or the other way round)."
            )
        return _from_folder(folder, True, expected_sha256=entry.sha256)
    if entry.status == "published" and entry.url:
        folder = fetch_weights_url(entry.url, sha256=entry.sha256, progress=progress)
        return _from_folder(folder, True)
    raise WeightsNotPublishedError(
        f"No pretrained weights of {entry.name!r} are published yet (status: {entry.status}). "
        f"Train them with the recipe {entry.recipe} and export a weights folder:\n"
        f"{entry.how_to_build()}\n"
        f"then load it with smi_hub.load('weights/{entry.name}'). "
        f"smi_hub.load({entry.name!r}, pretrained=False) gives the untrained architecture."
    )


def entry_info(entry: ModelEntry) -> dict[str, Any]:
    """Metadata of a registry entry for ``smi-hub info``: from the weights' config.json when
    available."""
    cfg = entry.folder_config()
    arch = dict(entry.model_config)
    if cfg is not None:
        arch = {k: cfg[k] for k in entry.model_config if k in cfg}
    try:
        with torch.device("meta"):
            model = SMIModel(**arch)
        backbone = sum(v.numel() for v in model.backbone_state_dict().values())
        total = sum(v.numel() for v in model.state_dict().values())
    except Exception:  # an odd config should not break `smi-hub list`
        backbone = total = None
    training = (cfg or {}).get("training") or {}
    return {
        "name": entry.name,
        "description": entry.description,
        "status": entry.status,
        "available": entry.available,
        "architecture": arch,
        "dataset": training.get("dataset", entry.dataset),
        "loss": training.get("loss", entry.loss),
        "epochs": training.get("epochs", entry.epochs),
        "results": (cfg or {}).get("results", {}),
        "backbone_params": backbone,
        "params_with_projector": total,
        "weights_params": (cfg or {}).get("num_params"),
        "recipe": entry.recipe,
        "sha256": entry.sha256 or (cfg or {}).get("weights_sha256"),
        "url": entry.url,
        "preprocessing": preprocessing(arch, entry.resize_ratio),
    }


def load(
    name_or_path: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    *,
    sha256: str | None = None,
    arch: str | None = None,
    progress: bool = True,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> SMIModel | SMIFeatures:
    """Load an ``SMIModel`` in eval mode.

    Args:
        name_or_path: a registry name (see ``list_models()``; None = the embedded default
            ``smi_resnet18_fmnist``), a local weights folder, a Hugging Face repo id
            (``owner/name``; ``HF_HUB_OFFLINE=1`` uses the local cache), or an http(s) URL of a
            weights folder or archive (``.zip`` / ``.tar.gz``), optionally ending in
            ``#sha256=<hex>``.
        pretrained: False builds the architecture with random weights (registry names,
            folders and repos: only config.json is needed).
        device: where to put the model (default CPU).
        sha256: expected sha256 of a URL's archive or of ``model.safetensors``.
        arch: if given, the loaded architecture must be this one (``resnet18`` ...).
        progress: show a download progress bar.
        num_classes: give the model a freshly initialized ``num_classes``-way classifier head
            on its (pretrained) features, as ``timm.create_model(..., num_classes=K)``; 0
            removes a head. A head already of that size (a fine-tuned classifier) is kept.
            Must be an integer from 0 to 100,000 (checked before anything is loaded).
        features_only, out_indices: as timm: return an :class:`SMIFeatures` whose forward
            gives the list of feature maps of these stages (0 stem, 1-4 ``layer1``-``layer4``)
            and whose ``feature_info`` says their channels and strides.

    Raises:
        WeightsNotPublishedError: a registry entry without weights (the message says how to
            train and export them). WeightsError / ChecksumError / UnsupportedFormatError:
            unusable weights. DownloadError: a URL could not be fetched.
    """
    if num_classes is not None:
        check_num_classes(num_classes)
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    text = os.fspath(name)
    if isinstance(name, str) and text in REGISTRY:
        model = _from_entry(REGISTRY[text], pretrained, progress)
    elif is_url(text):
        model = _from_folder(fetch_weights_url(text, sha256=sha256, progress=progress), pretrained)
    elif not isinstance(name, str) or _looks_like_path(text) or Path(text).exists():
        path = Path(text).expanduser()
        if path.is_file() and path.name == WEIGHTS_NAME:
            path = path.parent
        if not path.is_dir():
            raise WeightsError(
                f"{path} is not a weights folder (it does not exist or is a file). Pass the "
                f"folder holding config.json and {WEIGHTS_NAME}."
            )
        model = _from_folder(path, pretrained, expected_sha256=sha256)
    elif "/" in text:
        # the same as SMIModel.from_pretrained(text), with smi-hub's errors for a missing repo
        model = _from_folder(resolve_hf_folder(text), pretrained, expected_sha256=sha256)
    else:
        raise WeightsError(
            f"Unknown model {text!r}: not a registered name ({', '.join(list_models())}), an "
            "existing folder, an http(s) URL or a Hugging Face repo id ('owner/name')."
        )
    if arch is not None and model.arch != arch:
        raise WeightsError(
            f"{text} holds a {model.arch} but a {arch} was requested; use the entry point for "
            f"{model.arch} or weights of a {arch}."
        )
    with_num_classes(model, num_classes)
    if device is not None:
        model.to(device)
    return SMIFeatures(model, out_indices).eval() if features_only else model.eval()
