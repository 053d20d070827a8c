"""training.geometry: redundancy and spectrum against numpy, known cases, CLI smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import geometry


def test_redundancy_matches_numpy_and_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    x[:, 1] = x[:, 0] * 0.5 + 0.1 * x[:, 1]  # one correlated pair
    corr = np.corrcoef(x.numpy().astype(np.float64), rowvar=False)
    naive = np.abs(corr[~np.eye(6, dtype=bool)]).mean()
    assert geometry.redundancy(x) == pytest.approx(naive, rel=1e-9)
    copies = torch.randn(300, 1, generator=g).repeat(1, 8) * torch.arange(1, 9)
    assert geometry.redundancy(copies) == pytest.approx(1.0)
    independent = torch.randn(20000, 4, generator=g)
    assert geometry.redundancy(independent) < 0.02
    constant = torch.cat([independent[:, :2], torch.ones(20000, 1)], dim=1)
    assert geometry.redundancy(constant) < 0.02  # a dead dimension is not "redundant"


def test_variance_spectrum_is_sorted_normalized_pca_eigenvalues():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([5.0, 1.0, 3.0, 0.5])
    x = torch.randn(4000, 4, generator=g, dtype=torch.float64) * scales
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    spectrum = geometry.variance_spectrum(x @ rot)
    assert spectrum.sum() == pytest.approx(1.0)
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    sv = np.linalg.svd((x - x.mean(0)).numpy(), compute_uv=False) ** 2
    assert spectrum.numpy() == pytest.approx(sv / sv.sum(), rel=1e-6)
    want = (scales**2).sort(descending=True).values / (scales**2).sum()
    assert spectrum.numpy() == pytest.approx(want.numpy(), abs=0.01)


def test_geometry_metrics_known_cases():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(256, 16, generator=g)
    m = geometry.geometry_metrics(z, z, z)
    assert m["alignment"] == 0.0 and m["dim"] == 16
    noisy = geometry.geometry_metrics(z, z, z + 0.5 * torch.randn(256, 16, generator=g))
    assert noisy["alignment"] > 0.05
    line = torch.randn(256, 1, generator=g) * torch.randn(1, 16, generator=g)
    collapsed = geometry.geometry_metrics(line, line, line)
    assert collapsed["effective_rank"] < 1.5 < m["effective_rank"]
    assert collapsed["top10_variance"] == pytest.approx(1.0)
    assert collapsed["uniformity"] > m["uniformity"]  # collapsed: far less uniform


@pytest.mark.slow
def test_cli_on_the_embedded_default_and_random_init(tmp_path, capsys):
    out, png = tmp_path / "geometry.json", tmp_path / "geometry.png"
    argv = [
        "SMI=smi_resnet18_fmnist", "random init=random:training/configs/fmnist_resnet18_smi.yaml",
        "--subset", "96", "--batch-size", "48", "--out", str(out), "--plot", str(png),
    ]  # fmt: skip
    assert geometry.main(argv) == 0
    captured = capsys.readouterr()
    assert "| SMI | backbone | 128 |" in captured.out and "centre features" in captured.err
    res = json.loads(out.read_text())
    assert set(res["SMI"]) == {"backbone"}  # the exported default has no projector
    assert set(res["random init"]) == {"backbone", "projector"}
    assert res["random init"]["projector"]["dim"] == 1024
    for spaces in res.values():
        for m in spaces.values():
            assert 1 <= m["effective_rank"] <= m["dim"] and 0 <= m["redundancy"] <= 1
            assert m["alignment"] > 0 and len(m["spectrum"]) == m["dim"]
    # the trained backbone spreads its features more uniformly than random weights
    assert res["SMI"]["backbone"]["uniformity"] < res["random init"]["backbone"]["uniformity"]
    assert png.stat().st_size > 10_000
    assert geometry.main(["oops"]) == 2
