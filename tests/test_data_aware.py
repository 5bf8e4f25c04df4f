"""Calibration statistics and data-aware (GSVD) factors, against independent oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bscompress.compress import layer_fit
from bscompress.compress.calibrate import collect_patch_covariances, patches, reestimate_batchnorm
from bscompress.compress.data_aware import shrunk
from bscompress.compress.decomposition import (
    FEW_SAMPLES_ERROR,
    HELD_OUT_ERROR,
    OUTPUT_ERROR,
    Budget,
    decompose,
)
from bscompress.compress.layer_fit import HOLDOUT
from bscompress.core.covariance import PatchCovariance
from bscompress.core.errors import BadInput
from bscompress.core.surgery import Eligibility
from bscompress.factorize.gsvd import (
    output_error,
    paired_relative_error,
    refit_last,
    refit_pointwise_after_depthwise,
    sequential_target,
    whitened_lowrank,
)
from bscompress.methods import METHODS, RankOptions

torch.set_default_dtype(torch.float32)


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d // 2, generator=g, dtype=torch.float64)
    return a @ a.T + 1e-3 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------------------- pure math


def test_whitened_svd_with_identity_is_the_plain_svd():
    w = torch.randn(3, 12, 20, dtype=torch.float64)
    eye = torch.eye(20, dtype=torch.float64).expand(3, 20, 20)
    left, right, s = whitened_lowrank(w, eye, 4)
    u, s_ref, vh = torch.linalg.svd(w, full_matrices=False)
    plain = u[..., :4] * s_ref[..., None, :4] @ vh[..., :4, :]
    assert torch.allclose(left @ right.transpose(1, 2), plain, atol=1e-8)
    assert torch.allclose(s, s_ref, atol=1e-8)


def test_whitened_svd_is_optimal_under_sigma():
    w = torch.randn(1, 16, 24, dtype=torch.float64)
    sigma = _spd(24, 0)[None]
    left, right, s = whitened_lowrank(w, sigma, 3)
    err = output_error(w, left @ right.transpose(1, 2), sigma)
    assert err == pytest.approx(float(s[0, 3:].square().sum()), rel=1e-5)
    u, s_ref, vh = torch.linalg.svd(w, full_matrices=False)
    plain = u[..., :3] * s_ref[..., None, :3] @ vh[..., :3, :]
    assert err < output_error(w, plain, sigma)
    # full rank is exact
    left, right, _ = whitened_lowrank(w, sigma, 16)
    assert torch.allclose(left @ right.transpose(1, 2), w, atol=1e-6)


def test_refit_last_solves_the_normal_equations():
    w = torch.randn(2, 10, 18, dtype=torch.float64)
    front = torch.randn(2, 5, 18, dtype=torch.float64)
    sigma = torch.stack([_spd(18, 1), _spd(18, 2)])
    p = refit_last(w, front, sigma)
    # the gradient of tr((W − P F) Σ (W − P F)ᵀ) vanishes at the solution
    grad = (w - p @ front) @ sigma @ front.transpose(1, 2)
    assert grad.abs().max() < 1e-6 * w.abs().max() * sigma.abs().max() * 18
    for _ in range(3):  # and any perturbation is worse
        q = p + 1e-3 * torch.randn_like(p)
        assert output_error(w, q @ front, sigma) > output_error(w, p @ front, sigma)


@pytest.mark.parametrize("r", [1, 2])
def test_depthwise_refit_is_refit_last_with_the_dense_front(r):
    """The structured pointwise refit of DSC equals refit_last with its block-diagonal front
    written out densely."""
    g, n, m, k = 2, 5, 3, 4
    w = torch.randn(g, n, m * k, dtype=torch.float64)
    d = torch.randn(g, m, r, k, dtype=torch.float64)
    sigma = torch.stack([_spd(m * k, 3), _spd(m * k, 4)])
    front = torch.einsum("gmjk,mp->gmjpk", d, torch.eye(m, dtype=torch.float64))
    oracle = refit_last(w, front.reshape(g, m * r, m * k), sigma)
    assert torch.allclose(refit_pointwise_after_depthwise(w, d, sigma), oracle, atol=1e-9)


# ---------------------------------------------------------------------------- patches


CONVS = [
    dict(cls=nn.Conv2d, args=(8, 6, 3), kw=dict(padding=1)),
    dict(cls=nn.Conv2d, args=(8, 6, 3), kw=dict(stride=2, dilation=2, padding=2, groups=2)),
    dict(cls=nn.Conv2d, args=(4, 6, (3, 2)), kw=dict(padding="same", padding_mode="reflect")),
    dict(cls=nn.Conv2d, args=(4, 4, 3), kw=dict(padding=1, padding_mode="circular")),
    dict(cls=nn.Conv1d, args=(6, 4, 5), kw=dict(padding=2, stride=2, groups=2)),
    # 1×1 convs take the strided input as their patches (no im2col)
    dict(cls=nn.Conv2d, args=(8, 6, 1), kw=dict()),
    dict(cls=nn.Conv2d, args=(8, 6, 1), kw=dict(stride=2, groups=2)),
    dict(cls=nn.Conv2d, args=(4, 6, 1), kw=dict(stride=(2, 3), padding=1)),
    dict(cls=nn.Conv1d, args=(6, 4, 1), kw=dict(stride=2, padding=1)),
]


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"{c['cls'].__name__}{c['kw']}")
def test_patches_reproduce_the_convolution(cfg):
    torch.manual_seed(0)
    conv = cfg["cls"](*cfg["args"], **cfg["kw"], bias=False)
    x = torch.randn(2, conv.in_channels, *([9, 11] if conv.weight.dim() == 4 else [13]))
    p = patches(conv, x)  # [g, B·L, D]
    g = conv.groups
    w = conv.weight.reshape(g, conv.out_channels // g, -1)
    via_patches = p @ w.transpose(1, 2)  # [g, B·L, N/g]
    y = conv(x).flatten(2)  # [B, N, L]
    b, n, length = y.shape
    expected = y.reshape(b, g, n // g, length).permute(1, 0, 3, 2).reshape(g, b * length, -1)
    assert torch.allclose(via_patches, expected, atol=1e-5)


def test_covariance_blocks_and_memory_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
    batches = [torch.randn(3, 4, 8, 8) for _ in range(2)]
    full = collect_patch_covariances(model, batches, ["0", "2"])
    small = collect_patch_covariances(model, batches, ["0", "2"], max_bytes=1000)
    for name in ("0", "2"):
        assert full[name].full is not None and small[name].full is None
        assert torch.allclose(full[name].blocks, small[name].blocks, atol=1e-5)
    # oracle: Σ straight from the patches of the whole data
    p = patches(model[0], torch.cat(batches)).double()
    assert torch.allclose(full["0"].full, p.transpose(1, 2) @ p / p.shape[1], atol=1e-5)
    assert full["2"].full.shape == (2, 36, 36) and full["2"].patches == 6 * 36


# ---------------------------------------------------------------------------- methods


class Planted(nn.Module):
    """A 3×3 conv fed by inputs with a low-rank channel covariance (4 latent channels)."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 16, 1, bias=False)
        self.conv = nn.Conv2d(16, 24, 3, padding=1, groups=groups)
        self.head = nn.Conv2d(24, 16, 1)

    def forward(self, x):
        return self.head(self.conv(self.mix(x)))


def _data(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, 10, 10, generator=g) for _ in range(n)]


def _conv_output_error(original: nn.Module, compressed: nn.Module, name: str, data) -> float:
    """Relative error of one layer's output (bias excluded from the reference scale), the
    compressed layer fed the original layer's inputs, measured by running both."""
    layer, block = original.get_submodule(name), compressed.get_submodule(name)
    seen = {}
    pre = layer.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    post = layer.register_forward_hook(lambda _m, _a, out: seen.update(y=out))
    num = den = 0.0
    try:
        with torch.no_grad():
            for x in data:
                original(x)
                approx = block(seen["x"])
                bias = layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0
                num += float((approx - seen["y"]).square().sum())
                den += float((seen["y"] - bias).square().sum())
    finally:
        pre.remove()
        post.remove()
    return num / den


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "svd"])
def test_data_aware_beats_data_free_on_planted_covariance(method, groups):
    torch.manual_seed(0)
    base = Planted(groups).eval()
    calib, held_out = _data(1), _data(2)
    covs = collect_patch_covariances(base, calib, ["conv"])
    options = RankOptions(rank=1, cp_iters=5, tucker_ranks=0.25, cp_rank=0.25)
    select = dict(eligibility=Eligibility(include=("conv",), min_in_channels=1))
    free, _ = decompose(copy.deepcopy(base), method, (1, 4, 10, 10), options, **select)
    aware, plan = decompose(copy.deepcopy(base), method, (1, 4, 10, 10), options, **select,
                            covariances=covs, als_iters=2)
    entry = plan.replaced()[0]
    assert entry.fit != "svd" and entry.output_error is not None
    # the predicted output error is what running the block on the calibration data gives
    assert _conv_output_error(base, aware, "conv", calib) == pytest.approx(
        entry.output_error, rel=1e-3, abs=1e-6)
    err_free = _conv_output_error(base, free, "conv", held_out)
    err_aware = _conv_output_error(base, aware, "conv", held_out)
    assert err_aware < err_free, (entry.fit, err_aware, err_free)


def test_svd_whitened_on_linear_and_1x1():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 32, 1, bias=False), nn.Conv2d(32, 32, 1),
                          nn.Flatten(), nn.Linear(32 * 4, 10)).eval()
    data = _data(3, n=20)  # 160 samples for the Linear layer's 128 dimensions
    data = [x[:, :, :2, :2] for x in data]
    covs = collect_patch_covariances(model, data, ["1", "3"])
    select = Eligibility(include=("1", "3"))
    free, _ = decompose(copy.deepcopy(model), "svd", (1, 4, 2, 2), RankOptions(rank=2),
                        select)
    aware, plan = decompose(copy.deepcopy(model), "svd", (1, 4, 2, 2), RankOptions(rank=2),
                            select, covariances=covs)
    assert {e.fit for e in plan.replaced()} == {"whitened svd, centred (mean → bias)"}
    # inputs of rank 4 (4 latent channels): rank 2 of a whitened SVD beats the plain one
    x = torch.cat(data)
    ref = model(x)
    assert (aware(x) - ref).square().sum() < (free(x) - ref).square().sum()


# ---------------------------------------------------------------------------- BatchNorm


def test_bn_reestimation_is_a_no_op_on_the_training_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    data = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(3)]
    for m in model.modules():  # "training": cumulative statistics over exactly these data
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    assert reestimate_batchnorm(model, data) == 2
    after = model.state_dict()
    for key in before:
        if "running" in key:
            assert torch.allclose(before[key], after[key], atol=1e-6), key
    assert not model.training and model[1].momentum is None
    # other data move the statistics, and momentum and mode are restored
    model[1].momentum = 0.1
    reestimate_batchnorm(model, [torch.randn(16, 3, 8, 8)])
    assert not torch.allclose(model[1].running_mean, before["1.running_mean"])
    assert model[1].momentum == 0.1


class Chain(nn.Module):
    """Two 3×3 convs in a row on planted low-rank inputs: errors of the first reach the
    second."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 16, 1, bias=False)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(self.mix(x))))


@pytest.mark.parametrize("method", ["bsconv-u", "dsc", "tucker2"])
def test_sequential_compensates_upstream_errors(method):
    torch.manual_seed(0)
    base = Chain().eval()
    calib, held_out = _data(1, 6), _data(2)
    select = Eligibility(include=("conv1", "conv2"), min_in_channels=1)
    options = RankOptions(rank=1, tucker_ranks=0.25)
    one_shot, _ = decompose(copy.deepcopy(base), method, (1, 4, 10, 10), options, select,
                            calibration=calib, reestimate_bn=False)
    seq, plan = decompose(copy.deepcopy(base), method, (1, 4, 10, 10), options, select,
                          calibration=calib, reestimate_bn=False, sequential=True)
    assert all(", sequential" in e.fit for e in plan.replaced())
    # the second layer's predicted error is its output error inside the compressed network
    # (its mean error given back to its bias: relative to the output's variance)
    last = plan.replaced()[-1]
    with torch.no_grad():
        num = sum(float((seq(x) - base(x)).square().sum()) for x in calib)
        outputs = torch.cat([base(x) for x in calib])
        den = float((outputs - outputs.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
    assert num / den == pytest.approx(last.output_error, rel=1e-3)

    def final_error(model):
        with torch.no_grad():
            return sum(float((model(x) - base(x)).square().sum()) for x in held_out)

    assert final_error(seq) < final_error(one_shot)


def test_sequential_needs_calibration():
    with pytest.raises(Exception, match="--sequential needs calibration"):
        decompose(Chain(), "dsc", (1, 4, 10, 10), sequential=True)


def test_shrunk_sequential_statistics_are_those_of_the_blended_objective():
    """Oracle: least squares on the stacked system [√(1−α) p̃ᵀ; √(α s) I] Ŵᵀ ≈ [√(1−α) yᵀ;
    √(α s) Wᵀ], i.e. (1 − α) E‖y − Ŵ p̃‖² + α s ‖W − Ŵ‖², s = tr Σ̃ / D; its residual is the
    error charged. Fewer patches than dimensions: without shrinkage the fit is ~0 outside
    their span."""
    g = torch.Generator().manual_seed(0)
    n, d, out, alpha = 7, 12, 5, 0.3
    q = torch.randn(n, d, generator=g, dtype=torch.float64)  # the compressed net's patches
    w = torch.randn(1, out, d, generator=g, dtype=torch.float64)
    y = (q + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)) @ w[0].T
    sigma = q.T @ q / n
    cov = PatchCovariance(1, d, 1, sigma[None], sigma.diagonal().reshape(1, d, 1, 1), n,
                          cross=(y.T @ q / n)[None], target_energy=y.square().sum()[None] / n,
                          target_mean=y.mean(0)[None], mean=q.mean(0)[None])
    with pytest.raises(ValueError, match="weight"):
        shrunk(cov, alpha)
    blended = shrunk(cov, alpha, w)
    s = float(sigma.diagonal().mean())
    lhs = torch.cat([(1 - alpha) ** 0.5 * q / n ** 0.5, (alpha * s) ** 0.5 * torch.eye(d)])
    rhs = torch.cat([(1 - alpha) ** 0.5 * y / n ** 0.5, (alpha * s) ** 0.5 * w[0].T])
    oracle = torch.linalg.lstsq(lhs, rhs).solution.T
    fitted = sequential_target(blended.cross, blended.full)
    assert torch.allclose(fitted[0], oracle, rtol=1e-5, atol=1e-5)
    residual = float((lhs @ oracle.T - rhs).square().sum() / rhs.square().sum())
    error = paired_relative_error(fitted, blended.full, blended.cross, blended.target_energy)
    assert error == pytest.approx(residual, rel=1e-5)
    # unshrunk, the fit is nearly nothing where the 7 patches never went; shrunk, it is W
    null = torch.linalg.svd(q).Vh[n:]  # [d − n, d]: directions the patches do not span
    assert (sequential_target(cov.cross, cov.full)[0] @ null.T).norm() < 1e-3 * w.norm()
    assert torch.allclose(fitted[0] @ null.T, w[0] @ null.T, rtol=1e-5, atol=1e-5)


def test_the_held_out_shrinkage_applies_to_the_sequential_fit(monkeypatch):
    """Where the held-out batches choose a shrunk fit, the sequential fit is shrunk too."""
    monkeypatch.setattr(layer_fit, "SHRINKAGE", (0.3,))
    calls = []

    def spy(cov, alpha, weight=None):
        calls.append((cov.cross is not None, alpha))
        return shrunk(cov, alpha, weight)

    monkeypatch.setattr(layer_fit, "shrunk", spy)
    torch.manual_seed(0)
    base = Chain().eval()
    select = Eligibility(include=("conv1", "conv2"), min_in_channels=1)
    _, plan = decompose(copy.deepcopy(base), "tucker2", (1, 4, 10, 10),
                        RankOptions(tucker_ranks=0.25), select, calibration=_data(1, 4),
                        reestimate_bn=False, sequential=True)
    fits = [entry.fit for entry in plan.replaced()]
    assert any("Σ shrunk 0.3, sequential" in fit for fit in fits), fits
    assert (True, 0.3) in calls  # the paired statistics, shrunk toward the layer's weight


def test_measured_errors_are_recorded_and_match_one_shot_predictions_on_the_first_layer():
    torch.manual_seed(0)
    base = Chain().eval()
    calib = _data(1, 3)
    select = Eligibility(include=("conv1", "conv2"), min_in_channels=1)
    _, plan = decompose(copy.deepcopy(base), "dsc", (1, 4, 10, 10), RankOptions(rank=1),
                        select, calibration=calib, reestimate_bn=False)
    first, second = plan.replaced()
    # nothing upstream of conv1 changed: measured = predicted; conv2 also sees conv1's error
    assert first.measured_error == pytest.approx(first.output_error, rel=1e-4)
    assert second.measured_error > 0 and second.output_error > 0


@pytest.mark.parametrize("m,k,r", [(5, 4, 2), (64, 4, 4)])  # 64·4 = 256: a large LS system
def test_blueprint_refits_match_a_per_filter_least_squares_oracle(m, k, r):
    import numpy as np

    from bscompress.factorize.gsvd import refit_blueprint_pointwise, refit_blueprints

    gen = torch.Generator().manual_seed(0)
    n = 3
    w = torch.randn(1, n, m, k, generator=gen, dtype=torch.float64)
    root = torch.randn(m * k, m * k, generator=gen, dtype=torch.float64)
    sigma = (root @ root.T / (m * k) + torch.eye(m * k, dtype=torch.float64))[None]
    v = torch.randn(1, n, k, r, generator=gen, dtype=torch.float64)
    p = refit_blueprint_pointwise(w, v, sigma)
    v2 = refit_blueprints(w, p, sigma)
    chol = np.linalg.cholesky(sigma[0].numpy())
    for i in range(n):
        a = w[0, i].reshape(-1).numpy()
        # P given V: vec(P Vᵀ) = (I_M ⊗ V) vec(P); weighted LS via the Cholesky factor
        g = np.kron(np.eye(m), v[0, i].numpy())
        sol = np.linalg.lstsq(chol.T @ g, chol.T @ a, rcond=None)[0]
        # equal up to the solver's ridge (1e-6 of the mean diagonal)
        assert np.abs(p[0, i].numpy().reshape(-1) - sol).max() <= 1e-3 * np.abs(sol).max()
        # V given P: vec(P Vᵀ) = (P ⊗ I_K) vec(Vᵀ)
        g = np.kron(p[0, i].numpy(), np.eye(k))
        sol = np.linalg.lstsq(chol.T @ g, chol.T @ a, rcond=None)[0]
        assert np.abs(v2[0, i].numpy().T.reshape(-1) - sol).max() <= 1e-3 * np.abs(sol).max()
    # a budget candidate's products in float32: the same blueprints to float32's precision
    v32 = refit_blueprints(w, p, sigma, precision=torch.float32)
    assert v32.dtype == torch.float64
    assert torch.allclose(v32, v2, rtol=1e-4, atol=1e-4 * float(v2.abs().max()))



def test_the_blueprint_system_of_the_first_columns_is_the_leading_block():
    """The budget's BSConv-U candidates (ranks 1 … R of one SVD) share the normal equations
    of rank R: each rank's blueprints from its leading block equal its own least squares."""
    from bscompress.factorize.gsvd import (
        blueprint_normal_equations,
        refit_blueprints,
        solve_blueprints,
    )

    gen = torch.Generator().manual_seed(0)
    g, n, m, k, rank = 2, 3, 5, 4, 4
    w = torch.randn(g, n, m, k, generator=gen, dtype=torch.float64)
    root = torch.randn(g, m * k, m * k, generator=gen, dtype=torch.float64)
    sigma = root @ root.transpose(1, 2) / (m * k) + 0.1 * torch.eye(m * k, dtype=torch.float64)
    p = torch.randn(g, n, m, rank, generator=gen, dtype=torch.float64)
    system = blueprint_normal_equations(w, p, sigma, chunk=2)
    for r in range(1, rank + 1):
        own = refit_blueprints(w, p[..., :r], sigma)
        assert torch.allclose(solve_blueprints(*system, r), own, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
def test_bsconv_u_candidates_in_a_reuse_table_fit_as_they_do_alone(shared, monkeypatch):
    """BSConv-U's candidate refit (``als_iters=0``) inside the layer's Reuse table (one
    system at full rank, computed once; or, over its size bound, one per rank) gives each
    rank the blueprints it gets alone."""
    from bscompress.compress.data_aware import grouped_weight
    from bscompress.core.plan import LayerPlan
    from bscompress.factorize.memo import Reuse
    from bscompress.methods import bsconv_u, get_method

    if not shared:
        monkeypatch.setattr(bsconv_u, "MAX_SHARED_SYSTEM_BYTES", 0)

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 3, padding=1)  # full rank min(M, K) = 9
    cov = collect_patch_covariances(nn.Sequential(conv), [torch.randn(16, 12, 7, 7)],
                                    ["0"])["0"]
    method = get_method("bsconv-u")
    weight = grouped_weight(conv)
    reuse = Reuse()
    for rank in range(1, 10):
        entry = LayerPlan("0", "Conv2d", method="bsconv-u", ranks={"rank": rank})
        alone, _ = method.build(conv, entry)
        method.fit_data_aware(conv, alone, cov, weight, 0)
        with reuse.active():
            candidate, _ = method.build(conv, entry)
            assert method.fit_data_aware(conv, candidate, cov, weight, 0) == "blueprint refit"
        assert torch.allclose(candidate.dw.weight, alone.dw.weight, rtol=1e-4, atol=1e-5)
        assert torch.equal(candidate.pw.weight, alone.pw.weight)
    systems = [args for fn, args, *_ in reuse.entries
               if fn.__name__ == "blueprint_normal_equations"]
    if shared:
        assert len(systems) == 1 and systems[0][1].shape[-1] == 9  # one, at full rank
    else:
        assert not systems

def test_dsc_fit_with_a_dead_input_channel_keeps_its_kernels_bounded():
    """A channel that is zero on every calibration patch has a zero K×K block of Σ: its
    whitened kernels are normalised (the scale moves to the pointwise), so the pointwise
    refit's Gram matrix stays positive definite (no eigendecomposition fallback) and the
    full-rank block still reproduces the layer on the live channels."""
    from bscompress.compress.data_aware import fit_block
    from bscompress.core.plan import LayerPlan
    from bscompress.factorize.gsvd import conditioning

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).eval()
    data = [torch.randn(8, 4, 6, 6) for _ in range(3)]
    for x in data:
        x[:, 1] = 0  # a dead channel
    cov = collect_patch_covariances(conv, data, [""])[""]
    method = METHODS["dsc"]
    block, _ = method.build(conv, LayerPlan("", "Conv2d", method="dsc", ranks={"rank": 9}))
    with conditioning() as record:
        fit_block(conv, block, cov, 1, method)
    assert record["floored"] <= 1  # the dead channel's own block only, not the Gram matrix
    assert float(block.dw.weight.detach().flatten(1).norm(dim=1).max()) <= 1 + 1e-5
    live = [0, 2, 3]
    dense = block.to_dense().detach()
    assert torch.allclose(dense[:, live], conv.weight.detach()[:, live], atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_held_score_is_the_float64_relative_output_error(groups):
    """The candidates' float32 held-out score agrees with tr(E Σ Eᵀ)/tr(W Σ Wᵀ) in float64
    to 1e-5, on post-ReLU-like inputs whose mean dominates Σ."""
    from bscompress.compress.data_aware import grouped, grouped_weight
    from bscompress.compress.layer_fit import HeldScore
    from bscompress.core.plan import LayerPlan
    from bscompress.factorize.gsvd import relative_output_error

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=groups).eval()
    data = [torch.relu(torch.randn(8, 8, 6, 6) + 2) for _ in range(2)]
    cov = collect_patch_covariances(conv, data, [""])[""]
    block, _ = METHODS["bsconv-u"].build(
        conv, LayerPlan("", "Conv2d", method="bsconv-u", ranks={"rank": 2}))
    oracle = relative_output_error(grouped_weight(conv), grouped(block.to_dense(), groups),
                                   cov.full)
    assert HeldScore.of(conv, cov)(block) == pytest.approx(oracle, rel=1e-5)


@pytest.mark.parametrize("kind", ["conv", "grouped", "linear"])
def test_low_rank_held_out_errors_of_every_rank_are_those_of_its_blocks(kind):
    """``svd``'s held-out errors of all ranks from one product per basis (the budget's
    candidates) are the scores of the blocks themselves, built (truncated SVD) and fitted on
    the other statistics (whitened SVD): the oracle is ``HeldScore`` of each block, for
    every rank up to the full one (error 0) and past it (clipped)."""
    from bscompress.compress.data_aware import fit_block
    from bscompress.compress.layer_fit import HeldScore
    from bscompress.core.plan import LayerPlan
    from bscompress.factorize.memo import Reuse

    torch.manual_seed(0)
    module, shape = {"conv": (nn.Conv2d(12, 10, 1), (16, 12, 5, 5)),
                     "grouped": (nn.Conv2d(12, 10, 1, groups=2), (16, 12, 5, 5)),
                     "linear": (nn.Linear(12, 10), (64, 12))}[kind]
    mix = torch.randn(12, 12)

    def data(seed):
        torch.manual_seed(seed)
        x = torch.randn(shape)
        return [torch.relu(torch.movedim(torch.movedim(x, 1, -1) @ mix, -1, 1) + 0.5)]

    rest, held = (collect_patch_covariances(module, data(s), [""])[""] for s in (1, 2))
    score, method = HeldScore.of(module, held), METHODS["svd"]
    table = Reuse()
    full = 5 if kind == "grouped" else 10  # min(N/g, M/g)
    for rank in (1, 2, 3, 5, 10, 12):
        entry = LayerPlan("", type(module).__name__, method="svd", ranks={"rank": rank})
        free, _ = method.build(module, entry)
        fitted = copy.deepcopy(free)
        fit_block(module, fitted, rest, 0, method)
        with table.active():
            errors = method.held_out_errors(module, entry, rest, score.sigma)
        assert score.relative(errors[0]) == pytest.approx(score(free), rel=1e-4, abs=1e-7)
        assert score.relative(errors[1]) == pytest.approx(score(fitted), rel=1e-4, abs=1e-7)
        if rank >= full:
            assert max(errors) == pytest.approx(0.0, abs=1e-9 * score.total)
    assert table.hits > 0  # the ranks after the first truncate one decomposition


def test_bsconv_u_candidate_fit_refits_the_blueprints_alone():
    """``als_iters=0`` (budget candidates): the SVD's pointwise is kept and the blueprints
    are the exact least-squares fit given it — no worse than the data-free block under Σ."""
    from bscompress.compress.data_aware import fit_block, grouped_weight
    from bscompress.core.plan import LayerPlan
    from bscompress.factorize.gsvd import output_error

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False).eval()
    cov = collect_patch_covariances(conv, [torch.relu(torch.randn(8, 6, 6, 6))], [""])[""]
    method = METHODS["bsconv-u"]
    free, _ = method.build(conv, LayerPlan("", "Conv2d", method="bsconv-u",
                                           ranks={"rank": 2}))
    block = copy.deepcopy(free)
    assert fit_block(conv, block, cov, 0, method) == "blueprint refit"
    assert torch.equal(block.pw.weight, free.pw.weight)
    w = grouped_weight(conv)

    def error(b):
        return output_error(w, b.to_dense().detach().reshape(w.shape), cov.full)

    assert error(block) <= error(free) + 1e-9
    full = copy.deepcopy(free)
    fit_block(conv, full, cov, 1, method)
    assert not torch.equal(full.pw.weight, free.pw.weight)  # the full ALS moves it


def test_in_network_errors_are_measured_on_the_first_samples():
    from bscompress.compress.decomposition import _first_samples

    batches = [torch.zeros(100, 1), torch.ones(100, 1)]
    head = _first_samples(batches, 128)
    assert [len(x) for x in head] == [100, 28] and head[0] is batches[0]
    assert [len(x) for x in _first_samples(batches, 500)] == [100, 100]


def test_in_network_errors_do_not_depend_on_the_chunk_and_count_every_call():
    """``measure_output_errors`` against the errors computed by hand, for a conv that runs
    twice per forward (each call compared with the original's same call), in chunks of 3 and
    of a whole batch."""
    from bscompress.compress.calibrate import measure_output_errors

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    original = Twice().eval()
    compressed = copy.deepcopy(original)
    with torch.no_grad():
        compressed.conv.weight.mul_(0.9)
    data = [torch.randn(5, 3, 6, 6), torch.randn(4, 3, 6, 6)]
    num = den = 0.0
    with torch.no_grad():
        for x in data:
            a1, b1 = original.conv(x), compressed.conv(x)
            a2, b2 = original.conv(torch.relu(a1)), compressed.conv(torch.relu(b1))
            num += float((b1 - a1).square().sum() + (b2 - a2).square().sum())
            den += float(a1.square().sum() + a2.square().sum())
    for chunk in (3, 64):
        errors = measure_output_errors(original, compressed, ["conv"], data, chunk=chunk)
        assert errors["conv"] == pytest.approx(num / den, rel=1e-5)


def test_in_network_error_of_a_linear_on_tokens_and_a_conv_with_bias():
    """A Linear on ``[B, tokens, C]`` (a transformer block's, timm's MobileViT) has its bias
    on the last axis, a conv on the channels: the error's scale subtracts each where it is
    (the token case was an internal error, found by make zoo)."""
    from bscompress.compress.calibrate import measure_output_errors

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(2), nn.Linear(16, 5)).eval()
    compressed = copy.deepcopy(original)
    with torch.no_grad():
        for layer in (compressed[0], compressed[2]):
            layer.weight.mul_(0.9)
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        a0, b0 = original[0](x), compressed[0](x)
        a2, b2 = original[2](a0.flatten(2)), compressed[2](b0.flatten(2))
        expected = {
            "0": float((b0 - a0).square().sum() / (a0 - original[0].bias.view(1, -1, 1, 1))
                       .square().sum()),
            "2": float((b2 - a2).square().sum() / (a2 - original[2].bias).square().sum())}
    errors = measure_output_errors(original, compressed, ["0", "2"], [x])
    assert errors == pytest.approx(expected, rel=1e-5)


def test_noise_floored_keeps_a_definite_sigma_and_lifts_the_noise_of_an_indefinite_one():
    """Oracle: the eigendecomposition. A Σ positive definite with the ridge comes back as
    the same tensor; a rank-3 Σ plus symmetric rounding-size noise comes back with every
    eigenvalue raised by the one rung of the noise ladder (times its mean |diagonal|) that
    clears its most negative eigenvalue and whose rung below does not."""
    from bscompress.factorize.gsvd import NOISE_LADDER, noise_floored

    good = _spd(12, 0)[None]
    same, count = noise_floored(good)
    assert same is good and count == 0
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 3, generator=g, dtype=torch.float64)
    noise = 1e-5 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    sigma = (a @ a.T + noise + noise.T)[None]
    values = torch.linalg.eigvalsh(sigma[0])
    assert values[0] < -1e-6  # indefinite far beyond the ridge (1e-6 × mean diagonal)
    fixed, count = noise_floored(torch.cat([good, sigma]))
    assert count == 1 and torch.equal(fixed[0], good[0])
    lift = torch.linalg.eigvalsh(fixed[1]) - values
    torch.testing.assert_close(lift, lift[:1].expand(12))  # one ridge, added to every one
    rung = float(lift[0]) / float(sigma[0].diagonal().abs().mean())
    assert min(NOISE_LADDER, key=lambda r: abs(r - rung)) == pytest.approx(rung, rel=1e-6)
    assert float(lift[0]) > -values[0] > float(lift[0]) / 10 * (1 - 1e-6)


@pytest.mark.parametrize("method", ["bsconv-u", "dsc", "tucker2"])
def test_full_rank_fits_stay_exact_on_constant_calibration_images(method):
    """All-black images (constant after normalisation): the centred statistics of the layers
    are rounding noise outside a few directions (the borders' zero padding), indefinite well
    beyond the ridge. A fit on them ran off along the negative directions (weight error
    10⁸, negative output errors, the network's outputs wrong by 250 % on the calibration
    images themselves); at full rank the fit must stay exact, its errors non-negative."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    black = torch.tensor([-2.1179, -2.0357, -1.8044]).view(1, 3, 1, 1).expand(16, 3, 32, 32)
    calibration = [black[:8].contiguous(), black[8:].contiguous()]
    reference = model(black)
    full = {"bsconv-u": RankOptions(rank=9, allow_growth=True),
            "dsc": RankOptions(rank=9, allow_growth=True),
            "tucker2": RankOptions(tucker_ranks=1.0, allow_growth=True)}[method]
    compressed, plan = decompose(copy.deepcopy(model), method, (1, 3, 32, 32), full,
                                 Eligibility(min_in_channels=1), calibration=calibration,
                                 holdout=0)
    with torch.no_grad():
        error = float((compressed(black) - reference).norm() / reference.norm())
    assert error < 1e-4, error
    for entry in plan.replaced():
        assert entry.predicted_error < 1e-2 and 0 <= entry.output_error < 1e-6, entry


class _Branchy(nn.Module):
    """Takes ``a`` on inputs of ordinary scale (the shape probe's) and ``b`` on large ones."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.a(x) if x.abs().max() < 1e3 else self.b(x)


def test_a_layer_the_calibration_never_reaches_is_fitted_and_charged_data_free():
    """Its statistics hold no patches: every fit scored 0 on them, so a budget cut it to
    its smallest rank (an ImageNet net's head branch agreed 0% with the original, 25%
    data-free). It is now fitted data-free and charged its weight error."""
    torch.manual_seed(0)
    model = _Branchy().eval()
    data = [1e4 * x for x in _data(5)]
    select = Eligibility(include=("a", "b"), min_in_channels=1)
    _, plan = decompose(copy.deepcopy(model), "tucker2", (1, 4, 10, 10), RankOptions(),
                        select, budget=Budget("macs", 0.7), calibration=data,
                        reestimate_bn=False)
    entries = {e.name: e for e in plan.layers}
    assert entries["a"].method == "tucker2"  # by its data-free fit, no error on no data
    assert entries["a"].fit.endswith("(data-free: the calibration data never reached the "
                                     "layer)")
    assert entries["a"].output_error is None
    assert entries["a"].predicted_error > 0
    assert "data-free" not in (entries["b"].fit or "")


def test_fewer_patches_than_dimensions_with_nothing_held_out_give_the_data_free_fit():
    """Under 8 samples nothing is held out, and a fit on fewer patches than dimensions
    reproduces the calibration outputs at a low rank: its in-sample error says nothing of
    other inputs, and one calibration image made a model far worse than data-free."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    data = [torch.randn(4, 16, 2, 2)]  # 16 patches for 144 dimensions
    select = Eligibility(min_in_channels=1)
    _, plan = decompose(copy.deepcopy(model), "bsconv-u", (1, 16, 2, 2), RankOptions(rank=2),
                        select, calibration=data, reestimate_bn=False)
    for entry in plan.replaced():
        assert "data-free: 16 calibration patches for 144 dimensions" in entry.fit
        assert entry.statistics["patches"] == 16
    enough = [torch.randn(8, 16, 4, 4) for _ in range(2)]  # held out: the held-out data judge
    _, plan = decompose(copy.deepcopy(model), "bsconv-u", (1, 16, 4, 4), RankOptions(rank=2),
                        select, calibration=enough, reestimate_bn=False)
    assert all("data-free:" not in entry.fit for entry in plan.replaced())


def test_a_budget_on_too_few_samples_to_hold_any_out_is_allocated_by_the_weight_errors():
    """Under 8 samples every candidate's in-sample output error is about 0 on the data its
    fit was made on, and ranked the candidates by nothing: EfficientNet-Lite0 on 4 photos at
    90% of its MACs agreed with the original on 24% of other photos (KL 1.83) against 29%
    (0.70) allocated by the weight errors (data-free: 31%, 0.90). The ranks are now the
    data-free allocation's; the blocks are still fitted on the data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    select = Eligibility(min_in_channels=1)
    budget = Budget("macs", 0.4)

    def plan_of(calibration, holdout=HOLDOUT):
        return decompose(copy.deepcopy(model), "auto", (1, 8, 12, 12), RankOptions(), select,
                         budget=budget, calibration=calibration, reestimate_bn=False,
                         holdout=holdout)[1]

    free = plan_of(None)
    few = plan_of([torch.randn(4, 8, 12, 12)])
    ranks = [(e.name, e.method, e.ranks) for e in free.replaced()]
    assert [(e.name, e.method, e.ranks) for e in few.replaced()] == ranks
    assert few.summary.budget.error == FEW_SAMPLES_ERROR
    assert all(e.output_error is not None and "data-free" not in e.fit
               for e in few.replaced())  # fitted on the data all the same
    in_sample = plan_of([torch.randn(4, 8, 12, 12)], holdout=0.0)  # as the user asked
    assert in_sample.summary.budget.error == OUTPUT_ERROR
    enough = plan_of([torch.randn(8, 8, 12, 12) for _ in range(2)])
    assert enough.summary.budget.error == HELD_OUT_ERROR


def test_samples_that_repeat_others_are_left_out_of_the_calibration():
    """16 copies of one photo passed the held-out check (the held-out batches were the same
    image) and the BatchNorm minimum; the copies are now left out and counted, and the
    BatchNorm minimum counts distinct samples."""
    from bscompress.compress.calibrate import distinct_samples

    x = torch.randn(6, 3, 4, 4)
    batches = [torch.cat([x[:3], x[:1]]), torch.cat([x[1:2], x[3:]])]
    kept, repeated = distinct_samples(batches)
    assert repeated == 2 and torch.equal(torch.cat(kept), x)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    copies = [x[:1].repeat(8, 1, 1, 1) for _ in range(2)]
    with pytest.raises(BadInput, match="hold only 1 distinct \\(15 more repeat others\\)"):
        decompose(copy.deepcopy(model), "bsconv-u", (1, 3, 4, 4), RankOptions(rank=1),
                  Eligibility(min_in_channels=1), calibration=copies)
    more = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    _, plan = decompose(copy.deepcopy(model), "bsconv-u", (1, 3, 4, 4), RankOptions(rank=1),
                        Eligibility(min_in_channels=1), calibration=batches + copies + more)
    assert plan.summary.calibration.repeated == 18  # 2 in the batches, the 16 copies of x[0]
