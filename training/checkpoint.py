"""Training checkpoints: atomic writes, keep-last-k, safe loading (``weights_only=True``).

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

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "smi-hub-checkpoint"
VERSION = 1
LAST_NAME = "last.pt"
_CKPT_RE = re.compile(r"^checkpoint_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not an smi-hub training checkpoint."""


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
    fsync, rename), point ``last.pt`` at it (a copy written the same way), and delete all but
    the newest ``keep_last`` numbered checkpoints. Returns the checkpoint path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    path = directory / checkpoint_name(int(state["step"]))
    _atomic_save(state, path)
    last = directory / LAST_NAME
    tmp_link = directory / f".{LAST_NAME}.tmp"
    tmp_link.unlink(missing_ok=True)
    try:  # a hard link costs no space; fall back to a second atomic copy
        os.link(path, tmp_link)
        os.replace(tmp_link, last)
    except OSError:
        tmp_link.unlink(missing_ok=True)
        _atomic_save(state, last)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Numbered checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(directory: str | os.PathLike) -> Path | None:
    """The newest usable checkpoint in ``directory`` (``last.pt`` or the highest step)."""
    directory = Path(directory)
    candidates = list(reversed(list_checkpoints(directory)))
    last = directory / LAST_NAME
    if last.is_file():
        candidates.insert(0, last)
    return candidates[0] if candidates else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if path.is_dir():
        found = find_latest(path / "checkpoints") or find_latest(path)
        if found is None:
            raise CheckpointError(f"No checkpoint found in {path}.")
        path = found
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise CheckpointError(
            f"{path} could not be loaded as a safe (weights_only) checkpoint: {e}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an smi-hub training checkpoint (no format tag).")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state['version']}; this smi-hub reads up to "
            f"{VERSION}. Upgrade smi-hub."
        )
    return state
