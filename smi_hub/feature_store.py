"""Sharded, resumable on-disk feature store: the one format extracted features are kept in.

A store is a folder of safetensors shards plus ``manifest.json``, written last::

    OUT/shard-00000.safetensors   features of inputs [0, shard_size) that could be read,
    OUT/shard-00001.safetensors   ... (tensors ``features``, ``input_index``, maybe ``labels``)
    OUT/manifest.json             paths in input order, failed inputs with reasons, model name,
                                  weights digest, layer, preprocessing, rows + sha256 per shard

Shard ``k`` always holds input positions ``[k * shard_size, (k + 1) * shard_size)``, so the
store does not depend on how many processes wrote it or how often the run was restarted.
While a run is in progress, finished shards and a sidecar record per shard live in a sibling
work folder ``.OUT.partial``; a re-run with the same arguments resumes there. The finished
store replaces ``OUT`` as a whole (``smi_hub.fileio.atomic_folder``): readers see the old
store or the new one, never a mix, and no file of an earlier output is left beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from smi_hub.fileio import atomic_write_bytes, atomic_write_text, recover_folder
from smi_hub.outputs import Claim, claim_output_dir, commit_folder, resolve_output
from smi_hub.store_manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    FeatureStoreError,
    _dumps,
    check_manifest,
    manifest_checksum,
    sha256_bytes,
    shard_name,
)

FINGERPRINT = "fingerprint.json"
DEFAULT_SHARD_SIZE = 65536


def work_folder(out: str | os.PathLike) -> Path:
    """The sibling folder an unfinished run of ``out`` keeps its shards in."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


class FeatureStore:
    """Reader of a finished store. Open with :meth:`FeatureStore.open`.

    The manifest is read and every shard's presence and size checked on open; a shard's sha256
    is checked each time the shard is read (``verify=False`` skips that), so a flipped byte
    raises :class:`FeatureStoreError` instead of returning wrong features.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], verify: bool = True) -> None:
        self.folder = folder
        self.manifest = manifest
        self.verify = verify
        rows = [int(s["rows"]) for s in manifest["shards"]]
        self.offsets = [0]
        for r in rows:
            self.offsets.append(self.offsets[-1] + r)

    @classmethod
    def open(cls, folder: str | os.PathLike, verify: bool = True) -> FeatureStore:
        """Open the store in ``folder`` (written by ``smi-hub extract`` or
        ``extract_features(..., out=folder)``)."""
        folder = Path(folder)
        with contextlib.suppress(OSError):  # a swap killed between its renames
            recover_folder(folder)
        path = folder / MANIFEST
        if not path.is_file():
            hint = (
                " An unfinished run is in progress or was killed: re-run the same command to "
                "resume it."
                if work_folder(folder).is_dir()
                else " Write one with `smi-hub extract INPUT -o FOLDER`."
            )
            raise FeatureStoreError(f"{folder} is not a feature store (no {MANIFEST}).{hint}")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"{path}: unreadable manifest ({e}).") from e
        check_manifest(manifest, folder)
        return cls(folder, manifest, verify=verify)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.folder)!r}, rows={len(self)}, row_shape="
            f"{tuple(self.row_shape)}, shards={self.num_shards})"
        )

    @property
    def paths(self) -> list[Any]:
        """Identifier of each row in input order: the file path, or the dataset sample index."""
        return self.manifest["paths"]

    @property
    def failed(self) -> list[tuple[Any, str]]:
        """``(path, reason)`` of every input that could not be read (no row for it)."""
        return [(f["path"], f["reason"]) for f in self.manifest["failed"]]

    @property
    def num_inputs(self) -> int:
        """Number of inputs (rows + failed)."""
        return int(self.manifest["inputs"])

    @property
    def row_shape(self) -> list[int]:
        """Shape of one row: ``[C]`` for pooled features, ``[C, h, w]`` for spatial maps."""
        return list(self.manifest["row_shape"])

    @property
    def dim(self) -> int:
        """Length of one flattened row."""
        n = 1
        for s in self.row_shape:
            n *= s
        return n

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``k``: ``features``, ``input_index`` (input position of each row)
        and ``labels`` when the input had integer labels; sha256-checked."""
        info = self.manifest["shards"][k]
        path = self.folder / info["file"]
        data = path.read_bytes()
        if self.verify and sha256_bytes(data) != info["sha256"]:
            raise FeatureStoreError(
                f"{path}: sha256 differs from the manifest's; the shard was modified or "
                "damaged. Extract again."
            )
        return load_safetensors(data)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Features shard by shard (each ``rows x row_shape``), in input order."""
        for k in range(self.num_shards):
            yield self.shard(k)["features"]

    def read(self, start: int, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (Python slice semantics for non-negative bounds)."""
        n = len(self)
        stop = n if stop is None else min(stop, n)
        if start < 0 or stop < 0:
            raise IndexError("FeatureStore.read takes non-negative bounds.")
        parts = []
        for k in range(self.num_shards):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if hi <= start or lo >= stop or hi == lo:
                continue
            feats = self.shard(k)["features"]
            parts.append(feats[max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return torch.empty(0, *self.row_shape)
        return torch.cat(parts)

    def to_tensor(self) -> torch.Tensor:
        """All rows in one tensor (only when it fits in memory: ``len * dim * 4`` bytes)."""
        return self.read(0, len(self))

    def input_index(self) -> torch.Tensor:
        """Input position of every row (int64), in row order."""
        parts = [self.shard(k)["input_index"] for k in range(self.num_shards)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def labels(self) -> torch.Tensor | None:
        """Integer labels of the rows when every shard has them, else None."""
        parts = []
        for k in range(self.num_shards):
            t = self.shard(k)
            if t["features"].shape[0] == 0:
                continue
            if "labels" not in t:
                return None
            parts.append(t["labels"])
        return torch.cat(parts) if parts else None


class StoreWriter:
    """Writes one store: shards into the work folder, then the manifest and the swap.

    Used by ``extract_features(..., out=...)``; with torch.distributed initialized each rank
    writes the shards it is given and rank 0 writes the manifest after a barrier.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        fingerprint: str,
        header: dict[str, Any],
        shard_size: int,
        overwrite: bool = False,
    ) -> None:
        if shard_size < 1:
            raise FeatureStoreError(f"shard_size must be >= 1, got {shard_size}.")
        self.out = resolve_output(out)
        self.overwrite = overwrite
        self.claim: Claim | None = None
        self.work = work_folder(self.out)
        self.fingerprint = fingerprint
        self.header = header
        self.shard_size = shard_size
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Release the output folder's lock (idempotent)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def prepare(self) -> None:
        """Check and lock the output (``smi_hub.outputs``), create the work folder; a work
        folder of other arguments is discarded with a warning (fresh start)."""
        if self.rank == 0:
            self.claim = claim_output_dir(self.out, "features", self.overwrite)
            record = self.work / FINGERPRINT
            if self.work.is_dir():
                try:
                    old = json.loads(record.read_text())["fingerprint"]
                except (OSError, ValueError, KeyError):
                    old = None
                if old != self.fingerprint:
                    warnings.warn(
                        f"{self.work} holds an unfinished run with other arguments or input; "
                        "starting over.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    shutil.rmtree(self.work)
            try:
                self.work.mkdir(parents=True, exist_ok=True)
                if not record.is_file():
                    atomic_write_text(record, _dumps({"fingerprint": self.fingerprint}))
            except OSError as e:
                self.close()
                raise FeatureStoreError(
                    f"Cannot write next to {self.out} ({e}); choose a writable output folder."
                ) from e
        self._barrier()

    def owns(self, k: int) -> bool:
        """Whether this rank computes shard ``k`` (shards are dealt round-robin)."""
        return k % self.world == self.rank

    def done(self, k: int) -> bool:
        """Whether shard ``k`` was finished by an earlier (killed) run with these arguments."""
        side = self.work / f"{shard_name(k)}.json"
        shard = self.work / shard_name(k)
        if not side.is_file() or not shard.is_file():
            return False
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            return False
        return info.get("fingerprint") == self.fingerprint and info.get("sha256") == sha256_bytes(
            shard.read_bytes()
        )

    def write_shard(
        self,
        k: int,
        features: torch.Tensor,
        input_index: list[int],
        labels: list[int | None],
        paths: list[Any],
        failed: list[tuple[Any, str]],
    ) -> None:
        """Write shard ``k`` then its sidecar record (which marks it finished)."""
        tensors = {
            "features": features.contiguous(),
            "input_index": torch.tensor(input_index, dtype=torch.long),
        }
        if labels and all(isinstance(v, int) for v in labels):
            tensors["labels"] = torch.tensor(labels, dtype=torch.long)
        data = save_safetensors(tensors)
        try:
            atomic_write_bytes(self.work / shard_name(k), data)
        except OSError as e:
            raise FeatureStoreError(
                f"Writing shard {k} into {self.work} failed ({e.strerror or e}); the finished "
                "shards are kept there: free space and re-run the same command to resume."
            ) from e
        side = {
            "fingerprint": self.fingerprint,
            "file": shard_name(k),
            "rows": int(features.shape[0]),
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "row_shape": list(features.shape[1:]),
            "paths": paths,
            "failed": [{"path": p, "reason": r} for p, r in failed],
        }
        atomic_write_text(self.work / f"{shard_name(k)}.json", _dumps(side))

    def finish(self, num_inputs: int, npy: bool = False) -> FeatureStore:
        """After all ranks wrote their shards: rank 0 writes the manifest and swaps the store
        into place (with ``features.npy`` when ``npy``); every rank returns the store."""
        self._barrier()
        try:
            if self.rank == 0:
                self._assemble(num_inputs, npy)
        finally:
            self.close()
        self._barrier()
        return FeatureStore.open(self.out)

    def _assemble(self, num_inputs: int, npy: bool) -> None:
        n_shards = -(-num_inputs // self.shard_size)
        shards, paths, failed = [], [], []
        row_shape = None
        for k in range(n_shards):
            side = self.work / f"{shard_name(k)}.json"
            if not side.is_file() or not (self.work / shard_name(k)).is_file():
                raise FeatureStoreError(
                    f"Shard {k} of {self.out} was not written (a process failed?); re-run the "
                    "same command to finish it."
                )
            info = json.loads(side.read_text())
            if info["rows"]:
                if row_shape is not None and info["row_shape"] != row_shape:
                    raise FeatureStoreError(f"Shard {k} has rows of another shape; extract again.")
                row_shape = info["row_shape"]
            start = k * self.shard_size
            shards.append(
                {
                    "file": info["file"],
                    "rows": info["rows"],
                    "bytes": info["bytes"],
                    "sha256": info["sha256"],
                    "inputs": [start, min(start + self.shard_size, num_inputs)],
                }
            )
            paths.extend(info["paths"])
            failed.extend(info["failed"])
        manifest = {
            **self.header,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "shard_size": self.shard_size,
            "inputs": num_inputs,
            "rows": len(paths),
            "row_shape": row_shape if row_shape is not None else self.header.get("row_shape", []),
            "dtype": "float32",
            "shards": shards,
            "paths": paths,
            "failed": failed,
        }
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        assert self.claim is not None
        try:
            with commit_folder(self.claim) as tmp:
                for s in shards:  # linked, not moved: a failed commit keeps them for a re-run
                    _link_or_copy(self.work / s["file"], tmp / s["file"])
                (tmp / MANIFEST).write_text(_dumps(manifest))
                if npy:
                    _write_npy(FeatureStore(tmp, manifest), tmp / "features.npy")
        except OSError as e:
            raise FeatureStoreError(
                f"Writing the feature store {self.out} failed ({e.strerror or e}); the "
                f"finished shards are kept in {self.work}: free space (or fix the cause) and "
                "re-run the same command to finish without recomputing them."
            ) from e
        shutil.rmtree(self.work, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (copy where the file system has no hard links)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_npy(store: FeatureStore, path: Path) -> None:
    """``features.npy`` of a store, written shard by shard (bounded memory)."""
    import numpy as np

    # plain writes, not a memory map: a full disk then raises OSError instead of SIGBUS
    header = {"descr": "<f4", "fortran_order": False, "shape": (len(store), *store.row_shape)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for k in range(store.num_shards):
            if store.offsets[k + 1] > store.offsets[k]:
                f.write(store.shard(k)["features"].numpy().astype("<f4", copy=False).tobytes())
