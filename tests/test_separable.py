"""BSConv-U, BSConv-S, DSC and low-rank blocks built in closed form from trained weights.

Oracles: the original conv (full rank), a fresh dense conv holding ``to_dense()`` (reduced
rank), per-filter / per-channel numpy SVD loops (truncation errors), and the reference
``bsconv`` package (layout of BSConv-U / BSConv-S).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from bscompress.factorize.separable import (
    blueprint_factors,
    bsconv_s_factors,
    bsconv_s_mid_channels,
    bsconv_s_relative_errors,
    depthwise_factors,
    lowrank_factors,
    max_rank_blueprint,
    max_rank_depthwise,
    max_rank_lowrank,
    relative_errors,
)
from bscompress.layers.lowrank import LowRankConv1x1, LowRankLinear
from bscompress.layers.separable import BSConvS, BSConvU, DSConv

# --------------------------------------------------------------------------- conv grid

#: (dim, kernel, stride, padding, dilation, groups, bias, padding_mode); channels are drawn below.
_GEOMETRIES = [
    (2, (3, 3), 1, 1, 1, 1, True, "zeros"),
    (2, (5, 3), 2, (2, 1), 1, 2, False, "reflect"),
    (2, (1, 3), 1, "same", 1, 1, True, "replicate"),
    (2, (3, 3), 1, "valid", 1, 4, True, "zeros"),
    (2, (3, 3), (2, 1), 1, 2, 1, False, "circular"),
    (1, (7,), 1, 3, 1, 1, True, "zeros"),
    (1, (7,), 2, "valid", 1, 2, False, "reflect"),
    (1, (7,), 1, "same", 2, 4, True, "circular"),
    (2, (5, 3), 1, "same", (1, 2), 2, True, "zeros"),
    (2, (3, 3), 2, 0, 1, 4, True, "replicate"),
    (2, (1, 3), (1, 2), (0, 1), 1, 2, True, "circular"),
    (2, (3, 3), 1, 1, 1, 1, True, "reflect"),
]


def _draw_configs(seed: int = 20240531) -> list[dict]:
    rng = random.Random(seed)
    configs = []
    for dim, kernel, stride, padding, dilation, groups, bias, mode in _GEOMETRIES:
        m_g, n_g = rng.randint(2, 6), rng.randint(2, 6)
        configs.append(dict(
            dim=dim, in_channels=m_g * groups, out_channels=n_g * groups, kernel_size=kernel,
            stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
            padding_mode=mode, size=rng.randint(9, 12),
        ))
    return configs


CONFIGS = _draw_configs()
CONFIG_IDS = [f"c{i}-{c['dim']}d-g{c['groups']}-{c['padding_mode']}" for i, c in enumerate(CONFIGS)]
CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d}


def make_conv(cfg: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = {k: cfg[k] for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                              "dilation", "groups", "bias", "padding_mode")}
    conv = CONV_CLS[cfg["dim"]](**kw).double()
    with torch.no_grad():  # a trained-looking weight: not i.i.d., so the spectra decay
        low = conv.weight.flatten(1)
        conv.weight.add_(0.3 * low[:, :1].expand_as(low).reshape_as(conv.weight))
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def make_input(cfg: dict, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, cfg["in_channels"]) + (cfg["size"],) * cfg["dim"]
    return torch.randn(shape, generator=g, dtype=torch.float64)


def dense_like(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A fresh conv with ``conv``'s geometry and bias holding ``weight``."""
    dense = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       bias=conv.bias is not None, padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        dense.weight.copy_(weight)
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖²_F``."""
    return float((a - b).detach().square().sum())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------- numpy oracles


def np_blueprint_svals(weight: np.ndarray) -> list[np.ndarray]:
    """Singular values of each filter's M/g × K matrix, one SVD per filter."""
    return [np.linalg.svd(f.reshape(f.shape[0], -1), compute_uv=False) for f in weight]


def np_depthwise_svals(weight: np.ndarray, groups: int) -> list[np.ndarray]:
    """Singular values of each input channel's N/g × K slice, one SVD per channel."""
    n, m_g = weight.shape[:2]
    n_g = n // groups
    out = []
    for gi in range(groups):
        for m in range(m_g):
            block = weight[gi * n_g:(gi + 1) * n_g, m].reshape(n_g, -1)
            out.append(np.linalg.svd(block, compute_uv=False))
    return out


def np_dropped(svals: list[np.ndarray], rank: int) -> float:
    return float(sum((s[rank:] ** 2).sum() for s in svals))


def np_bsconv_s_pointwise_svals(weight: np.ndarray, groups: int, rank: int) -> list[np.ndarray]:
    """Singular values of BSConv-U's pointwise matrix per group, built filter by filter."""
    n, m_g = weight.shape[:2]
    rows = []
    for f in weight:
        u, s, _ = np.linalg.svd(f.reshape(m_g, -1), full_matrices=False)
        rows.extend(s[j] * u[:, j] for j in range(rank))
    p = np.stack(rows).reshape(groups, -1, m_g)
    return [np.linalg.svd(block, compute_uv=False) for block in p]


# --------------------------------------------------------------------------- methods


def _bsconv_u(conv, rank):
    return BSConvU.from_conv(conv, rank=rank)


def _dsc(conv, rank):
    return DSConv.from_conv(conv, rank=rank)


def _bsconv_s_p1(conv, rank):
    return BSConvS.from_conv(conv, rank=rank, p=1.0)


METHODS = {"bsconv-u": _bsconv_u, "dsc": _dsc, "bsconv-s-p1": _bsconv_s_p1}


def full_rank(method: str, conv: nn.Module) -> int:
    if method == "dsc":
        return max_rank_depthwise(conv.weight, conv.groups)
    return max_rank_blueprint(conv.weight, conv.groups)


def oracle_svals(method: str, conv: nn.Module) -> list[np.ndarray]:
    w = conv.weight.detach().numpy()
    if method == "dsc":
        return np_depthwise_svals(w, conv.groups)
    return np_blueprint_svals(w)


# --------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_full_rank_is_exact(method, cfg):
    conv = make_conv(cfg)
    x = make_input(cfg)
    block = METHODS[method](conv, 10**6)  # clipped to the full rank
    assert block.rank == full_rank(method, conv)
    assert rel(block(x), conv(x)) < 1e-4
    assert rel(block.to_dense(), conv.weight) < 1e-10


# --------------------------------------------------------------------------- reduced rank


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_reduced_rank_matches_dense_and_spectrum(method, cfg):
    conv = make_conv(cfg)
    x = make_input(cfg)
    full = full_rank(method, conv)
    svals = oracle_svals(method, conv)
    total = sum(float((s ** 2).sum()) for s in svals)
    for rank in sorted({1, max(1, full - 1)}):
        block = METHODS[method](conv, rank)
        assert block.rank == rank
        dense_w = block.to_dense()
        assert dense_w.shape == conv.weight.shape
        assert rel(block(x), dense_like(conv, dense_w)(x)) < 1e-10
        err = sq_dist(conv.weight, dense_w)
        expected = np_dropped(svals, rank)
        assert err == pytest.approx(expected, rel=1e-8, abs=1e-12)
        assert err / total == pytest.approx(
            float(relative_errors(_spectrum(method, conv, rank))[rank]), rel=1e-8, abs=1e-12)


def _spectrum(method, conv, rank):
    if method == "dsc":
        return depthwise_factors(conv.weight, conv.groups, rank).spectrum
    return blueprint_factors(conv.weight, conv.groups, rank).spectrum


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=CONFIG_IDS[:6])
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_bsconv_s_error_is_blueprint_plus_pointwise(cfg, p):
    conv = make_conv(cfg)
    x = make_input(cfg)
    g, w = conv.groups, conv.weight.detach().numpy()
    rank = 1
    factors = bsconv_s_factors(conv.weight, g, rank=rank, p=p)
    mid = factors.mid_channels
    assert mid == min(max(1, math.ceil(p * w.shape[1])), w.shape[1], w.shape[0] // g * rank)
    block = BSConvS.from_factors(factors, conv)
    dense_w = block.to_dense()
    assert rel(block(x), dense_like(conv, dense_w)(x)) < 1e-10
    err = sq_dist(conv.weight, dense_w)
    expected = (np_dropped(np_blueprint_svals(w), rank)
                + np_dropped(np_bsconv_s_pointwise_svals(w, g, rank), mid))
    assert err == pytest.approx(expected, rel=1e-8)
    assert factors.squared_error == pytest.approx(expected, rel=1e-8)
    assert factors.relative_error == pytest.approx(expected / float(w.__pow__(2).sum()), rel=1e-8)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=CONFIG_IDS[:6])
@pytest.mark.parametrize("rank", [1, 2])
def test_bsconv_s_errors_of_every_width_match_the_dense_block(cfg, rank):
    """The budget allocator's table against the block that is built at each width M'."""
    conv = make_conv(cfg)
    g, m_g = conv.groups, conv.weight.shape[1]
    table = bsconv_s_relative_errors(conv.weight, g, rank)
    total = float(conv.weight.detach().double().square().sum())
    widths = range(1, len(table))
    for mid in widths:
        block = BSConvS.from_conv(conv, rank=rank, p=mid / m_g)
        assert block.mid_channels == mid
        err = sq_dist(conv.weight, block.to_dense()) / total
        assert float(table[mid]) == pytest.approx(err, rel=1e-7, abs=1e-12)
    assert float(table[-1]) == pytest.approx(
        float(relative_errors(blueprint_factors(conv.weight, g, rank).spectrum)[rank]),
        rel=1e-9, abs=1e-12)  # the full width is BSConv-U


def test_relative_errors_every_rank():
    conv = make_conv(CONFIGS[0])
    f = blueprint_factors(conv.weight, rank=1)
    errors = relative_errors(f.spectrum)
    svals = np_blueprint_svals(conv.weight.detach().numpy())
    total = sum(float((s ** 2).sum()) for s in svals)
    assert errors.shape == (f.spectrum.shape[1] + 1,) and errors.dtype == torch.float64
    assert errors[0] == pytest.approx(1.0) and errors[-1] == 0.0
    for r in range(errors.shape[0]):
        assert float(errors[r]) == pytest.approx(np_dropped(svals, r) / total, rel=1e-10)
    assert bool((errors[1:] <= errors[:-1]).all())
    assert f.relative_error == pytest.approx(float(errors[1]))
    assert relative_errors(torch.zeros(3, 4)).abs().sum() == 0


# --------------------------------------------------------------------------- BSConv-S


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[7]], ids=["g1", "g4", "1d-g4"])
def test_bsconv_s_orthogonality(cfg):
    conv = make_conv(cfg)
    block = BSConvS.from_conv(conv, rank=2, p=0.5)
    g, mid = block.groups, block.mid_channels
    w1 = block.pw1.weight.detach().reshape(g, mid, -1)
    eye = torch.eye(mid, dtype=torch.float64)
    assert torch.allclose(w1 @ w1.transpose(1, 2), eye.expand(g, mid, mid), atol=1e-10)
    assert float(block.orthogonality_loss().detach()) < 1e-10

    torch.manual_seed(3)
    with torch.no_grad():
        block.pw1.weight.add_(0.1 * torch.randn_like(block.pw1.weight))
    loss = block.orthogonality_loss()
    pw1 = block.pw1.weight.detach().numpy().reshape(g, mid, -1)
    by_hand = sum(np.sqrt(((a @ a.T - np.eye(mid)) ** 2).sum()) for a in pw1)
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-10)
    loss.backward()
    assert block.pw1.weight.grad is not None and block.pw1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_bsconv_s_folded_execution_matches_the_chain_and_the_dense_conv(cfg):
    """pw2 and the blueprints run as one conv exactly where that costs fewer MACs per output
    position (N·M'·K < N·r·(M'·s + K)), giving the chain's output (and the dense oracle's);
    a replaced pw2 (a modifier) keeps the chain; gradients reach every factor."""
    from torch.utils.flop_counter import FlopCounterMode

    conv, x = make_conv(cfg), make_input(cfg)
    k, stride = math.prod(conv.kernel_size), math.prod(conv.stride)
    seen = set()
    for rank, p in ((1, 0.5), (2, 1.0), (10**6, 1.0), (10**6, 0.25)):
        block = BSConvS.from_conv(conv, rank=rank, p=p)
        mid, r = block.mid_channels, block.rank
        assert block.folded == (mid * k < r * (mid * stride + k))
        seen.add(block.folded)
        dense = dense_like(conv, block.to_dense())
        assert rel(block(x), dense(x)) < 1e-10
        chain = nn.Sequential(*block.children())  # pw1 → pw2 → dw, unfolded
        assert rel(block(x), chain(x)) < 1e-10
        if block.folded:  # fewer MACs, counted on the same input
            counts = []
            for module in (block, chain):
                counter = FlopCounterMode(display=False)
                with counter, torch.no_grad():
                    module(x)
                counts.append(counter.get_total_flops())
            assert counts[0] < counts[1]
            block(x).square().sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in (block.pw1.weight, block.pw2.weight, block.dw.weight))
            block.pw2 = nn.Sequential(block.pw2)  # as a modifier would: the chain runs
            assert rel(block(x), dense(x)) < 1e-10
    assert True in seen  # the full-rank forms fold in every geometry of the grid


def test_bsconv_s_mid_channels_rounding_and_clipping():
    assert bsconv_s_mid_channels((8, 30, 3, 3), p=0.1) == 3  # 0.1·30 is not rounded up to 4
    assert bsconv_s_mid_channels((32, 64, 3, 3), p=0.25) == 16
    assert bsconv_s_mid_channels((8, 64, 3, 3), p=0.25) == 8  # rank of P = N·r = 8
    assert bsconv_s_mid_channels((4, 64, 3, 3), rank=2, p=1.0) == 8  # rank of P = N·r
    assert bsconv_s_mid_channels((8, 16, 3, 3), groups=2, p=0.25) == 4
    with pytest.raises(ValueError):
        bsconv_s_mid_channels((8, 16, 3, 3), p=0.0)


# --------------------------------------------------------------------------- structure


def _all_blocks():
    return [
        (BSConvU, {"rank": 2}), (DSConv, {"rank": 2}), (BSConvS, {"rank": 2, "p": 0.5}),
        (BSConvU, {"rank": 99}), (DSConv, {"rank": 99}), (BSConvS, {"rank": 99, "p": 1.0}),
    ]


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[7]], ids=["2d-g2", "1d-g4"])
@pytest.mark.parametrize("cls,kw", _all_blocks(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_empty_like_matches_from_conv(cls, kw, cfg):
    conv = make_conv(cfg)
    built = cls.from_conv(conv, **kw)
    empty = cls.empty_like(conv, **kw)
    a, b = built.state_dict(), empty.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert empty.rank == built.rank
    empty.load_state_dict(a)
    x = make_input(cfg)
    assert torch.equal(empty(x), built(x))


def test_state_dict_keys_follow_the_paper():
    conv = make_conv(CONFIGS[0])
    assert list(BSConvU.from_conv(conv).state_dict()) == ["pw.weight", "dw.weight", "dw.bias"]
    assert list(DSConv.from_conv(conv).state_dict()) == ["dw.weight", "pw.weight", "pw.bias"]
    assert list(BSConvS.from_conv(conv).state_dict()) == [
        "pw1.weight", "pw2.weight", "dw.weight", "dw.bias"]


def test_rank_validation_and_dtype():
    conv = nn.Conv2d(6, 8, 3, padding=1)  # float32
    f = blueprint_factors(conv.weight, rank=100)
    assert f.rank == 6 and f.pointwise.dtype == torch.float32
    assert f.spectrum.dtype == torch.float64
    assert depthwise_factors(conv.weight, rank=100).rank == 8
    block = BSConvU.from_conv(conv, rank=1)
    assert block.pw.weight.dtype == torch.float32
    x = torch.randn(1, 6, 8, 8)
    assert block(x).shape == conv(x).shape
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            blueprint_factors(conv.weight, rank=bad)
        with pytest.raises(ValueError):
            DSConv.empty_like(conv, rank=bad)
    with pytest.raises(ValueError):
        BSConvU.from_conv(nn.ConvTranspose2d(6, 8, 3))
    with pytest.raises(ValueError):
        BSConvU.from_conv(nn.Conv3d(6, 8, 3))
    with pytest.raises(ValueError):
        DSConv.from_factors(blueprint_factors(conv.weight), conv)
    with pytest.raises(ValueError):
        LowRankConv1x1.from_conv(conv)


# --------------------------------------------------------------------------- low rank


def test_lowrank_linear_full_and_reduced():
    torch.manual_seed(4)
    lin = nn.Linear(12, 7).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    full = LowRankLinear.from_linear(lin, rank=50)
    assert full.rank == max_rank_lowrank(lin.weight) == 7
    assert rel(full(x), lin(x)) < 1e-10
    s = np.linalg.svd(lin.weight.detach().numpy(), compute_uv=False)
    for rank in (1, 3):
        block = LowRankLinear.from_linear(lin, rank=rank)
        dense = nn.Linear(12, 7).double()
        with torch.no_grad():
            dense.weight.copy_(block.to_dense())
            dense.bias.copy_(lin.bias)
        assert rel(block(x), dense(x)) < 1e-10
        err = sq_dist(lin.weight, block.to_dense())
        assert err == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-8)
        fc1 = block.fc1.weight.detach()
        assert torch.allclose(fc1 @ fc1.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    empty = LowRankLinear.empty_like(lin, rank=3)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {
        k: v.shape for k, v in LowRankLinear.from_conv(lin, rank=3).state_dict().items()}
    assert list(empty.state_dict()) == ["fc1.weight", "fc2.weight", "fc2.bias"]
    nobias = nn.Linear(12, 7, bias=False).double()
    assert LowRankLinear.from_linear(nobias, 2).fc2.bias is None


@pytest.mark.parametrize("dim,groups,stride,padding,mode", [
    (2, 1, 1, 0, "zeros"), (2, 2, 2, 1, "zeros"), (1, 4, 1, 1, "reflect"), (2, 2, 1, 2, "circular"),
])
def test_lowrank_conv1x1(dim, groups, stride, padding, mode):
    torch.manual_seed(5)
    conv = CONV_CLS[dim](8, 12, 1, stride=stride, padding=padding, groups=groups,
                         padding_mode=mode).double()
    x = torch.randn((2, 8) + (7,) * dim, dtype=torch.float64)
    full = LowRankConv1x1.from_conv(conv, rank=100)
    assert full.rank == min(12 // groups, 8 // groups)
    assert rel(full(x), conv(x)) < 1e-10
    w = conv.weight.detach().numpy().reshape(groups, 12 // groups, 8 // groups)
    svals = [np.linalg.svd(b, compute_uv=False) for b in w]
    block = LowRankConv1x1.from_conv(conv, rank=1)
    dense_w = block.to_dense()
    assert rel(block(x), dense_like(conv, dense_w)(x)) < 1e-10
    err = sq_dist(conv.weight, dense_w)
    assert err == pytest.approx(np_dropped(svals, 1), rel=1e-8)
    f = lowrank_factors(conv.weight, rank=1, groups=groups)
    assert f.squared_error == pytest.approx(err, rel=1e-8)
    empty = LowRankConv1x1.empty_like(conv, rank=1)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {
        k: v.shape for k, v in block.state_dict().items()}


# --------------------------------------------------------------------------- reference package


def test_matches_reference_bsconv_package():
    import bsconv.pytorch as bsconv  # the reference implementation (dev extra, bsconv==0.4.0)

    torch.manual_seed(6)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1, padding_mode="reflect").double()
    x = torch.randn(2, 16, 10, 10, dtype=torch.float64)

    ours = BSConvU.from_conv(conv, rank=1)
    ref = bsconv.BSConvU(16, 24, 3, stride=2, padding=1, padding_mode="reflect").double()
    assert list(ref.state_dict()) == list(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert rel(ref(x), ours(x)) < 1e-12

    ours_s = BSConvS.from_conv(conv, rank=1, p=0.5)  # M' = 8 ≥ the reference's floor of 4
    ref_s = bsconv.BSConvS(16, 24, 3, stride=2, padding=1, padding_mode="reflect",
                           p=0.5).double()
    assert list(ref_s.state_dict()) == list(ours_s.state_dict())
    ref_s.load_state_dict(ours_s.state_dict())
    assert rel(ref_s(x), ours_s(x)) < 1e-12
    with torch.no_grad():
        ours_s.pw1.weight.add_(0.05 * torch.randn_like(ours_s.pw1.weight))
        ref_s.pw1.weight.copy_(ours_s.pw1.weight)
    ref_loss = float(ref_s._reg_loss().detach())
    assert float(ours_s.orthogonality_loss().detach()) == pytest.approx(ref_loss, rel=1e-6)
