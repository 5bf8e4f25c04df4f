"""Separable blocks built in closed form from a trained conv: BSConv-U, BSConv-S and DSC.

Each block is an ``nn.Sequential`` of convs (so ``forward`` is the chain of its children and
state_dict keys read like the paper: ``pw.weight``, ``dw.weight``, ``dw.bias`` …), Conv1d or
Conv2d after the original. Shapes use N output channels, M input channels, g groups, rank r and
K = prod(kernel); see :mod:`bscompress.factorize.separable` for the math.

Constructors:

* ``from_conv(conv, rank=1, …)``: SVD of the trained weight, then ``from_factors``.
* ``from_factors(factors, like)``: copies the factors in and the geometry (stride, padding incl.
  ``'same'``/``'valid'``, dilation, padding_mode) and bias from the original conv ``like``.
* ``empty_like(conv, rank=1, …)``: the same structure without any SVD (weights left at their
  default init), to rebuild a compressed archive before ``load_state_dict``.

A rank above the method's full rank is clipped to it (see ``max_rank_*``), in ``from_conv`` and
``empty_like`` alike, so both give the same structure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bscompress.factorize.separable import (
    BSConvSFactors,
    SeparableFactors,
    blueprint_factors,
    bsconv_s_factors,
    bsconv_s_mid_channels,
    check_rank,
    clip_rank,
    compose_blueprint,
    compose_bsconv_s,
    compose_depthwise,
    depthwise_factors,
    max_rank_blueprint,
    max_rank_depthwise,
)
from bscompress.layers.base import (
    ConvGeometry,
    blueprint_conv,
    check_conv,
    conv_with,
    copy_bias,
    copy_param,
    kernel_weight,
    multiplier_conv,
    pointwise_conv,
)

__all__ = ["BSConvS", "BSConvU", "DSConv"]


class BSConvU(nn.Sequential):
    """Unconstrained blueprint-separable conv of rank r: pointwise ``pw`` then depthwise ``dw``.

    * ``pw``: 1×1 conv M → N·r, groups g, no bias; weight ``[N·r, M/g, 1, …]``.
    * ``dw``: N·r → N, groups N, the original kernel/stride/padding/dilation/padding_mode and
      bias; weight ``[N, r, *kernel]``. Output n sums the r blueprints ``n·r … n·r+r−1``.

    At r = 1, groups = 1 this is exactly ``bsconv.pytorch.BSConvU`` (same children and keys).
    Exact at r = ``min(M/g, K)``.
    """

    def __init__(self, in_channels: int, out_channels: int, geometry: ConvGeometry,
                 groups: int = 1, rank: int = 1, bias: bool = True) -> None:
        super().__init__()
        rank = check_rank(rank)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.rank, self.geometry = groups, rank, geometry
        self.pw = pointwise_conv(geometry.dim, in_channels, out_channels * rank, groups=groups)
        self.dw = blueprint_conv(geometry, out_channels, rank, bias=bias)

    @classmethod
    def from_factors(cls, factors: SeparableFactors, like: nn.Module) -> BSConvU:
        """Block holding BSConv-U ``factors`` with the geometry and bias of the conv ``like``."""
        check_conv(like)
        if factors.method != "bsconv_u":
            raise ValueError(f"BSConvU needs blueprint (bsconv_u) factors, got {factors.method}")
        block = cls(like.in_channels, like.out_channels, ConvGeometry.of(like),
                    groups=like.groups, rank=factors.rank, bias=like.bias is not None)
        block.to(device=like.weight.device, dtype=like.weight.dtype)
        copy_param(block.pw.weight, factors.pointwise, "BSConvU pointwise")
        copy_param(block.dw.weight, factors.depthwise, "BSConvU depthwise")
        copy_bias(like, block.dw)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1) -> BSConvU:
        """Closed-form BSConv-U of a trained conv (rank clipped to ``min(M/g, K)``)."""
        check_conv(conv)
        return cls.from_factors(blueprint_factors(conv.weight, conv.groups, rank), conv)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int = 1) -> BSConvU:
        """The structure ``from_conv(conv, rank)`` would build, without computing weights."""
        check_conv(conv)
        r = clip_rank(rank, max_rank_blueprint(conv.weight.shape, conv.groups))
        block = cls(conv.in_channels, conv.out_channels, ConvGeometry.of(conv),
                    groups=conv.groups, rank=r, bias=conv.bias is not None)
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M/g, *kernel]``."""
        return compose_blueprint(self.pw.weight, kernel_weight(self.dw))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class BSConvS(nn.Sequential):
    """Subspace blueprint-separable conv: ``pw1`` → ``pw2`` → ``dw`` (no activation between).

    * ``pw1``: 1×1 conv M → g·M', groups g, no bias; weight ``[g·M', M/g, 1, …]`` with
      orthonormal rows per group after ``from_conv``.
    * ``pw2``: 1×1 conv g·M' → N·r, groups g, no bias; weight ``[N·r, M', 1, …]``.
    * ``dw``: as in :class:`BSConvU` (N·r → N, groups N, geometry and bias of the original).

    M' = ``mid_channels`` per group (``bsconv_s_mid_channels``: ``ceil(p·M/g)`` clipped to the
    rank of the pointwise matrix). Train with ``alpha * block.orthogonality_loss()`` added to
    the loss (the paper uses alpha = 0.1).

    Execution: with nothing between them, ``pw2`` and the blueprint stage are one k×k conv
    g·M' → N (groups g) of weight ``W'[n, m', k] = Σ_j pw2[n·r+j, m'] · dw[n, j, k]``. The
    block runs that way (:attr:`folded`) when it costs fewer MACs per output position:
    ``N·M'·K`` against ``N·r·(M'·s + K)`` (s = prod(stride): pw2 runs at the input's
    resolution). The chain's N·r-channel map is memory-bound; the folded conv is not
    (docs/benchmarks.md, "Block forms by layer shape"). The parameters, ``to_dense`` and
    the fits are the same either way; a modifier that replaces ``pw2`` or ``dw`` (CondConv,
    fixed kernels) keeps the chain.
    """

    def __init__(self, in_channels: int, out_channels: int, geometry: ConvGeometry,
                 groups: int = 1, rank: int = 1, mid_channels: int = 1, bias: bool = True,
                 p: float | None = None) -> None:
        super().__init__()
        rank = check_rank(rank)
        if mid_channels < 1:
            raise ValueError(f"mid_channels must be at least 1, got {mid_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.rank, self.geometry = groups, rank, geometry
        self.mid_channels, self.p = mid_channels, p
        dim = geometry.dim
        self.pw1 = pointwise_conv(dim, in_channels, groups * mid_channels, groups=groups)
        self.pw2 = pointwise_conv(dim, groups * mid_channels, out_channels * rank, groups=groups)
        self.dw = blueprint_conv(geometry, out_channels, rank, bias=bias)
        k, s = geometry.kernel_numel, math.prod(geometry.stride)
        #: whether ``forward`` runs pw2 and the blueprint stage as one conv (class docstring)
        self.folded = mid_channels * k < rank * (mid_channels * s + k)
        self._chain_types = (type(self.pw2), type(self.dw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, *S]`` → ``[B, N, *S']``: pw1, then pw2 and the blueprints folded into one
        conv where that is cheaper (:attr:`folded`), else the chain."""
        if not self.folded or (type(self.pw2), type(self.dw)) != self._chain_types:
            return super().forward(x)
        n, r, mid = self.out_channels, self.rank, self.mid_channels
        a = self.pw2.weight.reshape(n, r, mid)  # [N, r, M']
        b = self.dw.weight.reshape(n, r, -1)  # [N, r, K]
        weight = torch.einsum("nrm,nrk->nmk", a, b).reshape(n, mid, *self.dw.kernel_size)
        return conv_with(self.dw, self.pw1(x), weight, self.groups)

    @classmethod
    def from_factors(cls, factors: BSConvSFactors, like: nn.Module) -> BSConvS:
        """Block holding BSConv-S ``factors`` with the geometry and bias of the conv ``like``."""
        check_conv(like)
        block = cls(like.in_channels, like.out_channels, ConvGeometry.of(like),
                    groups=like.groups, rank=factors.rank, mid_channels=factors.mid_channels,
                    bias=like.bias is not None, p=factors.p)
        block.to(device=like.weight.device, dtype=like.weight.dtype)
        copy_param(block.pw1.weight, factors.pw1, "BSConvS pw1")
        copy_param(block.pw2.weight, factors.pw2, "BSConvS pw2")
        copy_param(block.dw.weight, factors.depthwise, "BSConvS depthwise")
        copy_bias(like, block.dw)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1, p: float = 0.25) -> BSConvS:
        """Closed-form BSConv-S of a trained conv (blueprint rank clipped to ``min(M/g, K)``)."""
        check_conv(conv)
        return cls.from_factors(bsconv_s_factors(conv.weight, conv.groups, rank, p), conv)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int = 1, p: float = 0.25) -> BSConvS:
        """The structure ``from_conv(conv, rank, p)`` would build, without computing weights."""
        check_conv(conv)
        shape, g = conv.weight.shape, conv.groups
        r = clip_rank(rank, max_rank_blueprint(shape, g))
        mid = bsconv_s_mid_channels(shape, g, r, p)
        block = cls(conv.in_channels, conv.out_channels, ConvGeometry.of(conv), groups=g,
                    rank=r, mid_channels=mid, bias=conv.bias is not None, p=p)
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def orthogonality_loss(self) -> torch.Tensor:
        """``Σ_groups ‖W₁W₁ᵀ − I‖_F`` (Frobenius norm, not squared), W₁ = ``pw1`` weight of a
        group as an ``M' × M/g`` matrix. Multiply by alpha outside (paper: 0.1)."""
        w = self.pw1.weight.reshape(self.groups, self.mid_channels, -1)
        gram = w @ w.transpose(1, 2)
        eye = torch.eye(self.mid_channels, dtype=w.dtype, device=w.device)
        return torch.linalg.matrix_norm(gram - eye, ord="fro").sum()

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M/g, *kernel]``."""
        return compose_bsconv_s(self.pw1.weight, self.pw2.weight, kernel_weight(self.dw),
                                self.groups)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, mid_channels={self.mid_channels}, p={self.p}"
                + ", folded" * self.folded)


class DSConv(nn.Sequential):
    """Depthwise-separable conv from depthwise decomposition: depthwise ``dw`` then ``pw``.

    * ``dw``: M → M·r, groups M (channel multiplier r), the original kernel/stride/padding/
      dilation/padding_mode, no bias; weight ``[M·r, 1, *kernel]``.
    * ``pw``: 1×1 conv M·r → N, groups g, with the original bias; weight ``[N, M/g·r, 1, …]``.

    Exact at r = ``min(N/g, K)``.
    """

    def __init__(self, in_channels: int, out_channels: int, geometry: ConvGeometry,
                 groups: int = 1, rank: int = 1, bias: bool = True) -> None:
        super().__init__()
        rank = check_rank(rank)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.rank, self.geometry = groups, rank, geometry
        self.dw = multiplier_conv(geometry, in_channels, rank)
        self.pw = pointwise_conv(geometry.dim, in_channels * rank, out_channels, groups=groups,
                                 bias=bias)

    @classmethod
    def from_factors(cls, factors: SeparableFactors, like: nn.Module) -> DSConv:
        """Block holding DSC ``factors`` with the geometry and bias of the conv ``like``."""
        check_conv(like)
        if factors.method != "dsc":
            raise ValueError(f"DSConv needs depthwise (dsc) factors, got {factors.method}")
        block = cls(like.in_channels, like.out_channels, ConvGeometry.of(like),
                    groups=like.groups, rank=factors.rank, bias=like.bias is not None)
        block.to(device=like.weight.device, dtype=like.weight.dtype)
        copy_param(block.dw.weight, factors.depthwise, "DSConv depthwise")
        copy_param(block.pw.weight, factors.pointwise, "DSConv pointwise")
        copy_bias(like, block.pw)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1) -> DSConv:
        """Closed-form depthwise decomposition of a trained conv (rank clipped to
        ``min(N/g, K)``)."""
        check_conv(conv)
        return cls.from_factors(depthwise_factors(conv.weight, conv.groups, rank), conv)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int = 1) -> DSConv:
        """The structure ``from_conv(conv, rank)`` would build, without computing weights."""
        check_conv(conv)
        r = clip_rank(rank, max_rank_depthwise(conv.weight.shape, conv.groups))
        block = cls(conv.in_channels, conv.out_channels, ConvGeometry.of(conv),
                    groups=conv.groups, rank=r, bias=conv.bias is not None)
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M/g, *kernel]``."""
        return compose_depthwise(self.pw.weight, kernel_weight(self.dw), self.groups,
                                 self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
