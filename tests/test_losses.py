"""SMI, Barlow Twins and VICReg losses against naive float64 loop implementations of their
formulas, gradcheck, invariances, collapse and identical-view edge cases, input validation and
``build_loss``. Value tests pass every keyword explicitly so they do not depend on defaults.

The 2-process gathered loss and gradient are tested in tests/test_train_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    BarlowTwinsLoss,
    SMILoss,
    VICRegLoss,
    build_loss,
    off_diagonal,
)

N, D = 6, 5
SMI_KW = {"lambda_offdiag": 0.7, "diag_weight": 1.3, "eps": 1e-3, "std_eps": 1e-5}
BT_KW = {"lambd": 0.02, "bn_eps": 1e-5}
VIC_KW = {"sim_weight": 20.0, "var_weight": 15.0, "cov_weight": 2.0, "gamma": 1.0, "eps": 1e-4}


# --- naive references: plain Python floats (float64), explicit loops over the formula ------


def naive_smi(z_a, z_b, lambda_offdiag, diag_weight, eps, std_eps) -> float:
    """Per-sample standardization, R_ij = <a_i, b_j> / D, M = -1/2 log(1 - min(R^2, 1 - eps)),
    loss = -diag_weight * mean_i M_ii + lambda_offdiag * mean_{i != j} M_ij."""
    a_rows, b_rows = z_a.tolist(), z_b.tolist()
    n, d = len(a_rows), len(a_rows[0])

    def standardize(row):
        mean = sum(row) / d
        var = sum((x - mean) ** 2 for x in row) / d
        return [(x - mean) / math.sqrt(var + std_eps) for x in row]

    a = [standardize(r) for r in a_rows]
    b = [standardize(r) for r in b_rows]
    diag, off = 0.0, 0.0
    for i in range(n):
        for j in range(n):
            r = sum(a[i][k] * b[j][k] for k in range(d)) / d
            m = -0.5 * math.log(1.0 - min(r * r, 1.0 - eps))
            if i == j:
                diag += m
            else:
                off += m
    return -diag_weight * diag / n + lambda_offdiag * off / (n * (n - 1))


def naive_barlow_twins(z_a, z_b, lambd, bn_eps) -> float:
    """Per-feature batch standardization (biased variance), C_ij = sum_n a_ni b_nj / N,
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2."""
    a_rows, b_rows = z_a.tolist(), z_b.tolist()
    n, d = len(a_rows), len(a_rows[0])

    def standardize_columns(rows):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            col = [rows[k][j] for k in range(n)]
            mean = sum(col) / n
            var = sum((x - mean) ** 2 for x in col) / n
            for k in range(n):
                out[k][j] = (col[k] - mean) / math.sqrt(var + bn_eps)
        return out

    a, b = standardize_columns(a_rows), standardize_columns(b_rows)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1.0 - c) ** 2 if i == j else lambd * c * c
    return loss


def naive_vicreg(z_a, z_b, sim_weight, var_weight, cov_weight, gamma, eps) -> float:
    """sim * mean (a - b)^2 + var * (v(a) + v(b)) / 2 + cov * (c(a) + c(b)), with
    v(z) = mean_j relu(gamma - sqrt(unbiased var_j + eps)), c(z) = sum_{i != j} Cov_ij^2 / D."""
    a_rows, b_rows = z_a.tolist(), z_b.tolist()
    n, d = len(a_rows), len(a_rows[0])
    invariance = sum((a_rows[k][j] - b_rows[k][j]) ** 2 for k in range(n) for j in range(d))
    invariance /= n * d

    def var_cov(rows):
        means = [sum(rows[k][j] for k in range(n)) / n for j in range(d)]
        cov = [
            [
                sum((rows[k][i] - means[i]) * (rows[k][j] - means[j]) for k in range(n)) / (n - 1)
                for j in range(d)
            ]
            for i in range(d)
        ]
        v = sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    v_a, c_a = var_cov(a_rows)
    v_b, c_b = var_cov(b_rows)
    return sim_weight * invariance + var_weight * (v_a + v_b) / 2 + cov_weight * (c_a + c_b)


CASES = [
    pytest.param(SMILoss, SMI_KW, naive_smi, id="smi"),
    pytest.param(BarlowTwinsLoss, BT_KW, naive_barlow_twins, id="barlow_twins"),
    pytest.param(VICRegLoss, VIC_KW, naive_vicreg, id="vicreg"),
]


def views(n: int = N, d: int = D, dtype=torch.float64, noise: float = 0.5):
    """Two correlated views: a shared signal plus independent noise."""
    base = torch.randn(n, d, dtype=dtype)
    return base + noise * torch.randn(n, d, dtype=dtype), base + noise * torch.randn(
        n, d, dtype=dtype
    )


# --- values against the references -------------------------------------------------------


@pytest.mark.parametrize("cls, kw, naive", CASES)
@pytest.mark.parametrize("shape", [(N, D), (2, 3), (9, 4), (3, 11)])
def test_matches_naive_reference(cls, kw, naive, shape):
    z_a, z_b = views(*shape)
    loss = cls(**kw)(z_a, z_b)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert float(loss) == pytest.approx(naive(z_a, z_b, **kw), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("cls, kw, naive", CASES)
def test_float32_and_half_inputs(cls, kw, naive):
    z_a, z_b = views(8, 7, dtype=torch.float32)
    ref = naive(z_a.double(), z_b.double(), **kw)
    loss = cls(**kw)(z_a, z_b)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # bf16 projector outputs (autocast) are computed in float32 inside the loss
    loss_bf16 = cls(**kw)(z_a.bfloat16(), z_b.bfloat16())
    assert loss_bf16.dtype == torch.float32
    ref_bf16 = naive(z_a.bfloat16().double(), z_b.bfloat16().double(), **kw)
    assert float(loss_bf16) == pytest.approx(ref_bf16, rel=1e-4, abs=1e-5)


def test_smi_clamp_and_offdiag_weights_in_reference():
    """The clamp is active for near-identical views and the references agree there too."""
    z_a = torch.randn(N, D, dtype=torch.float64)
    z_b = z_a + 1e-3 * torch.randn(N, D, dtype=torch.float64)
    kw = {"lambda_offdiag": 2.0, "diag_weight": 0.5, "eps": 1e-2, "std_eps": 1e-6}
    loss = SMILoss(**kw)(z_a, z_b)
    assert float(loss) == pytest.approx(naive_smi(z_a, z_b, **kw), rel=1e-10)
    m = SMILoss(**kw).dependency_matrix(z_a, z_b)
    assert torch.allclose(m.diagonal(), torch.full((N,), -0.5 * math.log(1e-2), dtype=m.dtype))


@pytest.mark.parametrize(
    "cls, attrs",
    [
        (SMILoss, ("lambda_offdiag", "diag_weight", "eps", "std_eps")),
        (BarlowTwinsLoss, ("lambd", "bn_eps")),
        (VICRegLoss, ("sim_weight", "var_weight", "cov_weight", "gamma", "eps")),
    ],
)
def test_default_constructed_equals_explicit(cls, attrs):
    default = cls()
    explicit = cls(**{name: getattr(default, name) for name in attrs})
    z_a, z_b = views(dtype=torch.float32)
    assert torch.equal(default(z_a, z_b), explicit(z_a, z_b))


def test_design_defaults_of_baselines():
    """Barlow Twins and VICReg keep their papers' weights (docs/method.md, DESIGN.md)."""
    assert BarlowTwinsLoss().lambd == 0.0051
    vic = VICRegLoss()
    assert (vic.sim_weight, vic.var_weight, vic.cov_weight) == (25.0, 25.0, 1.0)


@pytest.mark.parametrize(
    "loss, naive, documented",
    [
        (
            SMILoss,
            naive_smi,
            {"lambda_offdiag": 8.0, "diag_weight": 1.0, "eps": 0.1, "std_eps": 1e-5},
        ),
        (BarlowTwinsLoss, naive_barlow_twins, {"lambd": 0.0051, "bn_eps": 1e-5}),
        (
            VICRegLoss,
            naive_vicreg,
            {"sim_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0, "gamma": 1.0, "eps": 1e-4},
        ),
    ],
)
def test_defaults_are_the_documented_values(loss, naive, documented):
    """The defaults (docs/method.md, the recipes) against the naive references; std < 1 so
    that VICReg's variance hinge is active; every loss gathers across ranks by default."""
    z_a, z_b = views(8, 6)
    z_a, z_b = 0.3 * z_a, 0.3 * z_b
    assert float(loss()(z_a, z_b)) == pytest.approx(naive(z_a, z_b, **documented), rel=1e-10)
    assert loss().gather is True


def test_smi_ignores_autocast():
    """Under autocast SMI is still computed in float32 (bf16 matmuls would change it)."""
    z_a, z_b = views(16, 64, dtype=torch.float32, noise=0.1)
    plain = SMILoss()(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = SMILoss()(z_a, z_b)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["a", "b"])
def test_smi_gradient_of_one_view_only(which):
    """A frozen view (no grad) does not change the other view's gradient."""
    z_a, z_b = views(7, 5)
    loss = SMILoss(**SMI_KW)
    leaf = z_a if which == "a" else z_b
    leaf.requires_grad_(True)
    loss(z_a, z_b).backward()
    ref_a, ref_b = z_a.detach().clone().requires_grad_(True), z_b.detach().clone()
    ref_b.requires_grad_(True)
    loss.reference_loss(ref_a, ref_b).backward()
    expected = ref_a.grad if which == "a" else ref_b.grad
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)


def test_smi_row_blocks_cover_the_rows_in_bounded_blocks():
    """The lean SMI path walks row blocks of about 1 MiB, at most 8 blocks: every row once."""
    from training.losses import _row_blocks

    for n, d, itemsize in [(2, 3, 4), (9, 4, 8), (1000, 8192, 4), (3000, 64, 4), (3, 2**18, 4)]:
        blocks = list(_row_blocks(n, d, itemsize))
        rows = [i for b in blocks for i in range(b.start, b.stop)]
        assert rows == list(range(n))
        size = max(b.stop - b.start for b in blocks)
        row_bytes = d * itemsize
        # at most 8 blocks, and no block larger than needed for that or 1 MiB
        assert len(blocks) <= 8
        assert size <= max(1, (1 << 20) // row_bytes, -(-n // 8))
        assert size * row_bytes >= min(n * row_bytes, (1 << 20) - row_bytes) or len(blocks) == 1


def test_messages_say_what_is_wrong():
    loss = SMILoss()
    z = torch.randn(4, 8)
    with pytest.raises(
        TypeError,
        match=r"^z_a and z_b must be torch tensors \(projector outputs of the two views\)\.$",
    ):
        loss(z.numpy(), z)
    with pytest.raises(ValueError, match=r"^Embeddings must be 2-D \(N x D\)"):
        loss(z, torch.randn(4, 8, 1))  # only one view is not 2-D
    with pytest.raises(ValueError, match=r"^Embeddings must be 2-D \(N x D\)"):
        loss(torch.randn(4, 8, 1), z)
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError) as e:
        loss(bad, z)
    assert str(e.value) == (
        "Embeddings contain NaN or Inf: the model has diverged (lower the learning rate, "
        "check the data) before the loss was computed."
    )
    z_a = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError) as e:
        torch.autograd.grad(loss(z_a, z_a.detach() + 1), z_a, create_graph=True)
    assert str(e.value) == (
        "SMILoss's backward is hand-written and once differentiable: double backward "
        "(create_graph=True) is not supported. Use SMILoss.reference_loss(z_a, z_b), "
        "the same loss differentiated by autograd, for higher-order gradients."
    )


def test_off_diagonal():
    m = torch.arange(16.0).view(4, 4)
    mask = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(off_diagonal(m), m[mask])


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kw, naive", CASES)
def test_gradcheck(cls, kw, naive):
    z_a, z_b = views(5, 4)
    if cls is VICRegLoss:  # keep every feature's std away from the relu kink at gamma
        z_a, z_b = 0.4 * z_a, 0.4 * z_b
    z_a.requires_grad_(True)
    z_b.requires_grad_(True)
    loss_fn = cls(**kw)
    assert torch.autograd.gradcheck(loss_fn, (z_a, z_b), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_smi_gradient_stops_at_clamp():
    """Pairs whose R^2 exceeds 1 - eps contribute no gradient (the clamp is flat there)."""
    z = torch.randn(N, D, dtype=torch.float64)
    z_a, z_b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    SMILoss(lambda_offdiag=0.0, diag_weight=1.0, eps=1e-3, std_eps=1e-8)(z_a, z_b).backward()
    assert torch.count_nonzero(z_a.grad) == 0 and torch.count_nonzero(z_b.grad) == 0


def test_smi_offdiag_term_is_quadratic_near_zero():
    """-1/2 log(1 - R^2) = R^2 / 2 + O(R^4): weakly dependent pairs cost about R^2 / 2."""
    loss = SMILoss(lambda_offdiag=1.0, diag_weight=0.0, eps=1e-4, std_eps=1e-12)
    d = 4096
    z_a, z_b = torch.randn(4, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    m = loss.dependency_matrix(z_a, z_b)
    a, b = SMILoss.standardize(z_a, 1e-12), SMILoss.standardize(z_b, 1e-12)
    r = a @ b.T / d
    assert r.abs().max() < 0.1
    torch.testing.assert_close(m, r.pow(2) / 2, rtol=1e-2, atol=1e-6)


# --- invariances --------------------------------------------------------------------------


def test_smi_invariant_to_per_sample_scale_and_shift():
    kw = {"lambda_offdiag": 0.7, "diag_weight": 1.3, "eps": 1e-3, "std_eps": 1e-12}
    z_a, z_b = views()
    loss = SMILoss(**kw)(z_a, z_b)
    scale_a = torch.rand(N, 1, dtype=torch.float64) * 5 + 0.2
    scale_b = torch.rand(N, 1, dtype=torch.float64) * 5 + 0.2
    shift_a = 10 * torch.randn(N, 1, dtype=torch.float64)
    shift_b = torch.randn(N, 1, dtype=torch.float64)
    moved = SMILoss(**kw)(z_a * scale_a + shift_a, z_b * scale_b + shift_b)
    assert float(moved) == pytest.approx(float(loss), rel=1e-9)
    # M depends on R^2 only, so flipping a sample's sign changes nothing either
    sign = torch.tensor([1.0, -1.0] * (N // 2), dtype=torch.float64)[:, None]
    assert float(SMILoss(**kw)(z_a * sign, z_b)) == pytest.approx(float(loss), rel=1e-9)
    # but it is not invariant to per-feature scaling (that is Barlow Twins' normalization)
    feature_scale = torch.linspace(0.1, 3.0, D, dtype=torch.float64)
    assert float(SMILoss(**kw)(z_a * feature_scale, z_b)) != pytest.approx(float(loss), rel=1e-3)


def test_barlow_twins_invariant_to_per_feature_scale_and_shift():
    kw = {"lambd": 0.02, "bn_eps": 1e-14}
    z_a, z_b = views()
    loss = BarlowTwinsLoss(**kw)(z_a, z_b)
    scale_a = torch.rand(1, D, dtype=torch.float64) * 5 + 0.2
    scale_b = torch.rand(1, D, dtype=torch.float64) * 5 + 0.2
    shift_a = 10 * torch.randn(1, D, dtype=torch.float64)
    shift_b = torch.randn(1, D, dtype=torch.float64)
    moved = BarlowTwinsLoss(**kw)(z_a * scale_a + shift_a, z_b * scale_b + shift_b)
    assert float(moved) == pytest.approx(float(loss), rel=1e-9)
    sample_scale = torch.linspace(0.1, 3.0, N, dtype=torch.float64)[:, None]
    assert float(BarlowTwinsLoss(**kw)(z_a * sample_scale, z_b)) != pytest.approx(
        float(loss), rel=1e-3
    )


def test_vicreg_invariant_to_common_per_feature_shift():
    z_a, z_b = views()
    shift = 10 * torch.randn(1, D, dtype=torch.float64)
    loss = VICRegLoss(**VIC_KW)
    assert float(loss(z_a + shift, z_b + shift)) == pytest.approx(float(loss(z_a, z_b)), rel=1e-9)


def test_symmetric_in_the_two_views():
    z_a, z_b = views()
    for cls, kw, _ in (c.values for c in CASES):
        loss = cls(**kw)
        assert float(loss(z_a, z_b)) == pytest.approx(float(loss(z_b, z_a)), rel=1e-10)


# --- collapse and identical views: finite, never NaN --------------------------------------


def _collapsed(kind: str, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    z_a, z_b = views(8, 16, dtype=dtype)
    if kind == "all_equal":
        row = torch.randn(1, 16, dtype=dtype)
        z_a, z_b = row.expand(8, 16).clone(), row.expand(8, 16).clone()
    elif kind == "constant_feature":
        z_a[:, 3] = 2.5
        z_b[:, 3] = 2.5
    elif kind == "constant_sample":
        z_a[2] = -1.0
        z_b[2] = -1.0
    elif kind == "all_zero":
        z_a, z_b = torch.zeros(8, 16, dtype=dtype), torch.zeros(8, 16, dtype=dtype)
    elif kind == "identical_views":
        z_b = z_a.clone()
    elif kind == "nearly_identical_views":
        z_b = z_a + 1e-6 * torch.randn_like(z_a)
    elif kind == "huge_values":
        z_a, z_b = 1e6 * z_a, 1e6 * z_b
    elif kind == "tiny_values":
        z_a, z_b = 1e-6 * z_a, 1e-6 * z_b
    return z_a, z_b


@pytest.mark.parametrize("cls, kw, naive", CASES)
@pytest.mark.parametrize(
    "kind",
    [
        "all_equal",
        "constant_feature",
        "constant_sample",
        "all_zero",
        "identical_views",
        "nearly_identical_views",
        "huge_values",
        "tiny_values",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_give_finite_loss_and_gradients(cls, kw, naive, kind, dtype):
    z_a, z_b = _collapsed(kind, dtype)
    z_a.requires_grad_(True)
    z_b.requires_grad_(True)
    loss = cls(**kw)(z_a, z_b)
    assert torch.isfinite(loss), (kind, float(loss))
    loss.backward()
    assert torch.isfinite(z_a.grad).all() and torch.isfinite(z_b.grad).all(), kind


def test_smi_identical_views_reach_the_clamp_bound():
    """rho -> 1: each diagonal pair saturates at -1/2 log(eps), the largest dependence."""
    eps = 1e-4
    z = torch.randn(N, 64, dtype=torch.float64)
    m = SMILoss(lambda_offdiag=1.0, diag_weight=1.0, eps=eps, std_eps=1e-5).dependency_matrix(z, z)
    torch.testing.assert_close(m.diagonal(), torch.full((N,), -0.5 * math.log(eps), dtype=m.dtype))
    assert (off_diagonal(m) < m.diagonal()[0]).all()


def test_smi_collapse_is_not_a_minimum():
    """All embeddings equal saturates every pair: the off-diagonal penalty makes it worse than
    well-separated samples with matching views."""
    kw = {"lambda_offdiag": 1.0, "diag_weight": 1.0, "eps": 1e-4, "std_eps": 1e-5}
    collapsed = SMILoss(**kw)(*_collapsed("all_equal"))
    z_a, z_b = views(8, 256, dtype=torch.float32, noise=0.05)
    assert float(SMILoss(**kw)(z_a, z_b)) < float(collapsed)


# --- validation and build_loss ------------------------------------------------------------


@pytest.mark.parametrize("cls", [SMILoss, BarlowTwinsLoss, VICRegLoss])
def test_input_validation(cls):
    loss = cls()
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        loss(z, torch.randn(4, 7))
    with pytest.raises(ValueError, match="same shape"):
        loss(z, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"2-D \(N x D\)"):
        loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match=r"2-D \(N x D\).*flatten or pool"):
        loss(torch.randn(4, 8, 2, 2), torch.randn(4, 8, 2, 2))
    with pytest.raises(ValueError, match="at least 2 samples, got N=1"):
        loss(torch.randn(1, 8), torch.randn(1, 8))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*diverged"):
        loss(bad, z)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(z, bad)
    with pytest.raises(TypeError, match="torch tensors"):
        loss(z.numpy(), z)


def test_smi_parameter_validation():
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        SMILoss(eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        SMILoss(eps=1.0)
    with pytest.raises(ValueError, match="std_eps must be positive"):
        SMILoss(std_eps=0.0)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("smi", SMILoss),
        ("SMI", SMILoss),
        ("barlow_twins", BarlowTwinsLoss),
        ("barlow-twins", BarlowTwinsLoss),
        ("vicreg", VICRegLoss),
    ],
)
def test_build_loss_by_name(name, cls):
    assert type(build_loss(name)) is cls


def test_build_loss_kwargs_and_errors():
    loss = build_loss("smi", **SMI_KW, gather=False)
    assert (loss.lambda_offdiag, loss.diag_weight, loss.eps, loss.std_eps, loss.gather) == (
        0.7,
        1.3,
        1e-3,
        1e-5,
        False,
    )
    assert build_loss("barlow_twins", lambd=0.1).lambd == 0.1
    assert build_loss("vicreg", gamma=2.0).gamma == 2.0
    with pytest.raises(ValueError, match=r"Unknown loss 'simclr'.*barlow_twins.*smi.*vicreg"):
        build_loss("simclr")
    with pytest.raises(ValueError, match=r"Bad arguments for loss 'smi'.*lambd.*SMILoss"):
        build_loss("smi", lambd=0.5)  # Barlow Twins' name for the weight
    with pytest.raises(ValueError, match="Bad arguments for loss 'vicreg'"):
        build_loss("vicreg", lambda_offdiag=1.0)
    with pytest.raises(ValueError, match="eps must be in"):
        build_loss("smi", eps=2.0)
