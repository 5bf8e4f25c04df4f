"""Separability analysis against per-filter NumPy SVDs, and inspect on the torchvision zoo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bscompress.analysis.analyze import inspect_model
from bscompress.factorize.spectra import (
    blueprint_spectrum,
    depthwise_spectrum,
    kept_energy,
    tucker2_kept_energy,
)


def _oracle_blueprint(w: np.ndarray, rank: int) -> float:
    """Per filter n: SVD of the M/g × K matrix, loop in Python."""
    kept = total = 0.0
    for filt in w:
        s = np.linalg.svd(filt.reshape(filt.shape[0], -1), compute_uv=False)
        kept += (s[:rank] ** 2).sum()
        total += (s**2).sum()
    return kept / total


def _oracle_depthwise(w: np.ndarray, groups: int, rank: int) -> float:
    """Per input channel m of group g: SVD of the (N/g) × K slice W[n in g, m]."""
    n, m_g = w.shape[:2]
    n_g = n // groups
    kept = total = 0.0
    for g in range(groups):
        for m in range(m_g):
            block = w[g * n_g:(g + 1) * n_g, m].reshape(n_g, -1)
            s = np.linalg.svd(block, compute_uv=False)
            kept += (s[:rank] ** 2).sum()
            total += (s**2).sum()
    return kept / total


@pytest.mark.parametrize(("shape", "groups"), [((24, 16, 3, 3), 1), ((32, 8, 3, 5), 4),
                                                ((12, 10, 7), 1)])
@pytest.mark.parametrize("rank", [1, 2])
def test_spectra_match_per_filter_svd(shape, groups, rank):
    w = torch.randn(shape, dtype=torch.float64)
    assert kept_energy(blueprint_spectrum(w, groups), rank) == pytest.approx(
        _oracle_blueprint(w.numpy(), rank), rel=1e-10)
    assert kept_energy(depthwise_spectrum(w, groups), rank) == pytest.approx(
        _oracle_depthwise(w.numpy(), groups, rank), rel=1e-10)


def test_exactly_separable_kernels_keep_all_energy():
    n, m, k = 16, 12, 9
    # BSConv-U: every filter is one blueprint scaled per input channel
    blueprint = torch.einsum("nm,nk->nmk", torch.randn(n, m), torch.randn(n, k))
    assert kept_energy(blueprint_spectrum(blueprint.reshape(n, m, 3, 3)), 1) == pytest.approx(1)
    # depthwise decomposition: every input channel one kernel scaled per output channel
    depthwise = torch.einsum("nm,mk->nmk", torch.randn(n, m), torch.randn(m, k))
    assert kept_energy(depthwise_spectrum(depthwise.reshape(n, m, 3, 3)), 1) == pytest.approx(1)
    # Tucker-2 of multilinear rank (4, 3)
    core = torch.randn(4, 3, k, dtype=torch.float64)
    u_out, u_in = torch.randn(n, 4, dtype=torch.float64), torch.randn(m, 3, dtype=torch.float64)
    tucker = torch.einsum("abk,na,mb->nmk", core, u_out, u_in).reshape(n, m, 3, 3)
    assert tucker2_kept_energy(tucker, (4, 3)) == pytest.approx(1, abs=1e-9)


def test_tucker2_energy_is_between_hosvd_and_one():
    w = torch.randn(20, 12, 3, 3, dtype=torch.float64)
    mat = w.numpy()
    u_out = np.linalg.svd(mat.reshape(20, -1), full_matrices=False)[0][:, :5]
    u_in = np.linalg.svd(mat.transpose(1, 0, 2, 3).reshape(12, -1), full_matrices=False)[0][:, :3]
    hosvd = np.einsum("nmhw,na,mb->abhw", mat, u_out, u_in)
    hosvd_energy = (hosvd**2).sum() / (mat**2).sum()
    hooi = tucker2_kept_energy(w, (5, 3))
    assert hosvd_energy - 1e-9 <= hooi <= 1
    assert tucker2_kept_energy(w, (20, 12)) == pytest.approx(1)


ZOO = ["resnet18", "vgg11_bn", "mobilenet_v2", "resnext50_32x4d"]


@pytest.mark.parametrize("name", ZOO)
def test_inspect_torchvision_zoo(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    report = inspect_model(model, [1, 3, 64, 64])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(report.layers) == len(convs)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert sum(r.mac_share for r in report.layers) <= 1 + 1e-9
    for row, conv in zip(report.layers, convs, strict=True):
        if row.eligible:
            assert 0 < row.blueprint_rank1 <= 1 and 0 < row.depthwise_rank1 <= 1
            assert 0 < row.tucker2_quarter <= 1
            assert conv.kernel_size != (1, 1)
        else:
            assert row.blueprint_rank1 is None and row.skip_reason
    reasons = {r.skip_reason for r in report.layers if not r.eligible}
    if name == "mobilenet_v2":
        assert "depthwise conv: already separable" in reasons
        assert not [r for r in report.layers if r.eligible and r.groups == 1 and r.in_channels < 8]
    if name == "resnext50_32x4d":
        assert any(r.eligible and r.groups == 32 for r in report.layers)
    assert report.layers[0].skip_reason.startswith("first layer")
    assert report.to_dict()["eligible_macs"] == report.eligible_macs
