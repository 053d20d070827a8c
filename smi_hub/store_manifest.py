"""The feature store's on-disk format: shard file names, ``manifest.json`` and its checksum,
and the check of every manifest field against the shards (``FeatureStoreError``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smi_hub.errors import SMIHubError

FORMAT = "smi-hub-features"
FORMAT_VERSION = 2  # 2: the manifest records its own sha256 (manifest_sha256)
MANIFEST = "manifest.json"


class FeatureStoreError(SMIHubError, ValueError):
    """A feature store is missing, incomplete, corrupt, or cannot be written where asked."""


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard-{k:05d}.safetensors"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own ``manifest_sha256`` field."""
    return sha256_bytes(
        _dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}).encode()
    )


def _bad(path: Path, field: str, problem: str) -> FeatureStoreError:
    return FeatureStoreError(
        f"{path}: {field} {problem}; the manifest is damaged or was edited. Extract the store "
        "again (smi-hub extract INPUT -o FOLDER)."
    )


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def check_manifest(manifest: Any, folder: Path) -> None:
    """Check every field of a store's manifest, its own checksum, and each shard against it
    (file name, size, row count and shape, dtype from the shard's header): a manifest that
    disagrees with its shards would drop or misalign rows. Raises :class:`FeatureStoreError`
    naming the field."""
    path = folder / MANIFEST
    if not isinstance(manifest, dict):
        raise _bad(path, "the top level", f"is a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or not (_is_int(version, 1) and version <= FORMAT_VERSION):
        raise FeatureStoreError(
            f"{path} is not a feature store this smi-hub reads (format "
            f"{manifest.get('format')!r}, version {version!r}; this smi-hub reads version "
            f"{FORMAT_VERSION}). Extract the store again."
        )
    if version < FORMAT_VERSION or "manifest_sha256" not in manifest:
        raise _bad(path, "manifest_sha256", "is missing (a store written before format 2 has "
                   "no checksum of its manifest, so its paths and counts cannot be verified)")  # fmt: skip
    if manifest["manifest_sha256"] != manifest_checksum(manifest):
        raise _bad(path, "manifest_sha256", "differs from the manifest's content")
    types = {"shards": list, "paths": list, "failed": list, "row_shape": list, "dtype": str}
    for key, kind in types.items():
        if not isinstance(manifest.get(key), kind):
            raise _bad(path, key, f"is {manifest.get(key)!r}, not a {kind.__name__}")
    for key in ("model", "layer"):  # what extract_features records (a hand-made store may not)
        if not isinstance(manifest.get(key, ""), str):
            raise _bad(path, key, f"is {manifest[key]!r}, not a string")
    for key, low in (("inputs", 0), ("rows", 0), ("shard_size", 1)):
        if not _is_int(manifest.get(key), low):
            raise _bad(path, key, f"is {manifest.get(key)!r}, not an integer >= {low}")
    row_shape, rows, inputs = manifest["row_shape"], manifest["rows"], manifest["inputs"]
    if not all(_is_int(s, 1) for s in row_shape) or (rows and not row_shape):
        raise _bad(path, "row_shape", f"is {row_shape!r}, not a list of sizes >= 1")
    if manifest["dtype"] != "float32":
        raise _bad(path, "dtype", f"is {manifest['dtype']!r}; stores hold float32 features")
    if len(manifest["paths"]) != rows:
        raise _bad(path, "paths", f"lists {len(manifest['paths'])} inputs but rows is {rows}")
    if any(not isinstance(f, dict) or set(f) != {"path", "reason"} for f in manifest["failed"]):
        raise _bad(path, "failed", "holds an entry that is not {path, reason}")
    if rows + len(manifest["failed"]) != inputs:
        raise _bad(path, "inputs", f"is {inputs}, not rows ({rows}) + failed "
                   f"({len(manifest['failed'])})")  # fmt: skip
    shards, size = manifest["shards"], manifest["shard_size"]
    if len(shards) != -(-inputs // size):
        raise _bad(path, "shards", f"lists {len(shards)} shards; {inputs} inputs in shards of "
                   f"{size} make {-(-inputs // size)}")  # fmt: skip
    total = 0
    for k, s in enumerate(shards):
        field = f"shards[{k}]"
        want = {"file": str, "rows": int, "bytes": int, "sha256": str, "inputs": list}
        if not isinstance(s, dict) or any(not isinstance(s.get(f), t) for f, t in want.items()):
            raise _bad(path, field, f"is not an object with {', '.join(want)}")
        if s["file"] != shard_name(k):
            raise _bad(path, f"{field}.file", f"is {s['file']!r}; shard {k} must be "
                       f"{shard_name(k)!r} inside the store folder")  # fmt: skip
        if s["inputs"] != [k * size, min((k + 1) * size, inputs)]:
            raise _bad(path, f"{field}.inputs", f"is {s['inputs']!r}, not shard {k}'s positions")
        f = folder / s["file"]
        if f.is_symlink() or not f.is_file() or f.stat().st_size != s["bytes"]:
            raise FeatureStoreError(
                f"{f} is missing, a link or has the wrong size; the store is damaged: extract "
                "again."
            )
        _check_shard_header(f, s["rows"], row_shape, path, field)
        total += s["rows"]
    if total != rows:
        raise _bad(path, "rows", f"is {rows} but the shards hold {total} rows")


def _check_shard_header(f: Path, rows: int, row_shape: list[int], path: Path, field: str) -> None:
    """The shard's tensor shapes and dtypes (read from its safetensors header) agree with the
    manifest."""
    try:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if size < (1 << 24) else None
    except (OSError, ValueError) as e:
        raise FeatureStoreError(f"{f}: unreadable shard header ({e}); extract again.") from e
    feats = header.get("features") if isinstance(header, dict) else None
    index = header.get("input_index") if isinstance(header, dict) else None
    if not isinstance(feats, dict) or not isinstance(index, dict):
        raise FeatureStoreError(
            f"{f} is not a feature shard (no features/input_index); extract again."
        )
    if feats.get("dtype") != "F32":
        raise _bad(path, "dtype", f"is float32 but {f.name} holds {feats.get('dtype')}")
    shape = feats.get("shape")
    if shape != [rows, *row_shape] and not (rows == 0 and shape and shape[0] == 0):
        raise _bad(path, f"{field}.rows / row_shape", f"say {[rows, *row_shape]} but {f.name} "
                   f"holds {shape}")  # fmt: skip
    if index.get("shape") != [rows]:
        raise _bad(path, f"{field}.rows", f"is {rows} but {f.name} indexes {index.get('shape')}")
