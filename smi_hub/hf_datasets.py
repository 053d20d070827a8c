"""Features back into Hugging Face ``datasets``: an embeddings column aligned row by row."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smi_hub.errors import SMIHubError
from smi_hub.feature_store import FeatureStore
from smi_hub.features import FeatureResult, extract_features


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
        ds: a ``datasets.Dataset`` (map-style) with an image column.
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

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(
            f"add_embeddings needs a map-style datasets.Dataset, got {type(ds).__name__}; for a "
            "streaming dataset, extract to a store (extract_features(model, ds, out=...)) and "
            "load the rows you need."
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
