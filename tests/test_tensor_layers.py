"""Tucker-2 and CP blocks against independent oracles: the original conv (full-rank Tucker-2),
a fresh dense conv holding ``to_dense()`` (any rank), the reconstruction error computed here,
and singular values of the unfoldings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bscompress.factorize.cp import clip_cp_rank, cp_factors, mttkrp
from bscompress.factorize.tucker import clip_tucker2_ranks, tucker2_factors
from bscompress.layers.tensor import CPConv, Tucker2Conv

N, M = 8, 6  # out, in channels (different, to catch transposes)

# dim, kernel, stride, padding, dilation, groups, bias, padding_mode
GRID = [
    (2, (3, 3), 1, 1, 1, 1, True, "zeros"),
    (2, (5, 3), (2, 1), (2, 1), 1, 1, False, "reflect"),
    (2, (1, 3), 1, "same", (1, 2), 1, True, "replicate"),
    (2, (3, 3), 2, "valid", 2, 2, True, "zeros"),
    (2, (3, 3), (1, 2), 1, 1, 2, True, "circular"),
    (2, (4, 2), 1, "same", 1, 1, False, "reflect"),
    (2, (5, 3), 1, "same", (2, 1), 2, True, "circular"),
    (2, (3, 3), 2, (0, 2), (1, 2), 1, True, "replicate"),
    (1, (3,), 2, 1, 1, 1, True, "reflect"),
    (1, (5,), 1, "same", 2, 2, False, "circular"),
]
IDS = [f"{c[0]}d-k{'x'.join(map(str, c[1]))}-p{c[3]}-{c[7]}-g{c[5]}" for c in GRID]


def make_conv(cfg, dtype=torch.float64, seed=0) -> nn.Module:
    dim, kernel, stride, padding, dilation, groups, bias, mode = cfg
    torch.manual_seed(seed)
    cls = nn.Conv2d if dim == 2 else nn.Conv1d
    conv = cls(M, N, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=bias, padding_mode=mode)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv.to(dtype)


def make_input(conv: nn.Module, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = (11, 13) if len(conv.kernel_size) == 2 else (17,)
    return torch.randn(2, M, *size, generator=g, dtype=conv.weight.dtype)


def dense_oracle(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A fresh dense conv with ``conv``'s geometry holding ``weight`` and ``bias``."""
    cls = type(conv)
    dense = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=bias is not None, padding_mode=conv.padding_mode).to(weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def sq_rel(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    w, w_hat = w.detach().double(), w_hat.detach().double()
    return float((w - w_hat).square().sum() / w.square().sum())


@pytest.mark.parametrize("cfg", GRID, ids=IDS)
def test_tucker2_full_rank_reproduces_the_conv(cfg):
    conv = make_conv(cfg, dtype=torch.float32)
    g = conv.groups
    block = Tucker2Conv.from_conv(conv, (N // g, M // g))
    assert block.pw1.weight.dtype == torch.float32
    x = make_input(conv)
    assert rel(block(x), conv(x)) < 1e-4
    assert block.relative_error < 1e-10


BUILDERS = {
    "tucker2": lambda conv: Tucker2Conv.from_conv(conv, (2, 2), n_iter_max=2),
    "cp3": lambda conv: CPConv.from_conv(conv, 3, "cp3", n_iter_max=20),
    "cp4": lambda conv: CPConv.from_conv(conv, 3, "cp4", n_iter_max=20),
}


@pytest.mark.parametrize("method", list(BUILDERS))
@pytest.mark.parametrize("cfg", GRID, ids=IDS)
def test_block_equals_a_dense_conv_holding_to_dense(cfg, method):
    conv = make_conv(cfg)
    if method == "cp4" and cfg[0] == 1:
        with pytest.raises(ValueError, match="Conv2d|2-D kernel"):
            BUILDERS[method](conv)
        return
    block = BUILDERS[method](conv)
    dense = dense_oracle(conv, block.to_dense(), block.pw2.bias)
    x = make_input(conv)
    y = block(x)
    assert y.shape == conv(x).shape
    assert rel(y, dense(x)) < 1e-10
    # the truncation changed something: the block is not the original conv
    assert rel(y, conv(x)) > 1e-3


@pytest.mark.parametrize(("groups", "ranks", "n_iter"),
                         [(1, (3, 2), 0), (1, (5, 4), 3), (2, (2, 3), 2), (2, (4, 1), 0)])
def test_tucker2_reported_error_is_the_reconstruction_error(groups, ranks, n_iter):
    torch.manual_seed(0)
    w = torch.randn(N, M // groups, 3, 3, dtype=torch.float64)
    f = tucker2_factors(w, ranks, groups=groups, n_iter_max=n_iter)
    assert f.ranks == ranks
    assert f.relative_error == pytest.approx(sq_rel(f.to_tensor(), w), abs=1e-12)
    eye_out, eye_in = torch.eye(ranks[0], dtype=torch.float64), torch.eye(ranks[1]).double()
    for u_out, u_in in zip(f.out_factors, f.in_factors, strict=True):
        torch.testing.assert_close(u_out.T @ u_out, eye_out)
        torch.testing.assert_close(u_in.T @ u_in, eye_in)
    # the layer built from these factors holds the same weight
    conv = nn.Conv2d(M, N, 3, groups=groups, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    block = Tucker2Conv.from_factors(f, like=conv)
    assert block.relative_error == f.relative_error
    assert sq_rel(block.to_dense(), w) == pytest.approx(f.relative_error, abs=1e-12)

    # HOSVD spectra against singular values computed here; bounds of the Tucker-2 error
    total = float(w.square().sum())
    wg = w.reshape(groups, N // groups, M // groups, 9)
    s0 = torch.stack([torch.linalg.svdvals(b.reshape(N // groups, -1)) for b in wg])
    s1 = torch.stack([torch.linalg.svdvals(b.transpose(0, 1).reshape(M // groups, -1))
                      for b in wg])
    torch.testing.assert_close(f.out_spectrum, s0)
    torch.testing.assert_close(f.in_spectrum, s1)
    e0 = float(s0[:, ranks[0]:].square().sum()) / total
    e1 = float(s1[:, ranks[1]:].square().sum()) / total
    assert f.relative_error >= max(e0, e1) - 1e-12
    assert f.relative_error <= e0 + e1 + 1e-12


@pytest.mark.parametrize(("mode", "groups", "rank"),
                         [("cp3", 1, 3), ("cp3", 2, 5), ("cp4", 1, 4), ("cp4", 2, 2)])
def test_cp_reported_error_is_the_reconstruction_error(mode, groups, rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(M, N, (3, 3), groups=groups).double()
    f = cp_factors(conv.weight, rank, mode, groups=groups, n_iter_max=15)
    block = CPConv.from_factors(f, like=conv)
    assert block.rank == rank and block.mode == mode
    expected = sq_rel(block.to_dense(), conv.weight)
    assert 0.0 < expected < 1.0
    assert f.relative_error == pytest.approx(expected, rel=1e-9)
    # λ is folded into the output factor: the other factors have unit-norm columns
    for factor in (f.in_factors, *f.spatial_factors):
        torch.testing.assert_close(factor.norm(dim=1), torch.ones(groups, rank).double())


def _exact_cp_weight(mode: str, rank: int, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(N, rank, generator=g), torch.randn(M, rank, generator=g)
    if mode == "cp3":
        k = torch.randn(9, rank, generator=g)
        w = torch.einsum("nr,mr,kr->nmk", a, b, k)
    else:  # separable kernels h_r w_rᵀ
        h, v = torch.randn(3, rank, generator=g), torch.randn(3, rank, generator=g)
        w = torch.einsum("nr,mr,ir,jr->nmij", a, b, h, v)
    return w.reshape(N, M, 3, 3).double()


@pytest.mark.parametrize("mode", ["cp3", "cp4"])
def test_cp_recovers_a_tensor_of_exact_cp_rank(mode):
    w = _exact_cp_weight(mode, rank=4)
    f = cp_factors(w, 4, mode)  # default iteration budget and tolerance
    assert f.relative_error < 1e-6
    assert sq_rel(f.to_tensor(), w) < 1e-6
    conv = nn.Conv2d(M, N, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    block = CPConv.from_factors(f, like=conv)
    x = make_input(conv)
    assert rel(block(x), conv(x)) < 1e-3


@pytest.mark.parametrize("shape", [(5, 6, 3, 3), (7, 4, 9), (3, 8, 2, 5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_mttkrp_is_the_unfolding_times_the_khatri_rao_product(shape, weighted):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    factors = [torch.randn(d, 4, generator=g, dtype=torch.float64) for d in shape]
    weights = torch.rand(4, generator=g, dtype=torch.float64) if weighted else None
    letters = "abcd"[:len(shape)]
    for mode in range(len(shape)):  # oracle: Σ over the other indices, written out
        others = [i for i in range(len(shape)) if i != mode]
        expected = torch.einsum(f"{letters},{','.join(letters[i] + 'r' for i in others)}"
                                f"->{letters[mode]}r", x, *(factors[i] for i in others))
        if weighted:
            expected = expected * weights
        torch.testing.assert_close(mttkrp(x, (weights, factors), mode), expected)


def test_mttkrp_contracts_the_largest_mode_once_for_the_modes_after_it():
    """Modes 1 and 2 of an ALS sweep contract the same factor of mode 0: computed once (the
    same tensor given back), and again once that factor or the tensor changes."""
    from bscompress.factorize import cp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 5, generator=g, dtype=torch.float64)
    factors = [torch.randn(d, 3, generator=g, dtype=torch.float64) for d in x.shape]
    mttkrp(x, (None, factors), 1)
    first = cp._LAST.entry[3]
    mttkrp(x, (None, factors), 2)
    assert cp._LAST.entry[3] is first
    factors[0].mul_(2.0)  # changed in place: contracted again
    mttkrp(x, (None, factors), 2)
    assert cp._LAST.entry[3] is not first
    torch.testing.assert_close(cp._LAST.entry[3], 2.0 * first)
    cp_factors(x[:, :, None], 2, n_iter_max=2)
    assert cp._LAST.entry is None  # cp_factors lets go of what it contracted


@pytest.mark.parametrize("mode", ["cp3", "cp4"])
def test_cp_with_the_fast_mttkrp_equals_tensorlys_default(mode):
    import tensorly as tl
    from tensorly.decomposition import parafac

    from bscompress.factorize.tucker import left_gram_svd

    torch.manual_seed(0)
    w = torch.randn(N, M, 3, 3, dtype=torch.float64)
    default = tl.tenalg.current_backend().unfolding_dot_khatri_rao
    ours = cp_factors(w, 5, mode, n_iter_max=10, tol=0)
    block = w if mode == "cp4" else w.reshape(N, M, 9)
    with tl.backend_context("pytorch"):
        assert tl.tenalg.current_backend().unfolding_dot_khatri_rao is default  # restored
        weights, factors = parafac(block, 5, n_iter_max=10, init="svd", svd=left_gram_svd,
                                   normalize_factors=True, tol=1e-300, random_state=0)
    torch.testing.assert_close(ours.out_factors[0], factors[0] * weights)
    torch.testing.assert_close(ours.in_factors[0], factors[1])


def test_cp_from_several_threads_leaves_tensorly_as_it_was():
    import threading

    import tensorly as tl

    default = tl.tenalg.current_backend().unfolding_dot_khatri_rao
    w = torch.randn(N, M, 3, 3, generator=torch.Generator().manual_seed(0))
    reference = cp_factors(w, 4, "cp4", n_iter_max=5).relative_error
    errors: list[float] = []
    threads = [threading.Thread(target=lambda: errors.append(
        cp_factors(w, 4, "cp4", n_iter_max=5).relative_error)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [reference] * 4
    assert tl.tenalg.current_backend().unfolding_dot_khatri_rao is default


@pytest.mark.parametrize("mode", ["cp3", "cp4"])
def test_cp_is_seeded(mode):
    torch.manual_seed(0)
    w = torch.randn(N, M, 3, 3)
    # rank 12 > 9 and > 3: the SVD init needs random columns, so the seed matters
    runs = [cp_factors(w, 12, mode, n_iter_max=10, random_state=7) for _ in range(2)]
    for a, b in zip(runs[0].__dict__.values(), runs[1].__dict__.values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, tuple) and isinstance(a[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        else:
            assert a == b


@pytest.mark.parametrize(
    ("cls", "args", "cfg"),
    [
        (Tucker2Conv, ((3, 2),), GRID[0]),
        (Tucker2Conv, ((100, 100),), GRID[4]),  # clipped
        (CPConv, (4, "cp3"), GRID[9]),
        (CPConv, (5, "cp4"), GRID[6]),
        (CPConv, (1000, "cp3"), GRID[0]),  # clipped
    ],
)
def test_empty_like_has_the_structure_of_from_conv(cls, args, cfg):
    conv = make_conv(cfg, dtype=torch.float32)
    built = cls.from_conv(conv, *args, **({"n_iter_max": 3} if cls is CPConv else {}))
    empty = cls.empty_like(conv, *args)
    a, b = built.state_dict(), empty.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    empty.load_state_dict(a)
    x = make_input(conv)
    torch.testing.assert_close(empty(x), built(x))
    assert empty.relative_error is None


def test_state_dict_keys_follow_the_paper():
    conv = make_conv(GRID[0], dtype=torch.float32)
    assert set(Tucker2Conv.empty_like(conv, 2).state_dict()) == {
        "pw1.weight", "core.weight", "pw2.weight", "pw2.bias"}
    assert set(CPConv.empty_like(conv, 2, "cp3").state_dict()) == {
        "pw1.weight", "dw.weight", "pw2.weight", "pw2.bias"}
    assert set(CPConv.empty_like(conv, 2, "cp4").state_dict()) == {
        "pw1.weight", "dw1.weight", "dw2.weight", "pw2.weight", "pw2.bias"}


def test_rank_clipping():
    # Tucker-2: at most N/g and M/g, and the unfolding bounds M/g·K, N/g·K
    assert clip_tucker2_ranks((8, 3, 3, 3), (100, 100), groups=2) == (4, 3)
    assert clip_tucker2_ranks((16, 2, 1, 1), (16, 2)) == (2, 2)
    assert clip_tucker2_ranks((16, 2, 1, 1), 1) == (1, 1)
    # a tall 1×1 conv at the clipped full rank is exact
    conv = nn.Conv2d(2, 16, 1).double()
    block = Tucker2Conv.from_conv(conv, (16, 2))
    assert block.ranks == (2, 2)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert rel(block(x), conv(x)) < 1e-10
    # CP: prod(dims) / max(dims)
    assert clip_cp_rank((8, 6, 3, 3), 1000, "cp3") == 8 * 6 * 9 // 9
    assert clip_cp_rank((8, 6, 3, 3), 1000, "cp4") == 8 * 6 * 3 * 3 // 8
    assert clip_cp_rank((8, 3, 3, 3), 1000, "cp3", groups=2) == 4 * 3 * 9 // 9
    for bad in (0, -1):
        with pytest.raises(ValueError):
            clip_cp_rank((8, 6, 3, 3), bad)
        with pytest.raises(ValueError):
            clip_tucker2_ranks((8, 6, 3, 3), (bad, 1))


def test_cp4_on_conv1d_names_the_reason():
    conv = nn.Conv1d(M, N, 3)
    for call in (lambda: CPConv.from_conv(conv, 2, "cp4"),
                 lambda: CPConv.empty_like(conv, 2, "cp4"),
                 lambda: cp_factors(conv.weight, 2, "cp4")):
        with pytest.raises(ValueError, match="2-D kernel|Conv2d"):
            call()
    with pytest.raises(ValueError, match="mode"):
        cp_factors(conv.weight, 2, "cp5")


def test_from_factors_rejects_factors_of_another_conv():
    conv = make_conv(GRID[0])
    other = nn.Conv2d(M, N, (5, 3)).double()
    with pytest.raises(ValueError, match="do not fit"):
        Tucker2Conv.from_factors(tucker2_factors(other.weight, 2), like=conv)
    with pytest.raises(ValueError, match="do not fit"):
        CPConv.from_factors(cp_factors(other.weight, 2, n_iter_max=2), like=conv)


def test_zero_weight_gives_zero_error_and_the_bias():
    conv = make_conv(GRID[0])
    with torch.no_grad():
        conv.weight.zero_()
    x = make_input(conv)
    for block in (Tucker2Conv.from_conv(conv, 2), CPConv.from_conv(conv, 2, "cp3"),
                  CPConv.from_conv(conv, 2, "cp4")):
        assert block.relative_error == 0.0
        torch.testing.assert_close(block(x), conv(x))
        assert math.isfinite(float(block.to_dense().detach().abs().sum()))


def _rank_deficient_weights() -> dict[str, torch.Tensor]:
    """Weights on which ALS's normal equations go singular at a rank above their CP rank."""
    g = torch.Generator().manual_seed(3)
    pruned = torch.randn(N, M, 3, 3, generator=g, dtype=torch.float64)
    pruned[::2] = 0.0  # half of the filters zero, as in a pruned or dead layer
    return {"equal kernels": torch.ones(N, M, 3, 3, dtype=torch.float64),
            "exact rank 2": _exact_cp_weight("cp4", rank=2),
            "zero filters": pruned}


@pytest.mark.parametrize("precision", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["cp3", "cp4"])
@pytest.mark.parametrize("name", list(_rank_deficient_weights()))
def test_cp_fits_a_weight_of_lower_cp_rank_than_asked(name, mode, precision):
    w = _rank_deficient_weights()[name]
    rank = clip_cp_rank(w.shape, 8, mode)
    f = cp_factors(w, rank, mode, n_iter_max=30, precision=precision)
    assert f.rank == rank
    assert all(bool(t.isfinite().all()) for t in (f.out_factors, f.in_factors,
                                                    *f.spatial_factors))
    assert f.relative_error == pytest.approx(sq_rel(f.to_tensor(), w), rel=1e-6, abs=1e-12)
    if name != "zero filters":  # of CP rank 1 and 2, below the 8 asked: exact
        assert f.relative_error < 1e-6
    else:  # the zero filters add nothing to ‖W‖²: no worse than a rank-4 fit of the live ones
        live = cp_factors(w[1::2], 4, mode, n_iter_max=30)
        assert f.relative_error <= live.relative_error + 1e-3


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_cp_of_a_weight_at_an_extreme_scale_is_that_of_the_weight_at_scale_one(scale):
    conv = make_conv(GRID[0])
    reference = cp_factors(conv.weight, 3, "cp4", n_iter_max=10, precision=torch.float32)
    scaled = cp_factors(conv.weight * scale, 3, "cp4", n_iter_max=10, precision=torch.float32)
    assert scaled.relative_error == pytest.approx(reference.relative_error, rel=1e-3)
    assert rel(scaled.to_tensor() / scale, reference.to_tensor()) < 1e-4


def test_cp_of_a_weight_with_nan_names_it():
    conv = make_conv(GRID[0])
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cp_factors(conv.weight, 2)
