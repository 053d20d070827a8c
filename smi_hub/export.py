"""``smi-hub export``: a training checkpoint -> a weights folder.

Reads the checkpoint with ``torch.load(..., weights_only=True)`` (never unpickling objects),
summarizes the training recipe, collects evaluation results from ``<run_dir>/eval/*.json``
(``run_dir`` = the parent of the checkpoint's ``checkpoints/`` folder) and any ``--results``
files, and writes ``model.safetensors`` + ``config.json`` + ``README.md``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from smi_hub.errors import CheckpointError, refused_global
from smi_hub.fileio import sha256_file
from smi_hub.models import SMIModel, load_state_dict_strict
from smi_hub.outputs import Claim, claim_output_dir
from smi_hub.weights import save_weights_folder

CHECKPOINT_FORMAT = "smi-hub-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "model_config")
SIDECAR_SUFFIX = ".sha256"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The checksum file of a checkpoint: ``<name>.sha256`` next to it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that ``path`` holds the bytes it was written with, before anything reads it (the
    one check of resume and export alike).

    The SHA-256 in its ``.sha256`` sidecar must match; a checkpoint without one (written by
    an older smi-hub, or by a run killed between the two renames) must pass the CRC-32 checks
    of its zip archive. Raises :class:`CheckpointError` saying what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes).")
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        words = sidecar.read_text(errors="replace").split()
        expected = words[0].lower() if words else ""
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise CheckpointError(
                f"{sidecar} does not hold a SHA-256 digest, so {path} cannot be verified."
            )
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{path} does not match its checksum in {sidecar.name} (sha256 {actual[:12]}..., "
                f"expected {expected[:12]}...): it was modified or corrupted after it was written."
            )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a torch checkpoint archive ({e}) and has no {SIDECAR_SUFFIX} "
            "checksum file: it is truncated, overwritten or not a checkpoint."
        ) from e
    if bad is not None:
        raise CheckpointError(f"{path}: the stored entry {bad} fails its CRC check (corrupted).")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify (:func:`verify_checkpoint`), then load and validate an smi-hub training
    checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; pass a checkpoint file, e.g. {path}/checkpoints/last.pt."
        )
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler raises many types on foreign or broken files
        # torch's message advises weights_only=False (arbitrary code execution): never relay it
        refused = refused_global(e)
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise CheckpointError(
                f"{path} contains non-tensor Python objects ({refused}) and is refused "
                "for safety: smi-hub never unpickles arbitrary objects. Export checkpoints "
                "written by `python -m training.pretrain` (plain tensors and dicts)."
            ) from e
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}); it may be "
            "truncated or not a checkpoint at all."
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an smi-hub training checkpoint (no format: {CHECKPOINT_FORMAT!r} "
            "tag). Export checkpoints written by `python -m training.pretrain`, or save a model "
            "directly with SMIModel.save_pretrained(folder)."
        )
    version = state.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}; this smi-hub reads up to "
            f"{CHECKPOINT_VERSION}. Upgrade smi-hub."
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}; it cannot be exported.")
    if not isinstance(state["model"], dict) or not isinstance(state["model_config"], dict):
        raise CheckpointError(f"{path}: 'model' and 'model_config' must be dicts.")
    return state


def training_summary(state: dict[str, Any]) -> dict[str, Any]:
    """Recipe summary for config.json: loss, dataset, epochs, batch size, optimizer ..."""
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    if isinstance(cfg.get("data"), str):  # a fine-tuning run (python -m training.finetune)
        dataset = cfg["data"] + (f":{cfg['data_path']}" if cfg.get("data_path") else "")
        keys = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "seed")
        summary = {"task": "finetune", "base_model": cfg.get("model"), "dataset": dataset}
        summary.update({k: cfg.get(k) for k in keys})
        summary.update(epoch=state.get("epoch"), step=state.get("step"))
        return {k: v for k, v in summary.items() if v is not None}

    def section(name: str) -> dict[str, Any]:
        value = cfg.get(name)
        return value if isinstance(value, dict) else {}

    loss, data, train = section("loss"), section("data"), section("train")
    dataset = data.get("source")
    if dataset and data.get("path") and dataset != "fashion_mnist":
        dataset = f"{dataset}:{data['path']}"
    summary = {
        "loss": loss.get("name"),
        "loss_kwargs": loss.get("kwargs") or None,
        "dataset": dataset,
        "split": data.get("split"),
        "subset": data.get("subset"),
        "epochs": train.get("epochs"),
        "batch_size": train.get("batch_size"),
        "optimizer": train.get("optimizer"),
        "lr": train.get("lr"),
        "weight_decay": train.get("weight_decay"),
        "warmup_epochs": train.get("warmup_epochs"),
        "precision": train.get("precision"),
        "seed": cfg.get("seed"),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
    }
    return {k: v for k, v in summary.items() if v is not None}


def flatten_results(result: dict[str, Any], source: str = "") -> dict[str, float]:
    """``{"protocol": "knn", "metrics": {"top1": 85.1}}`` -> ``{"knn_top1": 85.1}``."""
    protocol = result.get("protocol")
    metrics = result.get("metrics")
    if not isinstance(protocol, str) or not isinstance(metrics, dict):
        raise CheckpointError(
            f"{source or 'result'}: an evaluation result needs 'protocol' and a 'metrics' "
            "object, as written by `python -m training.evaluate`."
        )
    return {
        f"{protocol}_{k}": v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def collect_results(
    checkpoint: str | os.PathLike, extra: list[str | os.PathLike] | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Results of ``<run_dir>/eval/*.json`` plus ``extra`` files; also protocol -> dataset."""
    files: list[Path] = []
    ckpt = Path(checkpoint).resolve()
    if ckpt.parent.name == "checkpoints":
        eval_dir = ckpt.parent.parent / "eval"
        if eval_dir.is_dir():
            files += sorted(eval_dir.glob("*.json"))
    files += [Path(f) for f in extra or []]
    results: dict[str, float] = {}
    datasets: dict[str, str] = {}
    for f in files:
        try:
            result = json.loads(Path(f).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"Results file {f} is unreadable: {e}") from e
        if not isinstance(result, dict):
            raise CheckpointError(f"Results file {f} must hold a JSON object.")
        flat = flatten_results(result, str(f))
        results.update({k: round(v, 4) if isinstance(v, float) else v for k, v in flat.items()})
        if result.get("dataset"):
            datasets[result["protocol"]] = str(result["dataset"])
    return results, datasets


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    with_projector: bool = False,
    name: str | None = None,
    results_files: list[str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the weights folder of a training checkpoint; returns ``out_dir``.

    The backbone is always written with torchvision ResNet tensor names; ``with_projector``
    also keeps ``projector.*`` (needed only to continue SMI training). ``out_dir`` must be new,
    empty or an earlier weights folder; ``overwrite`` writes beside other files, replacing only
    the weights folder's own (``smi_hub.outputs``).
    """
    claim = claim_output_dir(out_dir, "weights", overwrite)
    try:
        return _export(checkpoint, claim, with_projector, name, results_files)
    finally:
        claim.release()


def _export(
    checkpoint: str | os.PathLike,
    claim: Claim,
    with_projector: bool,
    name: str | None,
    results_files: list[str | os.PathLike] | None,
) -> Path:
    state = read_checkpoint(checkpoint)
    try:
        model = SMIModel(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint}: model_config is not a valid SMIModel: {e}") from e
    model_state = {k.removeprefix("module."): v for k, v in state["model"].items()}
    load_state_dict_strict(model, model_state)
    training = training_summary(state)
    results, datasets = collect_results(checkpoint, results_files)
    if datasets:
        training["evaluation_datasets"] = datasets
    return save_weights_folder(
        model,
        claim.path,
        with_projector=with_projector,
        training=training,
        results=results,
        name=name or claim.path.name,
        claim=claim,
    )
