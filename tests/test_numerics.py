"""The guarded SPD routines of the data-aware path (issue 19): every pathology of real
calibration statistics is planted — dead and constant channels, saturated activations, fewer
samples than dimensions, an indefinite float32 sum, inputs scaled by 1e4 and 1e-4 — and none
of them may crash; where an exact solution exists, it is matched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.calibrate import collect_patch_covariances
from bscompress.compress.data_aware import degenerate_statistics
from bscompress.compress.decomposition import decompose
from bscompress.core.surgery import Eligibility
from bscompress.factorize.gsvd import (
    conditioning,
    output_error,
    spd_root,
    spd_solve,
    whitened_lowrank,
    whitening,
)
from bscompress.methods import RankOptions


def _random_spd(d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_well_conditioned_solve_and_root_are_exact():
    s = _random_spd(24) + torch.eye(24, dtype=torch.float64)
    rhs = torch.randn(24, 3, dtype=torch.float64)
    with conditioning() as record:
        x = spd_solve(s, rhs)
        root, inv = spd_root(s)
    assert record["floored"] == 0
    torch.testing.assert_close(s @ x, rhs)
    torch.testing.assert_close(root @ root.T, s)
    torch.testing.assert_close(inv @ root, torch.eye(24, dtype=torch.float64))


def test_indefinite_matrix_is_floored_not_a_crash():
    # a float32 sum of rank-deficient outer products, then a negative eigenvalue on purpose
    s = _random_spd(40, rank=5).float().double()
    q = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0]
    s = s - 1e-3 * torch.outer(q[:, 0], q[:, 0])
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(s)
    with conditioning() as record:
        root, inv = whitening(s)
        x = spd_solve(s, torch.ones(40, 1, dtype=torch.float64))
    assert record["floored"] == 2
    assert torch.isfinite(root).all() and torch.isfinite(inv).all() and torch.isfinite(x).all()
    torch.testing.assert_close(inv @ root, torch.eye(40, dtype=torch.float64))
    # the floored root reproduces Σ on its positive part
    values, vectors = torch.linalg.eigh(s)
    positive = vectors[:, values > 1e-6]
    torch.testing.assert_close(positive.T @ root @ root.T @ positive,
                               positive.T @ s @ positive, atol=1e-6, rtol=1e-6)


def test_slightly_indefinite_entries_settle_with_a_jitter_not_the_eigendecomposition(
        monkeypatch):
    """A negative eigenvalue just beyond the ridge (float32 sums of rank-deficient statistics)
    is settled by a jittered Cholesky; only a clearly indefinite entry reaches the floored
    eigendecomposition. Both are counted."""
    import bscompress.factorize.gsvd as gsvd

    s = _random_spd(40, rank=5)
    q = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0]
    scale = float(s.diagonal().mean())
    slightly = s - 5e-6 * scale * torch.outer(q[:, 0], q[:, 0])
    clearly = s - 1e-1 * scale * torch.outer(q[:, 0], q[:, 0])
    eighs = []
    original = gsvd._floored_eigh
    monkeypatch.setattr(gsvd, "_floored_eigh",
                        lambda m: eighs.append(m.shape) or original(m))
    rhs = torch.randn(40, 2, dtype=torch.float64)
    with conditioning() as record:
        x = spd_solve(slightly, rhs)
    assert record["floored"] == 1 and not eighs
    # the oracle: the solve of the matrix with the first jitter on its diagonal
    jittered = slightly + gsvd.JITTERS[0] * float(slightly.diagonal().abs().mean()) * torch.eye(
        40, dtype=torch.float64)
    torch.testing.assert_close(jittered @ x, rhs)
    with conditioning() as record:
        x = spd_solve(torch.stack([slightly, clearly]), torch.stack([rhs, rhs]))
    assert record["floored"] == 2 and len(eighs) == 1 and torch.isfinite(x).all()


def test_batched_mixture_of_good_and_bad_entries():
    good = _random_spd(16) + torch.eye(16, dtype=torch.float64)
    bad = -torch.eye(16, dtype=torch.float64)
    rhs = torch.randn(2, 16, 2, dtype=torch.float64)
    with conditioning() as record:
        x = spd_solve(torch.stack([good, bad]), rhs)
        root, _ = spd_root(torch.stack([good, bad]))
    assert record["floored"] == 2
    torch.testing.assert_close(good @ x[0], rhs[0])
    torch.testing.assert_close(root[0] @ root[0].T, good)
    assert torch.isfinite(x[1]).all()


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_whitened_lowrank_matches_the_exact_optimum_at_any_scale(scale):
    """The optimum of tr((W − Ŵ) Σ (W − Ŵ)ᵀ) at rank r, by an independent route: the SVD of
    W Σ^½ (symmetric square root from an eigendecomposition)."""
    torch.manual_seed(0)
    w = torch.randn(1, 12, 30, dtype=torch.float64)
    s = (_random_spd(30) + 0.1 * torch.eye(30, dtype=torch.float64))[None] * scale ** 2
    left, right, _ = whitened_lowrank(w, s, 4)
    approx = left @ right.transpose(-1, -2)
    values, vectors = torch.linalg.eigh(s[0])
    half = vectors @ torch.diag(values.sqrt()) @ vectors.T
    u, sv, vh = torch.linalg.svd(w[0] @ half)
    best = (u[:, :4] * sv[:4]) @ vh[:4] @ torch.linalg.inv(half)
    # the objective is the oracle (the minimiser's entries carry Σ^-½'s rounding at 1e-4)
    error, optimum = output_error(w, approx, s), output_error(w, best[None], s)
    assert abs(error / optimum - 1) < 1e-9
    assert abs(optimum / float((sv[4:] ** 2).sum()) - 1) < 1e-9  # the dropped values


class _Net(nn.Module):
    """A conv net whose calibration statistics are as bad as they get: channel 0 dead, channel
    1 constant, the rest saturated ReLU6 (mostly 0 or 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem(x) * 50)
        x = torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, 1:2]), x[:, 2:]], 1)
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["bsconv-u", "dsc", "tucker2", "cp", "svd"])
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_degenerate_calibration_never_crashes_and_is_recorded(method, scale):
    torch.manual_seed(0)
    net = _Net().eval()
    # two images: 2·64 = 128 patches for the 144-dimensional conv, 2 samples for the Linear
    calib = [torch.randn(2, 3, 8, 8) * scale]
    model, plan = decompose(net, method, [1, 3, 8, 8], RankOptions(rank=2),
                            Eligibility(classifier=True), calibration=calib,
                            reestimate_bn=False)
    assert plan.replaced()
    for entry in plan.replaced():
        assert entry.statistics is not None, entry.name
        assert entry.statistics["patches"] < entry.statistics["dimensions"] or \
            entry.statistics["dead"] > 0
        assert entry.output_error is None or entry.output_error == entry.output_error
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()


def test_dead_channels_are_counted():
    net = _Net().eval()
    covs = collect_patch_covariances(net, [torch.randn(4, 3, 8, 8)], ["conv"])
    record = degenerate_statistics(covs["conv"])
    assert record["dead"] >= 9  # channel 0's 3×3 patch dimensions


def test_cli_reports_degenerate_statistics(tmp_path):
    from tests.nets import TinyNet

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    from pathlib import Path

    spec = f"{Path(__file__).parent / 'nets.py'}:TinyNet"
    out = tmp_path / "d.pt"
    result = CliRunner().invoke(app, [
        "decompose", str(ckpt), "--arch", spec, "-m", "bsconv-u", "--calib",
        "synthetic:3x16x16:10", "--calib-samples", "1", "--no-bn-reestimate", "-o", str(out),
        "--json"])
    assert result.exit_code == 0, result.stderr
    layers = json.loads(result.stdout)["plan"]["layers"]
    assert any(entry["statistics"] for entry in layers if entry["method"])


@pytest.mark.parametrize("d,tile", [(7, 512), (1100, 512), (130, 64), (128, 64)])
def test_the_tiled_self_gram_is_the_product(d, tile):
    """``self_gram`` computes the tiles on and above the diagonal and mirrors the rest: the
    product xᵀ x itself, symmetric, for widths that the tiles cut evenly or not."""
    from bscompress.factorize.linalg import self_gram

    x = torch.randn(2, 50, d, generator=torch.Generator().manual_seed(d))
    ours = self_gram(x, tile=tile)
    assert torch.allclose(ours, x.transpose(1, 2) @ x, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ours, ours.transpose(1, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d,tile", [(7, 512), (1100, 512), (130, 64), (128, 64), (65, 64)])
def test_the_tiled_quadratic_trace_is_the_full_one(d, tile):
    """``quadratic_trace`` multiplies the tiles of S on and above the diagonal only: it is
    Σ_g tr(x_g S_g x_gᵀ) computed in float64 with the whole S, for widths the tiles cut
    evenly or not, and for an S that is not positive definite."""
    from bscompress.factorize.linalg import quadratic_trace

    gen = torch.Generator().manual_seed(d)
    x = torch.randn(3, 20, d, dtype=torch.float64, generator=gen)
    a = torch.randn(3, d, d, dtype=torch.float64, generator=gen)
    for sym in (a @ a.transpose(1, 2), a + a.transpose(1, 2)):
        exact = float(torch.einsum("gnd,gde,gne->", x, sym, x))
        assert quadratic_trace(x, sym, tile=tile) == pytest.approx(exact, rel=1e-9, abs=1e-9)
