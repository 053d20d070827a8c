"""Features back into Hugging Face ``datasets``: an embeddings column aligned row by row."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smi_hub.errors import SMIHubError
from smi_hub.feature_sources import _hf_image_key
from smi_hub.feature_store import FeatureStore
from smi_hub.features import FeatureResult, extract_features
from smi_hub.hub import load


def add_embeddings(
    ds: Any,
    source: Any,
    column: str = "embeddings",
    normalize: bool = True,
    drop_missing: bool = False,
    **extract_kwargs: Any,
) -> Any:
    """``ds`` with a ``column`` of feature vectors (``float32`` lists of fixed length).

    Args:
        ds: a ``datasets.Dataset`` (map-style) with an image column; a ``DatasetDict`` (each
            split gets its column; ``source`` a model, or a dict of one source per split); or
            a streaming ``IterableDataset`` (``source`` a model: the column is computed
            lazily, batch by batch, as the stream is read; ``drop_missing`` drops the rows
            whose image could not be read as they stream by).
        source: a :class:`~smi_hub.FeatureStore` or ``FeatureResult`` extracted from ``ds``
            (same rows, same order), or a model / model name to extract them now
            (``extract_kwargs`` go to :func:`~smi_hub.extract_features`; ``out=`` streams
            them through a store).
        column: name of the new column.
        normalize: L2-normalize the vectors, so that ``add_faiss_index(column)``'s default L2
            distance ranks neighbours by cosine similarity, as ``EmbeddingIndex`` does.
        drop_missing: drop the rows whose image could not be read. By default they stay,
            with a null (``None``) embedding: never a shifted row.

    ``ds.add_faiss_index(column)`` needs a vector in every row (datasets' faiss index cannot
    hold nulls): call it on ``add_embeddings(..., drop_missing=True)``, or filter first with
    ``ds.filter(lambda r: r[column] is not None)``.
    """
    import datasets
    import pyarrow as pa

    if isinstance(ds, datasets.DatasetDict):
        sources = source if isinstance(source, dict) else dict.fromkeys(ds, source)
        if isinstance(source, FeatureStore | FeatureResult) or set(sources) != set(ds):
            raise SMIHubError(
                f"A DatasetDict (splits {sorted(ds)}) needs a model (extracted per split) or a "
                f"dict of one FeatureStore / FeatureResult per split, with keys {sorted(ds)}."
            )
        if isinstance(source, str | torch.nn.Module):
            model = load(source) if isinstance(source, str) else source
            sources = dict.fromkeys(ds, model)
        return datasets.DatasetDict(
            {
                split: add_embeddings(
                    part, sources[split], column, normalize, drop_missing, **extract_kwargs
                )
                for split, part in ds.items()
            }
        )
    if isinstance(ds, datasets.IterableDataset):
        return _add_embeddings_stream(ds, source, column, normalize, drop_missing, extract_kwargs)
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(
            "add_embeddings needs a datasets.Dataset, DatasetDict or IterableDataset, got "
            f"{type(ds).__name__}."
        )
    if column in ds.column_names:
        raise SMIHubError(f"The dataset already has a column {column!r}; choose another name.")
    if not isinstance(source, FeatureStore | FeatureResult):
        source = extract_features(source, ds, **extract_kwargs)
    if isinstance(source, FeatureStore):
        n_inputs = source.num_inputs
        rows = source.input_index()
        features = source.to_tensor()
    else:
        rows = torch.as_tensor(source.paths, dtype=torch.long)
        features = source.features
        n_inputs = len(source) + len(source.failed)
    if n_inputs != len(ds):
        raise SMIHubError(
            f"The features cover {n_inputs} inputs but the dataset has {len(ds)} rows; extract "
            "them from this dataset (same rows, same order)."
        )
    if features.ndim != 2:
        raise SMIHubError(
            f"Embeddings must be vectors; these are {tuple(features.shape[1:])} maps (extract "
            "with layer='pooled')."
        )
    if normalize:
        features = torch.nn.functional.normalize(features.float(), dim=1, eps=1e-12)
    dim = features.shape[1]
    full = np.zeros((len(ds), dim), dtype=np.float32)
    full[rows.numpy()] = features.numpy()
    missing = np.ones(len(ds), dtype=bool)
    missing[rows.numpy()] = False
    values = pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1)), dim, mask=pa.array(missing)
    )
    feature = datasets.Sequence(datasets.Value("float32"), length=dim)
    out = ds.add_column(column, values, feature=feature)
    if drop_missing and missing.any():
        out = out.select(np.flatnonzero(~missing))
    return out


def _add_embeddings_stream(
    ds: Any,
    source: Any,
    column: str,
    normalize: bool,
    drop_missing: bool,
    extract_kwargs: dict[str, Any],
) -> Any:
    """``add_embeddings`` of a streaming ``IterableDataset``: a lazy ``map`` that extracts
    each batch's images (a null where an image cannot be read)."""

    if isinstance(source, FeatureStore | FeatureResult):
        raise SMIHubError(
            "A streaming IterableDataset gets its embeddings computed as it is read: pass a "
            "model (or model name) as source, not precomputed features."
        )
    if extract_kwargs.get("out") is not None:
        raise SMIHubError("out= does not apply to a streaming add_embeddings (nothing is stored).")
    if column in (ds.column_names or ()):
        raise SMIHubError(f"The dataset already has a column {column!r}; choose another name.")
    model = load(source) if isinstance(source, str) else source
    key = _hf_image_key(ds) or "image"
    kwargs = {"progress": False, **extract_kwargs, "on_error": "null"}
    batch_size = int(kwargs.get("batch_size", 64))

    def embed(batch: dict[str, list]) -> dict[str, list]:
        result = extract_features(model, list(batch[key]), **kwargs)
        features = result.features
        if normalize:
            features = torch.nn.functional.normalize(features.float(), dim=1, eps=1e-12)
        return {column: FeatureResult(features, valid=result.valid).column()}

    out = ds.map(embed, batched=True, batch_size=batch_size)
    if drop_missing:
        out = out.filter(lambda row: row[column] is not None)
    return out
