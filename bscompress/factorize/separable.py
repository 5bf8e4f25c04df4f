"""Closed-form SVD factorizations of a trained conv into separable blocks (pure tensor math).

Shapes: a conv weight is ``[N, M/g, *kernel]`` with N output channels, M input channels, g
groups and K = prod(kernel). The factor tensors are returned **already shaped as the weights of
the convs of the block** (1×1 convs carry trailing unit dimensions, one per spatial
dimension), so a block is built by copying them; ``compose_*`` multiply them back into a dense
weight.

Methods:

* **BSConv-U** (:func:`blueprint_factors`), rank r, per output filter n:
  ``A_n = W[n].reshape(M/g, K) = U S Vᵀ``. Pointwise ``M → N·r`` (groups g) whose output
  channel ``n·r + j`` has weights ``S_j·U[:, j]``; depthwise ``N·r → N`` (groups N) whose output
  n sums its r inputs ``n·r … n·r+r−1`` with kernels ``V[:, j]``. Exact at r = min(M/g, K).
* **DSC** (:func:`depthwise_factors`), rank r, per input channel m (in group gi):
  ``B_m = W[gi·N/g:(gi+1)·N/g, m mod M/g].reshape(N/g, K) = U S Vᵀ``. Depthwise ``M → M·r``
  (groups M) with kernels ``V[:, j]`` on channel ``m·r + j``; pointwise ``M·r → N`` (groups g)
  with columns ``S_j·U[:, j]``. Exact at r = min(N/g, K).
* **BSConv-S** (:func:`bsconv_s_factors`): BSConv-U's pointwise matrix P (per group an
  ``(N/g·r) × (M/g)`` matrix) ``= U S Vᵀ`` truncated to M' columns per group:
  ``pw1 = V[:, :M']ᵀ`` (orthonormal rows), ``pw2 = U[:, :M']·diag(S[:M'])``.
* **Low rank** (:func:`lowrank_factors`) for 1×1 convs and Linear, per group:
  ``W_g = U S Vᵀ`` → ``first = V[:, :r]ᵀ`` (orthonormal rows, applied first),
  ``second = U[:, :r]·diag(S[:r])`` (applied second, carries the bias).

Rank convention: a rank above the method's full rank (``max_rank_*``) is **clipped** to the
full rank (the block is then exact); the clipped value is what the factors' ``rank`` holds.
A rank below 1 raises ``ValueError``.

Truncation error: the right factors are orthonormal, so ``‖W − Ŵ‖²_F`` is the sum of the dropped
squared singular values over all rows (filters / channels / groups). Every factorization returns
the full spectrum, so :func:`relative_errors` gives the error of every candidate rank at once.

All SVDs are batched (``torch.linalg.svd(..., full_matrices=False)``) and computed in float64;
the factors are cast back to the weight's dtype, the spectra stay float64.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bscompress.factorize.linalg import thin_svd
from bscompress.factorize.spectra import grouped_view

Shape = Sequence[int]


# --------------------------------------------------------------------------- shapes and ranks


def _shape(weight_or_shape: torch.Tensor | Shape) -> tuple[int, ...]:
    if isinstance(weight_or_shape, torch.Tensor):
        return tuple(weight_or_shape.shape)
    return tuple(int(s) for s in weight_or_shape)


def _conv_dims(shape: tuple[int, ...], groups: int) -> tuple[int, int, int]:
    """``(N, M/g, K)`` of a conv weight shape, checking that groups divide N."""
    if len(shape) < 3:
        raise ValueError(f"expected a conv weight [N, M/g, *kernel], got shape {list(shape)}")
    if groups < 1 or shape[0] % groups:
        raise ValueError(f"{shape[0]} output channels do not split into {groups} groups")
    return shape[0], shape[1], math.prod(shape[2:])


def check_rank(rank: int) -> int:
    """``rank`` as an int (numpy / torch integers accepted); ``ValueError`` unless it is a
    positive integer."""
    try:
        value = operator.index(rank)
    except TypeError:
        value = 0
    if isinstance(rank, bool) or value < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return value


def clip_rank(rank: int, full_rank: int) -> int:
    """``min(rank, full_rank)``; ``ValueError`` when ``rank`` is not a positive integer."""
    return min(check_rank(rank), full_rank)


def max_rank_blueprint(weight_or_shape: torch.Tensor | Shape, groups: int = 1) -> int:
    """Full rank of BSConv-U (and BSConv-S's blueprint step): ``min(M/g, K)``."""
    _, m_g, k = _conv_dims(_shape(weight_or_shape), groups)
    return min(m_g, k)


def max_rank_depthwise(weight_or_shape: torch.Tensor | Shape, groups: int = 1) -> int:
    """Full rank of DSC: ``min(N/g, K)``."""
    n, _, k = _conv_dims(_shape(weight_or_shape), groups)
    return min(n // groups, k)


def max_rank_lowrank(weight_or_shape: torch.Tensor | Shape, groups: int = 1) -> int:
    """Full rank of the low-rank split of ``[N, M/g]`` (or a 1×1 conv weight): ``min(N/g, M/g)``."""
    shape = _shape(weight_or_shape)
    if len(shape) < 2:
        raise ValueError(f"expected a matrix [N, M/g] or a 1×1 conv weight, got {list(shape)}")
    if groups < 1 or shape[0] % groups:
        raise ValueError(f"{shape[0]} output channels do not split into {groups} groups")
    return min(shape[0] // groups, shape[1])


def bsconv_s_mid_channels(
    weight_or_shape: torch.Tensor | Shape, groups: int = 1, rank: int = 1, p: float = 0.25
) -> int:
    """M', the width of BSConv-S's bottleneck **per group**.

    ``ceil(p·M/g)`` (``p·M/g`` rounded to 9 decimals first, so 0.1·30 gives 3, not 4), at least
    1, and at most the rank of the pointwise matrix, ``min(M/g, N/g·r)`` with r the clipped
    blueprint rank (more columns would be zero). Unlike the reference ``bsconv`` package there is
    no ``min_mid_channels=4`` floor.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    n, m_g, _ = _conv_dims(_shape(weight_or_shape), groups)
    r = clip_rank(rank, max_rank_blueprint(weight_or_shape, groups))
    mid = max(1, math.ceil(round(p * m_g, 9)))
    return min(mid, m_g, (n // groups) * r)


# --------------------------------------------------------------------------- spectra


def relative_errors(spectrum: torch.Tensor) -> torch.Tensor:
    """Relative squared truncation error of every rank.

    Args:
        spectrum: ``[rows, k]`` singular values (one row per filter / channel / group).
    Returns:
        ``[k + 1]`` float64; entry r is ``Σ_rows Σ_{j≥r} S_j² / Σ_rows Σ_j S_j²`` for
        r = 0..k (1 at r = 0, 0 at r = k). All zeros for an all-zero spectrum.
    """
    energy = spectrum.detach().to(torch.float64).reshape(-1, spectrum.shape[-1]).square().sum(0)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    total = tail[0]
    if float(total) == 0.0:
        return torch.zeros_like(tail)
    return tail / total


def dropped_energy(spectrum: torch.Tensor, rank: int) -> float:
    """``Σ_rows Σ_{j≥rank} S_j²``: the squared Frobenius error of a rank-``rank`` truncation."""
    return float(spectrum.detach().to(torch.float64)[..., rank:].square().sum())


# --------------------------------------------------------------------------- factor containers


@dataclass
class SeparableFactors:
    """Factors of BSConv-U (``method='bsconv_u'``) or DSC (``method='dsc'``).

    Attributes (r = ``rank``, already clipped; weights in the original weight's dtype):
        method: ``'bsconv_u'`` or ``'dsc'``.
        pointwise: the 1×1 conv weight.
            bsconv_u: ``[N·r, M/g, 1, …]`` (M → N·r, groups g; row ``n·r + j`` = ``S_j·U[:, j]``
            of filter n).
            dsc: ``[N, M/g·r, 1, …]`` (M·r → N, groups g; column ``(m mod M/g)·r + j`` of the
            filters of m's group = ``S_j·U[:, j]`` of channel m).
        depthwise: the spatial conv weight.
            bsconv_u: ``[N, r, *kernel]`` (N·r → N, groups N; ``[n, j]`` = ``V[:, j]`` of
            filter n).
            dsc: ``[M·r, 1, *kernel]`` (M → M·r, groups M; ``[m·r + j, 0]`` = ``V[:, j]`` of
            channel m).
        spectrum: all singular values, float64, descending per row.
            bsconv_u: ``[N, min(M/g, K)]``; dsc: ``[M, min(N/g, K)]``.
        rank: r.
        groups: g of the original conv.
    """

    method: str
    pointwise: torch.Tensor
    depthwise: torch.Tensor
    spectrum: torch.Tensor
    rank: int
    groups: int

    @property
    def full_rank(self) -> int:
        return self.spectrum.shape[-1]

    @property
    def squared_error(self) -> float:
        """``‖W − Ŵ‖²_F`` of this rank: the dropped squared singular values."""
        return dropped_energy(self.spectrum, self.rank)

    @property
    def relative_error(self) -> float:
        """``‖W − Ŵ‖²_F / ‖W‖²_F`` of this rank."""
        return float(relative_errors(self.spectrum)[self.rank])

    def dense(self) -> torch.Tensor:
        """The reconstructed weight ``[N, M/g, *kernel]``."""
        if self.method == "bsconv_u":
            return compose_blueprint(self.pointwise, self.depthwise)
        return compose_depthwise(self.pointwise, self.depthwise, self.groups, self.rank)


@dataclass
class BSConvSFactors:
    """Factors of BSConv-S: pw1 → pw2 → depthwise.

    Attributes (r = ``rank``, M' = ``mid_channels`` per group):
        pw1: ``[g·M', M/g, 1, …]`` (M → g·M', groups g); per group orthonormal rows ``V[:, :M']ᵀ``.
        pw2: ``[N·r, M', 1, …]`` (g·M' → N·r, groups g); per group ``U[:, :M']·diag(S[:M'])``.
        depthwise: ``[N, r, *kernel]``, as in BSConv-U.
        spectrum: BSConv-U's blueprint spectrum ``[N, min(M/g, K)]``, float64.
        pointwise_spectrum: singular values of the pointwise matrix of each group,
            ``[g, min(N/g·r, M/g)]``, float64.
        rank, groups, mid_channels, p.

    The two truncations are orthogonal (the blueprint error lies in the span of the dropped
    ``V`` columns, the bottleneck error in the kept ones), so
    ``‖W − Ŵ‖² = Σ dropped blueprint S² + Σ dropped pointwise S²``.
    """

    pw1: torch.Tensor
    pw2: torch.Tensor
    depthwise: torch.Tensor
    spectrum: torch.Tensor
    pointwise_spectrum: torch.Tensor
    rank: int
    groups: int
    mid_channels: int
    p: float

    @property
    def squared_error(self) -> float:
        """``‖W − Ŵ‖²_F``: dropped blueprint plus dropped pointwise squared singular values."""
        return (dropped_energy(self.spectrum, self.rank)
                + dropped_energy(self.pointwise_spectrum, self.mid_channels))

    @property
    def relative_error(self) -> float:
        """``‖W − Ŵ‖²_F / ‖W‖²_F``."""
        total = float(self.spectrum.square().sum())
        return self.squared_error / total if total else 0.0

    def dense(self) -> torch.Tensor:
        """The reconstructed weight ``[N, M/g, *kernel]``."""
        return compose_bsconv_s(self.pw1, self.pw2, self.depthwise, self.groups)


@dataclass
class LowRankFactors:
    """Factors of a low-rank split of ``[N, M/g]`` (a Linear or a 1×1 conv), per group.

    Attributes (r = ``rank`` per group):
        first: ``[g·r, M/g]``; per group ``V[:, :r]ᵀ`` (orthonormal rows). Applied first.
        second: ``[N, r]``; per group ``U[:, :r]·diag(S[:r])``. Applied second (carries bias).
        spectrum: ``[g, min(N/g, M/g)]``, float64.
        rank, groups.
    """

    first: torch.Tensor
    second: torch.Tensor
    spectrum: torch.Tensor
    rank: int
    groups: int

    @property
    def squared_error(self) -> float:
        return dropped_energy(self.spectrum, self.rank)

    @property
    def relative_error(self) -> float:
        return float(relative_errors(self.spectrum)[self.rank])

    def dense(self) -> torch.Tensor:
        """The reconstructed matrix ``[N, M/g]``."""
        return compose_lowrank(self.first, self.second, self.groups)


# --------------------------------------------------------------------------- factorizations


def _blueprint_svd64(weight: torch.Tensor, groups: int):
    """The per-filter SVD of BSConv-U in float64: U ``[N, M/g, q]``, S ``[N, q]``,
    Vᵀ ``[N, q, K]``."""
    n, m_g, k = _conv_dims(_shape(weight), groups)
    return thin_svd(weight.detach().to(torch.float64).reshape(n, m_g, k))


def _blueprint64(weight: torch.Tensor, groups: int, rank: int):
    """float64 BSConv-U factors: pointwise ``[N, r, M/g]``, depthwise ``[N, r, K]``, S, r."""
    u, s, vh = _blueprint_svd64(weight, groups)
    r = clip_rank(rank, s.shape[1])
    return _blueprint_pointwise(u, s, r), vh[:, :r], s, r


def _blueprint_pointwise(u: torch.Tensor, s: torch.Tensor, r: int) -> torch.Tensor:
    """BSConv-U's pointwise weights ``[N, r, M/g]`` from the blueprint SVD."""
    return (u[:, :, :r] * s[:, None, :r]).transpose(1, 2)


def blueprint_factors(weight: torch.Tensor, groups: int = 1, rank: int = 1) -> SeparableFactors:
    """BSConv-U factors of a conv weight ``[N, M/g, *kernel]`` (see :class:`SeparableFactors`)."""
    pw, dw, s, r = _blueprint64(weight, groups, rank)
    n, m_g, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    unit = (1,) * len(kernel)
    return SeparableFactors(
        method="bsconv_u",
        pointwise=pw.reshape(n * r, m_g, *unit).to(weight.dtype),
        depthwise=dw.reshape(n, r, *kernel).to(weight.dtype),
        spectrum=s, rank=r, groups=groups,
    )


def depthwise_factors(weight: torch.Tensor, groups: int = 1, rank: int = 1) -> SeparableFactors:
    """DSC factors of a conv weight ``[N, M/g, *kernel]`` (see :class:`SeparableFactors`)."""
    n, m_g, k = _conv_dims(_shape(weight), groups)
    n_g, kernel = n // groups, tuple(weight.shape[2:])
    r = clip_rank(rank, min(n_g, k))
    w = grouped_view(weight.detach().to(torch.float64), groups)  # [g, N/g, M/g, K]
    slices = w.permute(0, 2, 1, 3).reshape(groups * m_g, n_g, k)  # [M, N/g, K], m group-major
    u, s, vh = thin_svd(slices)  # [M, N/g, q], [M, q], [M, q, K]
    cols = (u[:, :, :r] * s[:, None, :r]).reshape(groups, m_g, n_g, r)
    pw = cols.permute(0, 2, 1, 3).reshape(n, m_g * r, *(1,) * len(kernel))
    dw = vh[:, :r].reshape(groups * m_g * r, 1, *kernel)
    return SeparableFactors(
        method="dsc", pointwise=pw.to(weight.dtype), depthwise=dw.to(weight.dtype),
        spectrum=s, rank=r, groups=groups,
    )


def bsconv_s_factors(
    weight: torch.Tensor, groups: int = 1, rank: int = 1, p: float = 0.25
) -> BSConvSFactors:
    """BSConv-S factors of a conv weight ``[N, M/g, *kernel]`` (see :class:`BSConvSFactors`).

    M' = :func:`bsconv_s_mid_channels` per group; at ``p = 1`` (M' = rank of P) the bottleneck
    is exact and the block equals BSConv-U of the same rank.
    """
    pw, dw, s, r = _blueprint64(weight, groups, rank)
    n, m_g, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    mid = bsconv_s_mid_channels(weight.shape, groups, rank, p)
    unit = (1,) * len(kernel)
    p_mat = pw.reshape(groups, (n // groups) * r, m_g)  # rows n·r + j, grouped
    u, sp, vh = torch.linalg.svd(p_mat, full_matrices=False)  # [g, Nr/g, q], [g, q], [g, q, M/g]
    pw1 = vh[:, :mid].reshape(groups * mid, m_g, *unit)
    pw2 = (u[:, :, :mid] * sp[:, None, :mid]).reshape(n * r, mid, *unit)
    return BSConvSFactors(
        pw1=pw1.to(weight.dtype), pw2=pw2.to(weight.dtype),
        depthwise=dw.reshape(n, r, *kernel).to(weight.dtype),
        spectrum=s, pointwise_spectrum=sp, rank=r, groups=groups, mid_channels=mid, p=p,
    )


def bsconv_s_relative_errors(weight: torch.Tensor, groups: int = 1, rank: int = 1
                             ) -> torch.Tensor:
    """Relative squared weight error of BSConv-S at blueprint rank ``rank`` for every
    bottleneck width M' = 0..q per group (q = rank of the pointwise matrix).

    Exact, from two spectra: the blueprints of one filter are orthonormal, so the error of
    truncating the pointwise matrix P ``[g, N·r/g, M/g]`` adds to BSConv-U's:
    ``(Σ_{j≥r} S_j² + Σ_g Σ_{q≥M'} σ_q(P_g)²) / ‖W‖²``.

    Returns:
        ``[q + 1]`` float64; entry M' is the error of ``bsconv_s_factors`` with that width.
    """
    return bsconv_s_error_tables(weight, groups, [rank])[0]


def bsconv_s_error_tables(weight: torch.Tensor, groups: int = 1,
                          ranks: Sequence[int] | None = None) -> list[torch.Tensor]:
    """:func:`bsconv_s_relative_errors` for each of ``ranks`` (every blueprint rank by
    default), from one blueprint SVD."""
    n, m_g = weight.shape[0], weight.shape[1]
    u, s, _ = _blueprint_svd64(weight, groups)
    total = s.square().sum()
    tables = []
    for rank in ranks or range(1, s.shape[1] + 1):
        r = clip_rank(rank, s.shape[1])
        if float(total) == 0.0:
            tables.append(torch.zeros(min(m_g, (n // groups) * r) + 1, dtype=torch.float64))
            continue
        pw = _blueprint_pointwise(u, s, r)
        sp = torch.linalg.svdvals(pw.reshape(groups, (n // groups) * r, m_g))  # [g, q]
        energy = sp.square().sum(0)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        tables.append((s[:, r:].square().sum() + tail) / total)
    return tables


def lowrank_factors(matrix: torch.Tensor, rank: int, groups: int = 1) -> LowRankFactors:
    """Low-rank factors of ``[N, M/g]`` (a Linear weight, or a 1×1 conv weight whose trailing
    unit dimensions are dropped), per group (see :class:`LowRankFactors`)."""
    if matrix.ndim > 2:
        if math.prod(matrix.shape[2:]) != 1:
            raise ValueError(f"low-rank split needs a matrix or a 1×1 conv weight, "
                             f"got shape {list(matrix.shape)}")
        matrix = matrix.reshape(matrix.shape[0], matrix.shape[1])
    r = clip_rank(rank, max_rank_lowrank(matrix, groups))
    n, m_g = matrix.shape
    w = matrix.detach().to(torch.float64).reshape(groups, n // groups, m_g)
    u, s, vh = thin_svd(w)  # [g, N/g, q], [g, q], [g, q, M/g]
    first = vh[:, :r].reshape(groups * r, m_g)
    second = (u[:, :, :r] * s[:, None, :r]).reshape(n, r)
    return LowRankFactors(first=first.to(matrix.dtype), second=second.to(matrix.dtype),
                          spectrum=s, rank=r, groups=groups)


# --------------------------------------------------------------------------- reconstruction


def compose_blueprint(pointwise: torch.Tensor, depthwise: torch.Tensor) -> torch.Tensor:
    """Dense weight of pointwise ``[N·r, M/g, 1, …]`` then depthwise ``[N, r, *kernel]``.

    ``W[n, m] = Σ_j pointwise[n·r + j, m] · depthwise[n, j]`` → ``[N, M/g, *kernel]``.
    """
    n, r, kernel = depthwise.shape[0], depthwise.shape[1], tuple(depthwise.shape[2:])
    pw = pointwise.reshape(n, r, pointwise.shape[1])
    dense = torch.einsum("njm,njk->nmk", pw, depthwise.reshape(n, r, -1))
    return dense.reshape(n, pointwise.shape[1], *kernel)


def compose_depthwise(pointwise: torch.Tensor, depthwise: torch.Tensor, groups: int = 1,
                      rank: int = 1) -> torch.Tensor:
    """Dense weight of depthwise ``[M·r, 1, *kernel]`` then pointwise ``[N, M/g·r, 1, …]``
    (groups g) → ``[N, M/g, *kernel]``."""
    n, kernel, r = pointwise.shape[0], tuple(depthwise.shape[2:]), rank
    m_g = pointwise.shape[1] // r
    pw = pointwise.reshape(groups, n // groups, m_g, r)
    dw = depthwise.reshape(groups, m_g, r, -1)
    return torch.einsum("gnmj,gmjk->gnmk", pw, dw).reshape(n, m_g, *kernel)


def compose_bsconv_s(pw1: torch.Tensor, pw2: torch.Tensor, depthwise: torch.Tensor,
                     groups: int = 1) -> torch.Tensor:
    """Dense weight of pw1 ``[g·M', M/g, 1, …]`` → pw2 ``[N·r, M', 1, …]`` → depthwise
    ``[N, r, *kernel]`` → ``[N, M/g, *kernel]``."""
    mid, m_g = pw2.shape[1], pw1.shape[1]
    a = pw1.reshape(groups, mid, m_g)
    b = pw2.reshape(groups, pw2.shape[0] // groups, mid)
    pointwise = torch.bmm(b, a).reshape(pw2.shape[0], m_g, *pw2.shape[2:])
    return compose_blueprint(pointwise, depthwise)


def compose_lowrank(first: torch.Tensor, second: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``[N, M/g]`` from first ``[g·r, M/g]`` and second ``[N, r]`` (per group second @ first)."""
    n, r = second.shape[0], second.shape[1]
    a = first.reshape(groups, r, first.shape[-1])
    b = second.reshape(groups, n // groups, r)
    return torch.bmm(b, a).reshape(n, first.shape[-1])
