"""SMILoss's memory-lean path (``training.losses._SMIFunction``, used by ``forward``) against
the readable formula differentiated by autograd (``SMILoss.reference_loss``): same loss, same
gradients, in float64 over shapes, parameters and degenerate inputs; gradcheck; dtypes,
autocast and what it saves for backward. Values against naive loops: tests/test_losses.py."""

from __future__ import annotations

import pytest
import torch

import training.losses as losses
from training.losses import SMILoss, _SMIFunction

KW = {"lambda_offdiag": 0.7, "diag_weight": 1.3, "eps": 1e-3, "std_eps": 1e-5}


def views(n: int, d: int, dtype=torch.float64, noise: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=dtype)
    return (
        base + noise * torch.randn(n, d, generator=g, dtype=dtype),
        base + noise * torch.randn(n, d, generator=g, dtype=dtype),
    )


def lean_and_reference(loss_fn: SMILoss, z_a: torch.Tensor, z_b: torch.Tensor):
    """(loss, grad_a, grad_b) of ``forward`` and of ``reference_loss`` on the same inputs."""
    out = []
    for fn in (loss_fn, loss_fn.reference_loss):
        a, b = z_a.detach().clone().requires_grad_(True), z_b.detach().clone().requires_grad_(True)
        loss = fn(a, b)
        out.append((loss.detach(), *torch.autograd.grad(loss, (a, b))))
    return out


def assert_same(lean, ref, rtol=1e-9, atol=1e-12):
    for x, y in zip(lean, ref, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture(params=["default_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    """Run with the default row blocks and with blocks of a few rows (uneven last block)."""
    if request.param == "small_blocks":
        monkeypatch.setattr(losses, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(losses, "_MIN_BLOCKS", 4)
    return request.param


@pytest.mark.parametrize("shape", [(2, 3), (6, 5), (9, 4), (3, 11), (17, 33), (40, 7)])
@pytest.mark.parametrize(
    "kw",
    [KW, {}, {"lambda_offdiag": 0.0, "diag_weight": 1.0, "eps": 0.5, "std_eps": 1e-8}],
    ids=["explicit", "defaults", "diag_only"],
)
def test_lean_equals_reference(blocks, shape, kw):
    z_a, z_b = views(*shape)
    assert_same(*lean_and_reference(SMILoss(**kw), z_a, z_b))


@pytest.mark.parametrize(
    "kind",
    [
        "identical_views",  # diagonal clamped: zero gradient from the diagonal
        "nearly_identical_views",
        "clamped_offdiag",  # duplicated images: off-diagonal pairs clamped too
        "constant_sample",
        "all_equal",
        "shifted_and_scaled",  # large per-sample means and scales
        "n2",
    ],
)
def test_lean_equals_reference_on_edge_cases(blocks, kind):
    z_a, z_b = views(8, 16)
    if kind == "identical_views":
        z_b = z_a.clone()
    elif kind == "nearly_identical_views":
        z_b = z_a + 1e-4 * torch.randn_like(z_a)
    elif kind == "clamped_offdiag":
        z_a[1], z_b[1], z_b[0] = z_a[0], z_a[0], z_a[0]
    elif kind == "constant_sample":
        z_a[2], z_b[2], z_b[5] = -1.0, -1.0, 3.0
    elif kind == "all_equal":
        z_a = z_b = torch.randn(1, 16, dtype=torch.float64).expand(8, 16).clone()
    elif kind == "shifted_and_scaled":
        z_a = z_a * torch.rand(8, 1, dtype=torch.float64) * 100 + 1e3
        z_b = z_b * 1e-3 - 5.0
    elif kind == "n2":
        z_a, z_b = views(2, 16)
    lean, ref = lean_and_reference(SMILoss(**KW), z_a, z_b)
    assert all(torch.isfinite(t).all() for t in lean)
    assert_same(lean, ref, rtol=1e-8, atol=1e-10)


def test_gradient_zero_where_clamped():
    """Identical views with the diagonal only: every pair is clamped, no gradient at all."""
    z = views(5, 32)[0]
    loss_fn = SMILoss(lambda_offdiag=0.0, diag_weight=1.0, eps=1e-3)
    (lean, ga, gb), _ = lean_and_reference(loss_fn, z, z)
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("shape", [(2, 3), (5, 4), (7, 6)])
def test_gradcheck_function(blocks, shape):
    z_a, z_b = (t.requires_grad_(True) for t in views(*shape))

    def fn(a, b):
        return _SMIFunction.apply(a, b, 0.7, 1.3, 1e-3, 1e-5)

    assert torch.autograd.gradcheck(fn, (z_a, z_b), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_works_in_a_larger_graph_and_with_one_input_requiring_grad():
    lin = torch.nn.Linear(6, 12, dtype=torch.float64)
    x_a, x_b = views(10, 6)
    loss_fn = SMILoss(**KW)
    loss = loss_fn(lin(x_a), lin(x_b))
    grads = torch.autograd.grad(loss, list(lin.parameters()))
    ref = torch.autograd.grad(loss_fn.reference_loss(lin(x_a), lin(x_b)), list(lin.parameters()))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)
    z_a, z_b = views(6, 9)
    z_a.requires_grad_(True)
    (g_a,) = torch.autograd.grad(loss_fn(z_a, z_b), z_a)
    (r_a,) = torch.autograd.grad(loss_fn.reference_loss(z_a, z_b), z_a)
    torch.testing.assert_close(g_a, r_a)
    with torch.no_grad():  # evaluation: no graph, same value
        assert float(loss_fn(z_a, z_b)) == pytest.approx(float(loss_fn.reference_loss(z_a, z_b)))


def test_double_backward_is_refused_with_a_clear_error():
    z_a, z_b = (t.requires_grad_(True) for t in views(5, 7))
    with pytest.raises(RuntimeError, match="double backward.*reference_loss"):
        torch.autograd.grad(SMILoss(**KW)(z_a, z_b), z_a, create_graph=True)
    (g_a,) = torch.autograd.grad(SMILoss(**KW).reference_loss(z_a, z_b), z_a, create_graph=True)
    assert g_a.requires_grad


def test_float32_bfloat16_and_autocast():
    z_a, z_b = views(12, 40, dtype=torch.float32)
    loss_fn = SMILoss(**KW)
    lean, ref = lean_and_reference(loss_fn, z_a, z_b)
    assert lean[0].dtype == torch.float32
    assert_same(lean, ref, rtol=1e-4, atol=1e-6)
    # bf16 projector outputs: computed in float32, gradients come back in bf16
    lean, ref = lean_and_reference(loss_fn, z_a.bfloat16(), z_b.bfloat16())
    assert lean[0].dtype == torch.float32 and lean[1].dtype == torch.bfloat16
    assert_same(lean, ref, rtol=2e-2, atol=1e-4)
    # inside autocast the loss still computes in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(z_a, z_b)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0].float(), rtol=1e-2, atol=1e-3)


def test_saves_no_n_by_d_tensor_but_the_inputs():
    """What autograd keeps between forward and backward: the inputs, N-vectors, N x N."""
    n, d = 8, 64
    z_a, z_b = (t.requires_grad_(True) for t in views(n, d))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = SMILoss(**KW)(z_a, z_b)
    big = [t for t in saved if t.numel() > n * n]
    assert {t.data_ptr() for t in big} <= {z_a.data_ptr(), z_b.data_ptr()}, [
        tuple(t.shape) for t in big
    ]
    loss.backward()
    assert torch.isfinite(z_a.grad).all() and torch.isfinite(z_b.grad).all()
