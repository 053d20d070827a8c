"""Collapse monitors for self-supervised embeddings.

- ``std``: mean per-dimension standard deviation of L2-normalized embeddings, times sqrt(D)
  (about 1 for well spread embeddings, 0 under complete collapse; Chen & He, 2021);
- ``effective_rank``: exp of the entropy of the normalized singular values (RankMe; Roy &
  Vetterli, 2007), between 1 (collapsed to a line) and min(N, D);
- ``alignment``: mean ||f(x) - f(x')||^2 of the two views' normalized embeddings (lower is
  better aligned; Wang & Isola, 2020);
- ``uniformity``: log mean exp(-2 ||f(x) - f(y)||^2) over distinct samples (lower is more
  uniform on the sphere; Wang & Isola, 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalized embeddings, scaled by sqrt(D)."""
    z = F.normalize(z.double(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(entropy of the singular-value distribution) of the centred embeddings."""
    z = z.double()
    z = z - z.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(z)
    if s.sum() <= eps:
        return 1.0
    p = s / s.sum()
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z_a: torch.Tensor, z_b: torch.Tensor) -> float:
    """Mean squared distance between the normalized embeddings of two views (alpha = 2)."""
    a, b = F.normalize(z_a.double(), dim=1), F.normalize(z_b.double(), dim=1)
    return float((a - b).pow(2).sum(dim=1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log mean exp(-t ||z_i - z_j||^2) over pairs i != j of normalized embeddings."""
    z = F.normalize(z.double(), dim=1)
    d2 = torch.pdist(z).pow(2)
    return float(torch.logsumexp(-t * d2, dim=0) - torch.log(torch.tensor(float(d2.numel()))))


def collapse_metrics(z_a: torch.Tensor, z_b: torch.Tensor) -> dict[str, float]:
    """All four monitors for paired embeddings (N x D each) of two views."""
    return {
        "std": embedding_std(z_a),
        "effective_rank": effective_rank(z_a),
        "alignment": alignment(z_a, z_b),
        "uniformity": uniformity(z_a),
    }
