"""``SMIModel``'s Hugging Face Hub methods over smi-hub's weights folders (``HFHubMixin``:
``save_pretrained``, ``push_to_hub``, ``from_pretrained``) and ``with_num_classes``."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch

from smi_hub.errors import UploadError
from smi_hub.schema import check_num_classes
from smi_hub.weights import _network_errors, save_weights_folder

_Model = TypeVar("_Model", bound="HFHubMixin")


class HFHubMixin:
    """Hugging Face's ``ModelHubMixin`` methods writing and reading smi-hub weights folders
    (mixed into ``SMIModel`` ahead of ``PyTorchModelHubMixin``). Reads what ``SMIModel``
    defines: ``_from_pretrained`` (a folder or repo id -> the model, loaded strictly),
    ``num_classes`` and ``reset_classifier``."""

    num_classes: int

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
        cls: type[_Model],
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
    ) -> _Model:
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


def with_num_classes(model: _Model, num_classes: int | None) -> _Model:
    """``model`` with a ``num_classes``-way head (checked by :func:`check_num_classes`): a
    fresh one unless the head already has that size (a fine-tuned classifier is kept)."""
    if num_classes is not None and check_num_classes(num_classes) != model.num_classes:
        model.reset_classifier(num_classes)
    return model
