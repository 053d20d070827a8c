"""Batch feature extraction from folders, path lists, datasets and tensors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smi_hub.errors import ImageLoadError, NonFiniteError
from smi_hub.feature_sources import _batches, _collate, _Files, _source
from smi_hub.feature_store import DEFAULT_SHARD_SIZE, StoreWriter
from smi_hub.hub import load
from smi_hub.jpeg_decode import collate_encoded, device_decoder, extract_header
from smi_hub.plan import TIMED_BATCH, print_plan, seconds_per_image
from smi_hub.transforms import get_transforms

LAYERS = ("pooled", "spatial", "layer1", "layer2", "layer3", "layer4", "projector")


@dataclass
class FeatureResult:
    """Output of :func:`extract_features`.

    Attributes:
        features: N x C (``pooled`` / ``projector``) or N x C x h x w (spatial layers), float32,
            on the CPU, one row per successfully read input, in input order.
        paths: identifier of each row: the file path for files, else the sample index.
        failed: ``(path, reason)`` of every input that could not be read (skipped, or a NaN
            row with ``on_error="null"``).
        labels: N int64 labels when the dataset provided integer labels, the labels as a list
            when they are of another kind (e.g. strings; None for a row without one), else None.
        valid: with ``on_error="null"``, N booleans: False where the input could not be read
            (its ``features`` row is NaN); None otherwise (every row is valid).
    """

    features: torch.Tensor
    paths: list[Any] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    labels: torch.Tensor | list[Any] | None = None
    valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def column(self) -> list[Any]:
        """One entry per row for a ``datasets`` column: the row's vector (a float32 numpy
        array), or None where the input could not be read (``on_error="null"``), so
        ``ds.map(lambda b: {"emb": extract_features(m, b["path"], on_error="null").column()},
        batched=True)`` stays aligned with a null per failed row."""
        rows = list(self.features.numpy())
        if self.valid is None:
            return rows
        return [r if ok else None for r, ok in zip(rows, self.valid.tolist(), strict=True)]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    if layer == "pooled":
        return model.embed(x)
    if layer in ("spatial", "layer4"):
        return model.forward_features(x)
    if layer == "projector":
        return model(x)
    return model.forward_stages(x, layers=(layer,))[layer]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, sorted by name): the
    weights identity recorded in a feature store."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _warn_failed(failed: Sequence[tuple[Any, str]]) -> None:
    if failed:
        shown = "; ".join(reason for _, reason in failed[:3])
        more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
        warnings.warn(
            f"Skipped {len(failed)} unreadable input(s): {shown}{more}",
            RuntimeWarning,
            stacklevel=3,
        )


def extract_features(
    model: torch.nn.Module | str,
    images_or_dataset: Any,
    layer: str = "pooled",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    transform: Callable | None = None,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    npy: bool = False,
    on_error: str = "skip",
    overwrite: bool = False,
    decode: str = "auto",
) -> Any:
    """Features of many images with an ``SMIModel`` (or a name for :func:`smi_hub.load`).

    Args:
        model: an ``SMIModel`` or anything ``smi_hub.load`` accepts.
        images_or_dataset: a folder of images (searched recursively), one image path, a list
            file (``.txt``: one path per line, relative to the file's folder), a list of paths
            or PIL images, a Hugging Face ``datasets.Dataset`` (any ``with_format``) or
            streaming ``IterableDataset`` with an image column (a ``DatasetDict``: pick a
            split), a torch ``Dataset`` yielding images / tensors (or ``(image, label)``
            tuples), or a preprocessed tensor batch B x 3 x H x W.
        layer: ``pooled`` (global average pooled backbone features), ``spatial`` (= ``layer4``
            map), ``layer1`` ... ``layer4`` (spatial maps), or ``projector`` (SMI embedding).
        batch_size, num_workers: DataLoader settings (workers decode and preprocess images).
        device: where to run (default: where the model is). The model is moved there.
        channels_last: run in channels-last memory format (faster on many CPUs and GPUs).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); features are returned as float32.
        transform: preprocessing of PIL images (default ``get_transforms(model)``).
        progress: show a progress bar.
        out: write a sharded :class:`~smi_hub.FeatureStore` to this folder instead of keeping
            features in memory (memory bounded by one shard), resuming a killed run with the
            same arguments; under ``torch.distributed`` every rank computes its share of the
            shards. Returns the opened store.
        shard_size: inputs per shard (with ``out``).
        npy: with ``out``, also write ``features.npy`` (all rows) into the store folder.
        on_error: what an unreadable input gives: ``"skip"`` (default: no row; listed in
            ``failed``), ``"null"`` (a NaN row marked False in ``valid``, so rows stay aligned
            with the inputs; :meth:`FeatureResult.column` turns it into a null; in-memory
            only), or ``"raise"`` (an ``ImageLoadError`` naming the inputs, nothing returned).
        overwrite: with ``out``, write into a folder holding other files (only the store's
            own files are replaced; see ``smi_hub.outputs``); otherwise such a folder is
            refused.
        decode: where image files are decoded: ``"cpu"`` (in the DataLoader workers, with
            ``load_image``), ``"device"`` (workers read JPEG bytes; decoded and preprocessed on
            ``device``, nvjpeg on CUDA; other files on the CPU; see ``smi_hub.jpeg_decode``) or
            ``"auto"`` (default: ``device`` on CUDA for files with the default transform).

    Returns a :class:`FeatureResult` (``out=None``) or the :class:`~smi_hub.FeatureStore`.
    Unreadable files are skipped, listed in ``failed`` and reported with a warning.
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}.")
    model_name = str(model) if isinstance(model, str | os.PathLike) else type(model).__name__
    if isinstance(model, str | os.PathLike):
        model = load(model)
    if layer == "projector" and getattr(model, "projector", None) is None:
        raise ValueError(
            "layer='projector' needs a model with a projector; this weights folder holds only "
            "the backbone (export with --with-projector), or use layer='pooled'."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if on_error not in ("skip", "null", "raise"):
        raise ValueError(f"on_error must be 'skip', 'null' or 'raise', got {on_error!r}.")
    if on_error == "null" and out is not None:
        raise ValueError(
            "on_error='null' keeps NaN rows in memory; a store (out=) already keeps rows aligned "
            "(FeatureStore.input_index()): use on_error='skip' or 'raise' with out=."
        )
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    model.eval()
    tfm = transform or get_transforms(model)
    src = _source(images_or_dataset, tfm)
    files = src.data.paths if isinstance(src.data, _Files) else None
    decoder = device_decoder(files, tfm, device, decode)
    if decoder is not None:
        src.data = decoder.files

    writer = None
    block = 1 << 62
    select: Callable[[int], bool] = lambda k: True  # noqa: E731
    if out is not None:
        header = {
            "model": model_name,
            "weights_sha256": weights_digest(model),
            "layer": layer,
            "preprocessing": repr(tfm) if src.kind != "tensor" else "none (tensor input)",
            "amp_dtype": str(amp_dtype) if amp_dtype is not None else None,
            "channels_last": channels_last,
            **extract_header(decoder),
        }
        fingerprint = _sha256_text(
            json.dumps(
                {
                    **header,
                    "input": src.fingerprint(),
                    "shard_size": shard_size,
                    "batch": batch_size,
                },
                sort_keys=True,
            )
        )
        writer = StoreWriter(out, fingerprint, header, shard_size, overwrite)
        writer.prepare()
        block = shard_size
        todo: dict[int, bool] = {}

        def select(k: int) -> bool:
            if k not in todo:
                todo[k] = writer.owns(k) and not writer.done(k)
            return todo[k]

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    from tqdm.auto import tqdm

    total = None
    if src.n is not None:
        n_blocks = -(-src.n // block)
        total = sum(
            -(-(min((k + 1) * block, src.n) - k * block) // batch_size)
            for k in range(n_blocks)
            if select(k)
        )
    show = progress and (writer is None or writer.rank == 0)
    if show and writer is not None and total:  # a feature store: a long job, planned
        todo_images = min(total * batch_size, src.n or 0)
        print_plan(
            f"extract {layer} features of {todo_images:,} images ({total:,} batches of "
            f"{batch_size}) on {device} -> {out}",
            seconds_per_image(model, getattr(model, "image_size", 224), device, train=False)
            * todo_images,
            f"model compute of 1 timed batch of {TIMED_BATCH}; image decoding not included",
        )
    chunks: list[torch.Tensor] = []
    rows: list[int] = []
    labels: list[Any] = []
    failed: list[tuple[Any, str]] = []
    failed_rows: list[int] = []
    current = None

    def name(i: int) -> Any:
        return src.ids[i] if src.ids is not None else i

    def flush() -> None:
        assert writer is not None and current is not None
        feats = torch.cat(chunks) if chunks else torch.empty(0)
        writer.write_shard(
            current, feats, list(rows), list(labels), [name(i) for i in rows], list(failed)
        )
        for buffer in (chunks, rows, labels, failed, failed_rows):
            buffer.clear()

    try:
        with torch.inference_mode(), autocast:
            batches = _batches(
                src, block, select, batch_size, num_workers, device.type == "cuda",
                collate_encoded if decoder is not None else _collate,
            )  # fmt: skip
            if decoder is not None:
                batches = ((k, decoder(b)) for k, b in batches)
            for k, (x, idx, lab, bad) in tqdm(
                batches, total=total, desc=f"features ({layer})", unit="batch", disable=not show
            ):
                if writer is not None and current is not None and k != current:
                    flush()
                current = k
                if bad and on_error == "raise":
                    shown = "; ".join(reason for _, reason in bad[:3])
                    raise ImageLoadError(
                        f"{len(bad)} input(s) could not be read: {shown}. Fix or remove them, "
                        "or pass on_error='null' (aligned rows with NaN / null) or 'skip'."
                    )
                for i, reason in bad:
                    failed.append((name(i), reason))
                    failed_rows.append(i)
                if x is None:
                    continue
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                feats = _forward(model, x, layer).float().contiguous().cpu()
                chunks.append(_check_finite(feats, x, model, model_name, name(idx[0])))
                rows.extend(idx)
                labels.extend(lab)
            if writer is not None and current is not None:
                flush()
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)

    if writer is not None:
        assert src.n is not None
        if src.n == 0:
            writer.close()
            raise ValueError("The input holds no images.")
        store = writer.finish(src.n, npy=npy)
        if writer.rank == 0:
            _warn_failed(store.failed)
        return store
    _warn_failed(failed)
    empty = torch.empty(0, getattr(model, "num_features", 0))
    features = torch.cat(chunks) if chunks else empty
    valid = None
    if on_error == "null":
        n = len(rows) + len(failed_rows)
        full = torch.full((n, *features.shape[1:]), float("nan"))
        full[rows] = features
        valid = torch.zeros(n, dtype=torch.bool)
        valid[rows] = True
        labels_by_row = dict(zip(rows, labels, strict=True))
        features, labels, rows = full, [labels_by_row.get(i) for i in range(n)], list(range(n))
    label_out: torch.Tensor | list[Any] | None = None
    if labels and all(isinstance(v, int) for v in labels):
        label_out = torch.tensor(labels, dtype=torch.long)
    elif any(v is not None for v in labels):
        label_out = list(labels)  # strings (or mixed): kept as given, not dropped
    paths = [name(i) for i in rows]
    return FeatureResult(
        features=features, paths=paths, failed=failed, labels=label_out, valid=valid
    )


def _check_finite(
    feats: torch.Tensor, x: torch.Tensor, model: torch.nn.Module, model_name: str, first: Any
) -> torch.Tensor:
    """``feats`` unless they hold NaN or infinity: then :class:`NonFiniteError` naming the
    cause (the input batch, the model's non-finite weight tensors, or overflow), before any
    such row reaches a store or an index."""
    if bool(torch.isfinite(feats).all()):
        return feats
    where = f"{model_name} gave NaN or infinite features for the batch starting at {first!r}"
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{where}: the input tensors hold NaN or infinity; fix the input.")
    bad = [
        n
        for n, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise NonFiniteError(
            f"{where}: its weights hold NaN or infinite values ({len(bad)} tensor(s): {shown}). "
            "The weights are damaged or training diverged; use other weights (re-export the "
            "last good checkpoint)."
        )
    raise NonFiniteError(
        f"{where}, though its weights are finite: the activations overflowed; run without "
        "--bf16 / amp_dtype, or check the model."
    )
