"""The weights folder format: ``model.safetensors`` + ``config.json`` + ``README.md`` model card.

``save_weights_folder`` writes it (used by ``SMIModel.save_pretrained`` / ``push_to_hub`` and
``smi-hub export``); ``load_weights_folder`` reads it back strictly, checking the format version
and the sha256 of the weights file recorded in ``config.json``. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smi_hub.errors import ChecksumError, DownloadError, UnsupportedFormatError, WeightsError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
ARCH_KEYS = ("arch", "base_width", "small_stem", "projector_dims", "image_size", "mean", "std")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights_folder(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    with_projector: bool = True,
    training: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` as a weights folder and return its path.

    Args:
        model: an ``SMIModel``.
        out_dir: folder to create or overwrite.
        with_projector: keep the ``projector.*`` tensors (needed to continue SMI training);
            without them the file holds only torchvision-named backbone tensors.
        training: summary of the training recipe (dataset, epochs, loss, ...) for config.json.
        results: evaluation results (e.g. ``{"knn_top1": 85.1}``) for config.json and the card.
        name: model name used in the model card title.
    """
    from smi_hub.model_card import render_model_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep_projector = with_projector and model.projector is not None
    state = model.state_dict() if keep_projector else model.backbone_state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "smi_hub_format": str(FORMAT_VERSION)})
    os.replace(tmp, out / WEIGHTS_NAME)

    config = dict(model.config)
    if not keep_projector:
        config["projector_dims"] = []
    config.update(
        {
            "format_version": FORMAT_VERSION,
            "library": "smi-hub",
            "num_features": model.num_features,
            "num_params": sum(v.numel() for v in state.values()),
            "weights_sha256": sha256_file(out / WEIGHTS_NAME),
            "training": training or {},
            "results": results or {},
        }
    )
    _atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    card = render_model_card(config, name=name or out.resolve().name)
    _atomic_write_bytes(out / CARD_NAME, card.encode())
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
    return config


def build_model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained ``SMIModel`` with the architecture described by ``config``."""
    from smi_hub.models import SMIModel

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
    from smi_hub.models import load_state_dict_strict

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
    if want:
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
    load_state_dict_strict(model, state)
    model.pretrained_cfg = config
    if device is not None:
        model.to(device)
    return model.eval()


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

    from smi_hub.download import env_flag

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
