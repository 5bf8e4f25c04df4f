"""Low-rank (truncated SVD) splits of 1×1 convs and Linear layers into two thin layers.

Convention (per group): ``W = U S Vᵀ`` → first layer ``Vᵀ[:r]`` (orthonormal rows), second
layer ``U[:, :r]·diag(S[:r])`` with the original bias. ``‖W − Ŵ‖²_F`` = the dropped S².
See :func:`bscompress.factorize.separable.lowrank_factors`.
"""

from __future__ import annotations

import torch
from torch import nn

from bscompress.factorize.separable import (
    LowRankFactors,
    check_rank,
    clip_rank,
    compose_lowrank,
    lowrank_factors,
    max_rank_lowrank,
)
from bscompress.layers.base import (
    ConvGeometry,
    check_conv,
    copy_bias,
    copy_param,
    pointwise_conv,
    spatial_conv,
)

__all__ = ["LowRankConv1x1", "LowRankLinear"]


def _check_1x1(conv: nn.Module) -> None:
    check_conv(conv)
    if any(k != 1 for k in conv.kernel_size):
        raise ValueError(f"LowRankConv1x1 needs a 1×1 conv, got kernel {tuple(conv.kernel_size)}")


class LowRankConv1x1(nn.Sequential):
    """A 1×1 conv (Conv1d or Conv2d, any groups) split into ``pw1`` → ``pw2`` of rank r per group.

    * ``pw1``: M → g·r, groups g, no bias, carrying the original stride/padding/dilation/
      padding_mode (a 1×1 conv commutes with padding, so this is exact); weight
      ``[g·r, M/g, 1, …]``, orthonormal rows per group after ``from_conv``.
    * ``pw2``: 1×1 conv g·r → N, groups g, with the original bias; weight ``[N, r, 1, …]``.

    Exact at r = ``min(N/g, M/g)`` (a rank above it is clipped).
    """

    def __init__(self, in_channels: int, out_channels: int, geometry: ConvGeometry,
                 groups: int = 1, rank: int = 1, bias: bool = True) -> None:
        super().__init__()
        if any(k != 1 for k in geometry.kernel_size):
            raise ValueError(f"LowRankConv1x1 needs a 1×1 kernel, got {geometry.kernel_size}")
        rank = check_rank(rank)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.rank, self.geometry = groups, rank, geometry
        self.pw1 = spatial_conv(geometry, in_channels, groups * rank, groups=groups, bias=False)
        self.pw2 = pointwise_conv(geometry.dim, groups * rank, out_channels, groups=groups,
                                  bias=bias)

    @classmethod
    def from_factors(cls, factors: LowRankFactors, like: nn.Module) -> LowRankConv1x1:
        """Block holding ``factors`` with the geometry and bias of the 1×1 conv ``like``."""
        _check_1x1(like)
        geometry = ConvGeometry.of(like)
        block = cls(like.in_channels, like.out_channels, geometry, groups=like.groups,
                    rank=factors.rank, bias=like.bias is not None)
        block.to(device=like.weight.device, dtype=like.weight.dtype)
        unit = (1,) * geometry.dim
        copy_param(block.pw1.weight, factors.first.reshape(*factors.first.shape, *unit),
                   "LowRankConv1x1 pw1")
        copy_param(block.pw2.weight, factors.second.reshape(*factors.second.shape, *unit),
                   "LowRankConv1x1 pw2")
        copy_bias(like, block.pw2)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1) -> LowRankConv1x1:
        """Truncated SVD of a trained 1×1 conv (rank clipped to ``min(N/g, M/g)``)."""
        _check_1x1(conv)
        return cls.from_factors(lowrank_factors(conv.weight, rank, conv.groups), conv)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int = 1) -> LowRankConv1x1:
        """The structure ``from_conv(conv, rank)`` would build, without computing weights."""
        _check_1x1(conv)
        r = clip_rank(rank, max_rank_lowrank(conv.weight.shape, conv.groups))
        block = cls(conv.in_channels, conv.out_channels, ConvGeometry.of(conv),
                    groups=conv.groups, rank=r, bias=conv.bias is not None)
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M/g, 1, …]``."""
        first = self.pw1.weight.flatten(1)
        second = self.pw2.weight.flatten(1)
        dense = compose_lowrank(first, second, self.groups)
        return dense.reshape(*dense.shape, *(1,) * self.geometry.dim)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LowRankLinear(nn.Sequential):
    """An ``nn.Linear`` split into ``fc1`` → ``fc2`` of rank r.

    * ``fc1``: M → r, no bias; weight ``[r, M]`` (orthonormal rows after ``from_linear``).
    * ``fc2``: r → N, with the original bias; weight ``[N, r]``.

    Exact at r = ``min(N, M)`` (a rank above it is clipped).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        rank = check_rank(rank)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fc1 = nn.Linear(in_features, rank, bias=False)
        self.fc2 = nn.Linear(rank, out_features, bias=bias)

    @staticmethod
    def _check(linear: nn.Module) -> None:
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{type(linear).__name__}: LowRankLinear needs an nn.Linear")

    @classmethod
    def from_factors(cls, factors: LowRankFactors, like: nn.Module) -> LowRankLinear:
        """Block holding ``factors`` (groups must be 1) with the bias of the Linear ``like``."""
        cls._check(like)
        if factors.groups != 1:
            raise ValueError("LowRankLinear needs ungrouped factors (groups=1)")
        block = cls(like.in_features, like.out_features, rank=factors.rank,
                    bias=like.bias is not None)
        block.to(device=like.weight.device, dtype=like.weight.dtype)
        copy_param(block.fc1.weight, factors.first, "LowRankLinear fc1")
        copy_param(block.fc2.weight, factors.second, "LowRankLinear fc2")
        copy_bias(like, block.fc2)
        return block

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 1) -> LowRankLinear:
        """Truncated SVD of a trained Linear (rank clipped to ``min(N, M)``)."""
        cls._check(linear)
        return cls.from_factors(lowrank_factors(linear.weight, rank), linear)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1) -> LowRankLinear:
        """Alias of :meth:`from_linear` (same name as the conv blocks, for uniform surgery)."""
        return cls.from_linear(conv, rank)

    @classmethod
    def empty_like(cls, linear: nn.Module, rank: int = 1) -> LowRankLinear:
        """The structure ``from_linear(linear, rank)`` would build, without computing weights."""
        cls._check(linear)
        r = clip_rank(rank, max_rank_lowrank(linear.weight.shape))
        block = cls(linear.in_features, linear.out_features, rank=r,
                    bias=linear.bias is not None)
        return block.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M]``."""
        return self.fc2.weight @ self.fc1.weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
