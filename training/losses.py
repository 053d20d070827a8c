"""Self-supervised objectives with one interface: ``loss(z_a, z_b) -> scalar``.

``z_a`` and ``z_b`` are the projector outputs of two augmented views, N x D, row i of each
coming from the same image. Under torch.distributed the embeddings of all ranks are gathered
first (with gradients), so every loss equals the single-process loss on the global batch.
See docs/method.md for the formulas and their costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from training.distributed import gather_with_grad


def check_embeddings(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``z_a`` and ``z_b`` are equal-shape, finite, N x D with N >= 2."""
    if not (isinstance(z_a, torch.Tensor) and isinstance(z_b, torch.Tensor)):
        raise TypeError("z_a and z_b must be torch tensors (projector outputs of the two views).")
    if z_a.ndim != 2 or z_b.ndim != 2:
        raise ValueError(
            f"Embeddings must be 2-D (N x D), got shapes {tuple(z_a.shape)} and "
            f"{tuple(z_b.shape)}; flatten or pool feature maps before the loss."
        )
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"The two views' embeddings must have the same shape, got {tuple(z_a.shape)} and "
            f"{tuple(z_b.shape)}; pass the same images through both views."
        )
    if z_a.shape[0] < 2:
        raise ValueError(f"Need a batch of at least 2 samples, got N={z_a.shape[0]}.")
    if not (torch.isfinite(z_a).all() and torch.isfinite(z_b).all()):
        raise ValueError(
            "Embeddings contain NaN or Inf: the model has diverged (lower the learning rate, "
            "check the data) before the loss was computed."
        )


def off_diagonal_view(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square n x n matrix as an (n - 1) x n view (no copy)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:]


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    return off_diagonal_view(m).flatten()


# --- SMI forward + backward without N x D intermediates --------------------------------------
#
# Autograd on the readable formula (SMILoss.reference_loss) keeps the centred and standardized
# copies of both views for backward and creates their gradients: about 8 N D floats at the peak,
# which at N = 256, D = 8192 is four times the N x D input gradients that any loss must return.
# _SMIFunction keeps only the inputs (alive anyway), per-sample mean and 1/std (N-vectors) and
# the N x N correlation matrix, and rebuilds standardized rows a block at a time when needed.

# Rows of a standardized view materialized at once: enough rows that the row-block loops make
# a few large matmuls, few enough that a block stays a small fraction of the N x D gradients.
_BLOCK_BYTES = 1 << 20
_MIN_BLOCKS = 8


def _row_blocks(n: int, d: int, itemsize: int) -> Iterator[slice]:
    """Row slices covering ``range(n)``: about 1 MiB per block, at most ``_MIN_BLOCKS`` blocks
    more than needed (so a block is at most ~1/8 of an N x D tensor for large N)."""
    rows = max(1, _BLOCK_BYTES // (d * itemsize), -(-n // _MIN_BLOCKS))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _standardized(z: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, rows: slice):
    """Rows ``rows`` of the per-sample standardized ``z``: ``(z - mean) / std``."""
    return (z[rows] - mean[rows, None]).mul_(inv_std[rows, None])


def _gaussian_mi(r: torch.Tensor, eps: float) -> torch.Tensor:
    """``M = -1/2 log(1 - min(R^2, 1 - eps))``, elementwise (step 3 of SMILoss)."""
    return -0.5 * torch.log1p(-r.pow(2).clamp(max=1.0 - eps))


def _smi_from_m(m: torch.Tensor, lambda_offdiag: float, diag_weight: float) -> torch.Tensor:
    """``-diag_weight * mean(diag M) + lambda_offdiag * mean(offdiag M)`` (step 4 of SMILoss)."""
    return -diag_weight * m.diagonal().mean() + lambda_offdiag * off_diagonal_view(m).mean()


class _SMIFunction(torch.autograd.Function):
    """SMI loss of ``z_a, z_b`` (N x D, float32 or float64) with a hand-written backward.

    Same value and gradients as autograd on ``SMILoss.reference_loss``, with no N x D tensor
    saved for backward but the inputs and none created in backward but the two gradients it
    returns (plus one block of rows at a time). Double backward (``create_graph=True``) is not
    supported and raises: training differentiates the loss once.
    """

    @staticmethod
    def forward(ctx, z_a, z_b, lambda_offdiag, diag_weight, eps, std_eps):  # type: ignore[override]
        n, d = z_a.shape
        var_a, mean_a = torch.var_mean(z_a, dim=1, correction=0)
        var_b, mean_b = torch.var_mean(z_b, dim=1, correction=0)
        inv_a, inv_b = torch.rsqrt(var_a + std_eps), torch.rsqrt(var_b + std_eps)
        # R = a_std @ b_std.T / D, a standardized one block of rows at a time. The full b_std
        # lives only here, before the N x D gradients exist, so it does not raise the peak.
        b_std = _standardized(z_b, mean_b, inv_b, slice(None))
        r = z_a.new_empty(n, n)
        for rows in _row_blocks(n, d, z_a.element_size()):
            torch.mm(_standardized(z_a, mean_a, inv_a, rows), b_std.T, out=r[rows])
        del b_std
        r.div_(d)
        ctx.save_for_backward(z_a, z_b, mean_a, inv_a, mean_b, inv_b, r)
        ctx.weights = (lambda_offdiag, diag_weight, eps)
        m = r.pow(2).clamp_(max=1.0 - eps).neg_().log1p_().mul_(-0.5)  # _gaussian_mi, in place
        return _smi_from_m(m, lambda_offdiag, diag_weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if torch.is_grad_enabled():  # backward(create_graph=True): a graph of the gradient
            raise RuntimeError(
                "SMILoss's backward is hand-written and once differentiable: double backward "
                "(create_graph=True) is not supported. Use SMILoss.reference_loss(z_a, z_b), "
                "the same loss differentiated by autograd, for higher-order gradients."
            )
        z_a, z_b, mean_a, inv_a, mean_b, inv_b, r = ctx.saved_tensors
        lambda_offdiag, diag_weight, eps = ctx.weights
        n, d = z_a.shape
        itemsize = z_a.element_size()
        # G = dL/dR. dL/dM is -diag_weight / N on the diagonal and lambda / (N (N - 1)) off it;
        # dM/dR = R / (1 - R^2) where R^2 <= 1 - eps, 0 where the clamp is active (as torch's
        # clamp backward, the boundary itself passes the gradient). Built in place: one N x N.
        g = r.pow(2)
        clamped = g > 1.0 - eps
        torch.div(r, g.neg_().add_(1.0), out=g).masked_fill_(clamped, 0.0)
        del clamped
        g_diag = g.diagonal() * (-diag_weight / n)
        g.mul_(lambda_offdiag / (n * (n - 1))).diagonal().copy_(g_diag)
        g.mul_(grad_out / d)
        # Through R = a b^T / D (the 1/D is in g): dL/da = g @ b, dL/db = g^T @ a, summed over
        # row blocks of the standardized views (rank-block updates of the two N x D outputs).
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.zeros_like(z_a) if need_a else None
        grad_b = torch.zeros_like(z_b) if need_b else None
        for rows in _row_blocks(n, d, itemsize):
            if need_a:
                grad_a.addmm_(g[:, rows], _standardized(z_b, mean_b, inv_b, rows))
            if need_b:
                grad_b.addmm_(g[rows].T, _standardized(z_a, mean_a, inv_a, rows))
        # Through the standardization s = (z - mean) / sigma, sigma = sqrt(var + std_eps), per
        # row with h = dL/ds:  dL/dz = (h - mean(h) - s * mean(h * s)) / sigma.
        # (d sigma / dz = s / D, and the std_eps in sigma does not change this form.)
        # mean(h * s) needs no N x D work: for a, h = G b / D, so mean_k h_ik a_ik
        # = sum_j G_ij (a b^T)_ij / D^2 = sum_j g_ij R_ij: the row sums of g * R (for b, the
        # column sums). mean(h) is 0 up to rounding (the rows of b sum to 0); it is subtracted.
        gr = g.mul_(r)
        for grad, z, mean, inv, hs in (
            (grad_a, z_a, mean_a, inv_a, gr.sum(dim=1)),
            (grad_b, z_b, mean_b, inv_b, gr.sum(dim=0)),
        ):
            if grad is None:
                continue
            for rows in _row_blocks(n, d, itemsize):
                h = grad[rows]
                h.sub_(h.mean(dim=1, keepdim=True))
                h.addcmul_(_standardized(z, mean, inv, rows), hs[rows, None], value=-1.0)
                h.mul_(inv[rows, None])
        return grad_a, grad_b, None, None, None, None


class SMILoss(nn.Module):
    """Semantic Mutual Information loss on the N x N sample-level dependency matrix.

    1. standardize each sample across its D features (zero mean, unit variance);
    2. ``R = z_a_std @ z_b_std.T / D``: correlation of every pair of samples, in [-1, 1];
    3. ``M = -1/2 log(1 - R^2)``: Gaussian mutual information of each pair;
    4. ``loss = -diag_weight * mean(diag M) + lambda_offdiag * mean(offdiag M)``.

    ``forward`` computes this with ``_SMIFunction``, a hand-written backward that keeps no
    N x D intermediate (its extra memory is the two N x D input gradients plus a block of rows
    and a few N x N matrices); it supports one backward pass, not double backward.
    ``reference_loss`` is the same formula written plainly and differentiated by autograd.

    Args:
        lambda_offdiag: weight of the mean dependence between different images (minimized).
            8.0 by default: at 1.0 the positive term dominates and the projector output
            collapses to a few dimensions (effective rank ~3-20); see docs/method.md.
        diag_weight: weight of the mean dependence of the two views of one image (maximized).
        eps: ``R^2`` is clamped to at most ``1 - eps``: a positive pair stops pulling once its
            correlation exceeds ``sqrt(1 - eps)`` (0.95 for the default 0.1), the loss stays
            finite for identical views (at most ``-1/2 log(eps)`` per pair), and so do the
            gradients. Smaller values force near-identical views and lower the rank.
        std_eps: added to each sample's feature variance before the square root, so a constant
            embedding standardizes to zeros instead of NaN.
        gather: gather embeddings from all ranks under torch.distributed (global-batch loss).
    """

    def __init__(
        self,
        lambda_offdiag: float = 8.0,
        diag_weight: float = 1.0,
        eps: float = 0.1,
        std_eps: float = 1e-5,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}.")
        if std_eps <= 0:
            raise ValueError(f"std_eps must be positive, got {std_eps}.")
        self.lambda_offdiag = lambda_offdiag
        self.diag_weight = diag_weight
        self.eps = eps
        self.std_eps = std_eps
        self.gather = gather

    @staticmethod
    def standardize(z: torch.Tensor, std_eps: float) -> torch.Tensor:
        """Per-sample standardization across features (the transpose of Barlow Twins' BN)."""
        z = z - z.mean(dim=1, keepdim=True)
        return z / torch.sqrt(z.pow(2).mean(dim=1, keepdim=True) + std_eps)

    def dependency_matrix(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The N x N Gaussian mutual information matrix M (float32 or wider)."""
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        a = self.standardize(z_a.to(dtype), self.std_eps)
        b = self.standardize(z_b.to(dtype), self.std_eps)
        return _gaussian_mi(a @ b.T / a.shape[1], self.eps)

    def reference_loss(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The loss as the readable formula, differentiated by autograd (no gather).

        Same value and gradients as ``forward`` (tests compare them), but autograd keeps
        about 8 N x D floats alive at the backward peak where ``forward`` keeps the two
        N x D input gradients and a small block; also twice differentiable.
        """
        m = self.dependency_matrix(z_a, z_b)
        return _smi_from_m(m, self.lambda_offdiag, self.diag_weight)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The loss, through ``_SMIFunction``: computed in float32 (or float64 for float64
        inputs) whatever the autocast state; gradients in the inputs' dtype. Supports one
        backward pass, not double backward (use ``reference_loss`` for that)."""
        check_embeddings(z_a, z_b)
        if self.gather:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        device_type = z_a.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            return _SMIFunction.apply(
                z_a.to(dtype).contiguous(),
                z_b.to(dtype).contiguous(),
                self.lambda_offdiag,
                self.diag_weight,
                self.eps,
                self.std_eps,
            )


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (Zbontar et al., 2021) on the D x D feature cross-correlation matrix.

    ``C = bn(z_a).T @ bn(z_b) / N`` with per-feature batch standardization;
    ``loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    Args:
        lambd: weight of the redundancy-reduction (off-diagonal) term; 0.0051 as in the paper.
        bn_eps: added to each feature's batch variance before the square root.
        gather: gather embeddings from all ranks under torch.distributed (global-batch loss).
    """

    def __init__(self, lambd: float = 0.0051, bn_eps: float = 1e-5, gather: bool = True) -> None:
        super().__init__()
        self.lambd = lambd
        self.bn_eps = bn_eps
        self.gather = gather

    def batch_standardize(self, z: torch.Tensor) -> torch.Tensor:
        """Per-feature standardization over the batch (BatchNorm1d without affine)."""
        z = z - z.mean(dim=0, keepdim=True)
        return z / torch.sqrt(z.pow(2).mean(dim=0, keepdim=True) + self.bn_eps)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        check_embeddings(z_a, z_b)
        if self.gather:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        a = self.batch_standardize(z_a.to(dtype))
        b = self.batch_standardize(z_b.to(dtype))
        c = a.T @ b / a.shape[0]
        on_diag = (c.diagonal() - 1).pow(2).sum()
        return on_diag + self.lambd * off_diagonal(c).pow(2).sum()


class VICRegLoss(nn.Module):
    """VICReg (Bardes et al., 2022): invariance + variance + covariance terms.

    ``loss = sim_weight * mse(z_a, z_b) + var_weight * (v(z_a) + v(z_b)) / 2
    + cov_weight * (c(z_a) + c(z_b))`` with ``v(z) = mean_j relu(gamma - sqrt(var_j + eps))``
    and ``c(z) = sum_{i != j} Cov(z)_ij^2 / D``.

    Args:
        sim_weight, var_weight, cov_weight: term weights (25 / 25 / 1 as in the paper).
        gamma: target standard deviation of each feature.
        eps: added to the variance before the square root.
        gather: gather embeddings from all ranks under torch.distributed (global-batch loss).
    """

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.sim_weight = sim_weight
        self.var_weight = var_weight
        self.cov_weight = cov_weight
        self.gamma = gamma
        self.eps = eps
        self.gather = gather

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        check_embeddings(z_a, z_b)
        if self.gather:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        z_a, z_b = z_a.to(dtype), z_b.to(dtype)
        n, d = z_a.shape
        invariance = nn.functional.mse_loss(z_a, z_b)
        a = z_a - z_a.mean(dim=0)
        b = z_b - z_b.mean(dim=0)
        std_a = torch.sqrt(a.var(dim=0) + self.eps)
        std_b = torch.sqrt(b.var(dim=0) + self.eps)
        variance = (
            torch.relu(self.gamma - std_a).mean() + torch.relu(self.gamma - std_b).mean()
        ) / 2
        cov_a = a.T @ a / (n - 1)
        cov_b = b.T @ b / (n - 1)
        covariance = off_diagonal(cov_a).pow(2).sum() / d + off_diagonal(cov_b).pow(2).sum() / d
        return (
            self.sim_weight * invariance + self.var_weight * variance + self.cov_weight * covariance
        )


LOSSES: dict[str, type[nn.Module]] = {
    "smi": SMILoss,
    "barlow_twins": BarlowTwinsLoss,
    "vicreg": VICRegLoss,
}


def build_loss(name: str, **kwargs: float | bool) -> nn.Module:
    """Instantiate a loss by name (``smi``, ``barlow_twins``, ``vicreg``) with its keyword args."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
    cls = LOSSES[key]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"Bad arguments for loss {name!r}: {e}. See {cls.__name__}'s docstring."
        ) from e
