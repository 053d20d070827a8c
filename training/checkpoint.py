"""Training checkpoints: atomic writes, SHA-256 sidecars, keep-last-k, verified and safe
loading (``weights_only=True``).

A checkpoint is a dict of plain types and tensors (loadable with
``torch.load(path, weights_only=True)``)::

    format: "smi-hub-checkpoint", version: 1,
    model: SMIModel state_dict (no "module." prefix), model_config: SMIModel.config,
    optimizer, scheduler, scaler, epoch, step, step_in_epoch, rng, config

``epoch`` is the epoch in progress and ``step_in_epoch`` the optimizer steps already done in
it (an end-of-epoch checkpoint has ``epoch + 1`` and ``step_in_epoch = 0``); ``step`` is the
global optimizer step count.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smi_hub.errors import CheckpointError, refused_global
from smi_hub.export import sidecar_path, verify_checkpoint
from smi_hub.fileio import atomic_write, atomic_write_text, fsync_dir, sha256_file

log = logging.getLogger(__name__)
FORMAT = "smi-hub-checkpoint"
VERSION = 1
LAST_NAME = "last.pt"
_CKPT_RE = re.compile(r"^checkpoint_(\d{8,})\.pt$")
_TMP_RE = re.compile(r"^\.(checkpoint_\d{8,}\.pt|last\.pt)(\.sha256)?\..*tmp$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}.pt"


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    state: dict[str, Any], directory: str | os.PathLike, keep_last: int = 3
) -> Path:
    """Write ``state`` to ``directory/checkpoint_<step:08d>.pt`` atomically (temporary file,
    fsync, rename) with a ``.sha256`` sidecar, point ``last.pt`` at it (a hard link, or a copy
    written the same way, with its own sidecar), and delete all but the newest ``keep_last``
    numbered checkpoints. Returns the checkpoint path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():  # temporaries of a run killed while writing
        if _TMP_RE.match(stale.name):
            stale.unlink(missing_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    path = directory / checkpoint_name(int(state["step"]))
    digest = ""

    def write(tmp: Path) -> None:
        nonlocal digest
        torch.save(state, tmp)
        digest = file_sha256(tmp)

    atomic_write(path, write)
    _write_sidecar(path, digest)
    last = directory / LAST_NAME
    tmp_link = directory / f".{LAST_NAME}.link.tmp"
    tmp_link.unlink(missing_ok=True)
    try:  # a hard link costs no space; fall back to a copy
        os.link(path, tmp_link)
        os.replace(tmp_link, last)
        fsync_dir(directory)
    except OSError:
        tmp_link.unlink(missing_ok=True)
        atomic_write(last, lambda tmp: shutil.copyfile(path, tmp))
    _write_sidecar(last, digest)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
        sidecar_path(old).unlink(missing_ok=True)
    return path


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    *,
    epoch: int,
    step: int,
    step_in_epoch: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """What every training checkpoint holds to resume exactly (weights and ``model.config``,
    optimizer, schedule, grad-scaler and RNG states, the position, the run's config); a run
    adds its own keys. :func:`restore_training_state` reads it back."""
    return {
        "model": model.state_dict(),
        "model_config": model.config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "step_in_epoch": step_in_epoch,
        "rng": rng_state(),
        "config": config,
    }


def restore_training_state(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[int, int, int]:
    """Load a :func:`training_state` into the run's objects and the RNGs; returns (epoch,
    step, step in the epoch) to go on from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"]), int(state.get("step_in_epoch", 0))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    return sha256_file(path)


def _write_sidecar(path: Path, digest: str) -> None:
    atomic_write_text(sidecar_path(path), f"{digest}  {path.name}\n")  # `sha256sum -c` format


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Numbered checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(directory: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint in ``directory`` (``last.pt``, then the numbered ones from
    the highest step down), or None if there is none at all.

    Damaged ones (see :func:`verify_checkpoint`) are skipped with a warning; if every one is
    damaged, raises :class:`CheckpointError` listing what is wrong with each.
    """
    directory = Path(directory)
    candidates = list(reversed(list_checkpoints(directory)))
    last = directory / LAST_NAME
    if last.is_file():
        candidates.insert(0, last)
    problems: list[str] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("Skipping damaged checkpoints: %s Using %s.", " ".join(problems), path)
        return path
    if problems:
        raise CheckpointError(
            f"No intact checkpoint in {directory}: {' '.join(problems)} Restore a checkpoint "
            "from a backup, or start a new run in another output_dir."
        )
    return None


def resolve_resume(
    resume: str,
    ckpt_dir: Path,
    *,
    error: type[Exception],
    new_run_hint: str,
    accept_folder: bool = False,
) -> Path | None:
    """The checkpoint a run's ``--resume`` names: ``none``, a new run (None; ``error`` if
    ``ckpt_dir`` already holds checkpoints, ending with ``new_run_hint``), ``auto`` (the newest
    intact one in ``ckpt_dir``, None if there is none) or a checkpoint file (or a run folder,
    with ``accept_folder``: :func:`load_checkpoint` then takes its newest)."""
    if resume == "none":
        if list_checkpoints(ckpt_dir) or (ckpt_dir / LAST_NAME).exists():
            raise error(
                f"{ckpt_dir} already holds checkpoints; pass --resume auto to continue that run "
                f"or {new_run_hint}"
            )
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    path = Path(resume)
    if not (path.exists() if accept_folder else path.is_file()):
        raise error(f"--resume {resume}: no such checkpoint.")
    return path


def _load_error(path: Path, e: Exception) -> CheckpointError:
    """A loading failure explained without relaying torch's advice to unpickle."""
    refused = refused_global(e)
    if refused:
        return CheckpointError(
            f"{path} contains non-tensor Python objects ({refused}) and is refused for "
            "safety: smi-hub loads checkpoints with torch.load(weights_only=True) and never "
            "unpickles arbitrary objects."
        )
    return CheckpointError(
        f"{path} could not be read as a safe (weights_only) checkpoint ({type(e).__name__}); "
        "it is truncated, corrupted or not a torch checkpoint."
    )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Verify (:func:`verify_checkpoint`), then load a training checkpoint safely
    (``weights_only=True``) and check its format. A folder means its newest intact one."""
    path = Path(path)
    if path.is_dir():
        found = find_latest(path / "checkpoints") or find_latest(path)
        if found is None:
            raise CheckpointError(f"No checkpoint found in {path}.")
        path = found
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the safe unpickler raises many types on foreign or broken files
        raise _load_error(path, e) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an smi-hub training checkpoint (no format tag).")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state['version']}; this smi-hub reads up to "
            f"{VERSION}. Upgrade smi-hub."
        )
    return state
