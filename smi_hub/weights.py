"""The weights folder format: ``model.safetensors`` + ``config.json`` + ``README.md`` model card.

``save_weights_folder`` writes it (used by ``SMIModel.save_pretrained`` / ``push_to_hub`` and
``smi-hub export``); ``read_config`` reads and validates ``config.json``, checking the format
version; ``smi_hub.models.load_weights_folder`` builds the model it describes and loads the
tensors strictly, checking the sha256 recorded in ``config.json``. This module reads and writes
files and never imports the model class. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from smi_hub.errors import DownloadError, UnsupportedFormatError, WeightsError
from smi_hub.model_card import render_model_card
from smi_hub.outputs import Claim, claim_output_dir, commit_folder
from smi_hub.schema import validate_config
from smi_hub.settings import env_flag

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``state`` with a canonical header (keys sorted, compact JSON),
    so the same tensors and metadata always give the same bytes and sha256 (safetensors
    itself writes metadata in a per-process random order)."""
    raw = save(state, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header_bytes = header.encode() + b" " * (-len(header.encode()) % 8)  # 8-byte alignment
    return len(header_bytes).to_bytes(8, "little") + header_bytes + raw[8 + n :]


def timm_architecture(config: dict[str, Any]) -> str | None:
    """timm's model name for a config whose layout timm builds (standard stem and width)."""
    standard = config.get("base_width", 64) == 64 and not config.get("small_stem", False)
    return config["arch"] if standard else None


def save_weights_folder(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    with_projector: bool = True,
    training: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    name: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    claim: Claim | None = None,
) -> Path:
    """Write ``model`` as a weights folder and return its path.

    Args:
        model: an ``SMIModel``.
        out_dir: folder to create, or an earlier weights folder to update; a folder with
            other files is refused unless ``overwrite`` (then only ``model.safetensors``,
            ``README.md`` and ``config.json`` are replaced; see ``smi_hub.outputs``).
        with_projector: keep the ``projector.*`` tensors (needed to continue SMI training;
            ``save_pretrained``, ``push_to_hub`` and ``smi-hub export`` default to False);
            without them the file holds only torchvision-named tensors (backbone, and the
            ``fc`` classifier head if the model has one).
        training: summary of the training recipe (dataset, epochs, loss, ...) for config.json;
            default: the ``training`` section of the weights the model was loaded from.
        results: evaluation results (e.g. ``{"knn_top1": 85.1}``) for config.json and the card;
            default: those of the weights the model was loaded from.
        name: model name used in the model card title.
        repo_id: Hugging Face repo id the folder is published as (for the card's usage line).
        overwrite: see ``out_dir``.
        claim: an output claim the caller already holds on ``out_dir`` (fine-tuning claims
            its folder when it starts); ``out_dir`` and ``overwrite`` are then not re-checked.

    The weights file has deterministic bytes (canonical header), so saving the same tensors
    twice gives the same ``weights_sha256``. config.json also carries timm's keys
    (``pretrained_cfg``, ``num_classes``; ``architecture`` for timm-buildable layouts).
    """
    own = claim is None
    if claim is None:
        claim = claim_output_dir(out_dir, "weights", overwrite)
    try:
        return _write_weights(model, claim, with_projector, training, results, name, repo_id)
    finally:
        if own:
            claim.release()


def _write_weights(
    model: torch.nn.Module,
    claim: Claim,
    with_projector: bool,
    training: dict[str, Any] | None,
    results: dict[str, Any] | None,
    name: str | None,
    repo_id: str | None,
) -> Path:
    out = claim.path
    keep_projector = with_projector and model.projector is not None
    state = model.weights_state_dict(with_projector=keep_projector)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = safetensors_bytes(state, {"format": "pt", "smi_hub_format": str(FORMAT_VERSION)})
    loaded_from = getattr(model, "weights_config", None) or {}

    config = dict(model.config)
    if not keep_projector:
        config["projector_dims"] = []
    config.update(
        {
            "format_version": FORMAT_VERSION,
            "library": "smi-hub",
            "num_features": model.num_features,
            "num_params": sum(v.numel() for v in state.values()),
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "training": (loaded_from.get("training") or {}) if training is None else training,
            "results": (loaded_from.get("results") or {}) if results is None else results,
            "pretrained_cfg": {
                k: v for k, v in model.pretrained_cfg.items() if k != "weights_sha256"
            },
        }
    )
    if timm_architecture(config):
        config["architecture"] = timm_architecture(config)
    card = render_model_card(config, name=name or out.name, repo_id=repo_id)
    # file by file (run files such as checkpoints/ stay), config.json last: it records the
    # sha256 of the weights, so a folder interrupted between two files is refused on load
    # (ChecksumError) instead of pairing old and new files
    with commit_folder(claim, swap=False) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(data)
        (tmp / CARD_NAME).write_text(card)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``config.json`` of a weights folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(
            f"{path} not found: a weights folder needs {CONFIG_NAME} next to {WEIGHTS_NAME}. "
            "Create one with `smi-hub export CHECKPOINT OUT_DIR` or SMIModel.save_pretrained()."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-export the weights folder.") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path} has format_version {version!r} but this smi-hub reads up to "
            f"{FORMAT_VERSION}; upgrade with `pip install -U smi-hub`."
        )
    missing = [k for k in ("arch",) if k not in config]
    if missing:
        raise WeightsError(f"{path} lacks the architecture keys {missing}; re-export the folder.")
    validate_config(config, source=str(path))
    return config


class UnverifiedWeightsWarning(UserWarning):
    """A weights folder was loaded without a sha256 to check its weights file against."""


def check_tensors(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse tensors whose dtype kind differs from the model's (an int8 tensor where a float
    weight is expected would be cast silently) and warn about non-finite values."""
    wrong = [
        f"{k}: {state[k].dtype} (expected {expected[k].dtype})"
        for k in sorted(set(state) & set(expected))
        if state[k].is_floating_point() != expected[k].is_floating_point()
    ]
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
        raise WeightsError(
            f"{source} holds tensors of the wrong dtype: {shown}. Weights must be floating "
            "point (quantized or integer files are not supported); re-export them from a "
            "checkpoint."
        )
    bad = [
        k
        for k in sorted(state)
        if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        warnings.warn(
            f"{source} holds NaN or infinite values in {len(bad)} tensor(s): {shown}. The "
            "model will produce NaN features; the weights are probably from a diverged run.",
            RuntimeWarning,
            stacklevel=3,
        )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP clients huggingface_hub may be built on
    (httpx2 / httpx in recent versions, requests in older ones), plus Python's own."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return tuple(errors)


def _hf_offline() -> bool:
    """True when huggingface_hub runs in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env_flag("HF_HUB_OFFLINE")


def resolve_hf_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local folder for a weights folder path or a Hugging Face repo id (downloaded or cached).

    Honors ``HF_HUB_OFFLINE=1``: then only the local Hugging Face cache is used.

    Raises:
        WeightsError: not a valid repo id; the repo (or revision, or file) does not exist or
            is private or gated; or it is not cached while downloading is off.
        DownloadError: the Hub could not be reached or answered with an HTTP error.
    """
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = str(repo_id_or_path)
    predownload = (
        f"pre-download it with `hf download {repo}` (`huggingface-cli download {repo}` with "
        "huggingface_hub < 0.34) on a machine that is online"
    )
    try:
        local = snapshot_download(
            repo_id=repo,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
        )
    except HFValidationError as e:
        raise WeightsError(
            f"{repo!r} is neither an existing folder nor a valid Hugging Face repo "
            f"id ('owner/name'): {e}"
        ) from e
    except LocalEntryNotFoundError as e:
        if local_files_only or _hf_offline():
            fix = (
                "pass local_files_only=False"
                if local_files_only and not _hf_offline()
                else "unset HF_HUB_OFFLINE (or set HF_HUB_OFFLINE=0)"
            )
            raise WeightsError(
                f"{repo!r} is not in the Hugging Face cache and downloading is off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True). To fix it, "
                f"{fix} to download it, or {predownload}; or point to a local weights folder."
            ) from e
        raise DownloadError(  # online, but the Hub could not be reached and nothing is cached
            f"Could not reach the Hugging Face Hub to download {repo!r}, and it is not in the "
            f"local cache ({e}). Check the network connection (and HF_ENDPOINT / proxy "
            f"settings) and retry, or {predownload}."
        ) from e
    except GatedRepoError as e:
        raise WeightsError(
            f"The Hugging Face repo {repo!r} is gated: request access at "
            f"https://huggingface.co/{repo}, then log in (`hf auth login` or HF_TOKEN) or pass "
            "token=."
        ) from e
    except RepositoryNotFoundError as e:
        raise WeightsError(
            f"No Hugging Face model repo {repo!r} could be found: check the id ('owner/name') "
            "for typos; if the repo is private, log in (`hf auth login` or HF_TOKEN) or pass "
            "token=. Or pass a local weights folder."
        ) from e
    except RevisionNotFoundError as e:
        raise WeightsError(
            f"The Hugging Face repo {repo!r} has no revision {revision!r} (branch, tag or "
            "commit); check it, or leave revision unset for the main branch."
        ) from e
    except EntryNotFoundError as e:
        raise WeightsError(
            f"The Hugging Face repo {repo!r} lacks a file of the smi-hub weights folder "
            f"({CONFIG_NAME}, {WEIGHTS_NAME}): {e}. Re-upload it with smi-hub export / "
            "push_to_hub."
        ) from e
    except HfHubHTTPError as e:
        raise DownloadError(
            f"Downloading {repo!r} from the Hugging Face Hub failed: {e}. Retry later; if it "
            f"persists, {predownload}."
        ) from e
    except _network_errors() as e:
        raise DownloadError(
            f"Downloading {repo!r} from the Hugging Face Hub failed: network error "
            f"({type(e).__name__}: {e}). Check the connection (and HF_ENDPOINT / proxy "
            f"settings) and retry, or {predownload}."
        ) from e
    return Path(local)
