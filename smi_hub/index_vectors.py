"""Vectors going into and out of an index: as N x D float32 rows, checked finite,
L2-normalized; exact streamed top-k and recall@k, the reference approximate kinds are tuned
against."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from smi_hub.errors import NonFiniteError


def as_matrix(x: Any, name: str) -> torch.Tensor:
    """``x`` (a tensor, an array, a ``FeatureResult``; one vector or N) as N x D float32 on the
    CPU; spatial features are refused with the fix."""
    if hasattr(x, "features") and isinstance(x.features, torch.Tensor):
        x = x.features  # a FeatureResult
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be N x D vectors, got shape {tuple(x.shape)}; pool spatial features "
            "first (extract_features(..., layer='pooled'))."
        )
    return x.detach().to("cpu", torch.float32)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length: their inner products are cosine similarities."""
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def check_finite(
    x: torch.Tensor,
    name: str,
    offset: int = 0,
    zero: bool = False,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` (N x D) unless a row holds NaN or infinity (or, with ``zero``, is all zeros: no
    direction to compare); then :class:`~smi_hub.errors.NonFiniteError` naming the rows. Such
    a row would match every query (torch) or none (faiss), so it is refused where it enters.
    Rows are named as ``offset + position``, or ``ids[position]`` when given."""
    bad = ~torch.isfinite(x).all(dim=1)
    if zero:
        bad |= (x == 0).all(dim=1)
    if bool(bad.any()):
        found = bad.nonzero().flatten()
        rows = (found + offset if ids is None else ids[found]).tolist()
        shown = ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")
        what = "NaN, infinite or all-zero" if zero else "NaN or infinite"
        raise NonFiniteError(
            f"{len(rows)} of the {name} hold {what} values (rows {shown}); cosine search needs "
            "finite, non-zero vectors. Check the model's weights and the inputs that produced "
            "them (smi-hub extract refuses non-finite features)."
        )
    return x


def exact_topk(
    queries: torch.Tensor, chunks: Iterator[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of normalized ``queries`` over normalized row chunks, streamed."""
    best_s = torch.full((queries.shape[0], 0), -2.0)
    best_i = torch.empty((queries.shape[0], 0), dtype=torch.long)
    offset = 0
    for chunk in chunks:
        s = queries @ chunk.T
        kk = min(k, s.shape[1])
        top = torch.topk(s, kk, dim=1)
        best_s = torch.cat([best_s, top.values], dim=1)
        best_i = torch.cat([best_i, top.indices + offset], dim=1)
        keep = torch.topk(best_s, min(k, best_s.shape[1]), dim=1)
        best_s, best_i = keep.values, torch.gather(best_i, 1, keep.indices)
        offset += chunk.shape[0]
    return best_s, best_i


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of the exact top-k (``truth``, Q x k) found in ``found`` (Q x k)."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.numel()
