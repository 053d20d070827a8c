"""Out-of-domain signal: is a query's best match as close as gallery images usually are to
their own nearest neighbour?

At build time :func:`neighbour_profile` searches the index with up to :data:`PROFILE_QUERIES`
of its own vectors and keeps each one's top score over the *other* gallery rows (its own row
excluded), as 101 percentiles. At query time :func:`verdict` places the query's top score in
that distribution: ``in_domain`` is False when the score is below the gallery's
:data:`THRESHOLD_PERCENTILE`-th percentile, i.e. when the query is farther from the gallery than
99% of the gallery's own images are from their nearest neighbour. By construction about 1% of
in-domain queries are flagged (false alarms); what is caught out of domain is measured by
``benchmarks/ood_eval.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

PROFILE_QUERIES = 1000
THRESHOLD_PERCENTILE = 1.0
RULE = (
    f"in_domain is false when the query's top score is below the {THRESHOLD_PERCENTILE:g}st "
    "percentile of the gallery's own nearest-neighbour scores (own row excluded)"
)


class Verdict(NamedTuple):
    """``in_domain`` (None when the index has no profile) and the percentile (0-100) of the
    query's top score among the gallery's own nearest-neighbour scores."""

    in_domain: bool | None
    percentile: float | None


def neighbour_profile(index: Any, vectors: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """The distribution of gallery rows' top score over the other rows of ``index``.

    ``vectors`` are rows of the gallery (N x D) and ``ids`` their row numbers in ``index``;
    each is searched with k=2 and its best hit that is not its own row is kept. Empty dict for
    an index of fewer than two rows.
    """
    if len(index) < 2 or len(ids) == 0:
        return {}
    found = index.search(vectors, k=2)
    scores = []
    rows = zip(found.scores.tolist(), found.indices.tolist(), ids.tolist(), strict=True)
    for srow, irow, own in rows:
        other = [s for s, i in zip(srow, irow, strict=True) if i != own and i >= 0]
        if other:
            scores.append(other[0])
    if not scores:
        return {}
    table = np.percentile(np.asarray(scores, dtype=np.float64), np.arange(101))
    return {
        "queries": len(scores),
        "percentiles": [round(float(v), 6) for v in table],
        "threshold_percentile": THRESHOLD_PERCENTILE,
        "rule": RULE,
    }


def threshold_score(profile: dict[str, Any] | None) -> float | None:
    """The top score below which a query is out of domain (None without a profile)."""
    table = (profile or {}).get("percentiles")
    if not table:
        return None
    pct = float(profile.get("threshold_percentile", THRESHOLD_PERCENTILE))  # type: ignore[union-attr]
    return float(np.interp(pct, np.arange(len(table)), np.asarray(table, dtype=np.float64)))


def verdict(score: float, profile: dict[str, Any] | None) -> Verdict:
    """Where ``score`` (a query's top cosine score) falls in ``profile`` (from
    :func:`neighbour_profile`), and whether that is in the gallery's usual range."""
    table = (profile or {}).get("percentiles")
    score = float(score)
    if not table or not np.isfinite(score):
        return Verdict(None, None)
    xs = np.asarray(table, dtype=np.float64)
    # percentile rank: interpolated in the table, 0 below its minimum, 100 above its maximum
    pct = float(np.interp(score, xs, np.arange(len(xs)), left=0.0, right=100.0))
    return Verdict(bool(score >= threshold_score(profile)), round(pct, 2))
