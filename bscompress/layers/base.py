"""Helpers shared by the factorized blocks: building Conv1d/Conv2d of the right dimension and
copying a conv's geometry (stride, padding, dilation, padding_mode) onto the spatial stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv except its channels, groups and weights.

    Attributes:
        dim: 1 for Conv1d, 2 for Conv2d.
        kernel_size, stride, dilation: per spatial dimension.
        padding: per spatial dimension, or the string ``'same'`` / ``'valid'``.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
    """

    dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of an ``nn.Conv1d`` / ``nn.Conv2d``."""
        dim = len(conv.kernel_size)
        if dim not in CONV_CLASSES:
            raise ValueError(f"{type(conv).__name__}: only Conv1d and Conv2d are supported")
        return cls(dim, tuple(conv.kernel_size), tuple(conv.stride), conv.padding,
                   tuple(conv.dilation), conv.padding_mode)

    @property
    def kernel_numel(self) -> int:
        """K = prod(kernel_size)."""
        k = 1
        for s in self.kernel_size:
            k *= s
        return k


def spatial_conv(
    geometry: ConvGeometry, in_channels: int, out_channels: int, groups: int, bias: bool
) -> nn.Module:
    """A conv carrying ``geometry`` (the stage of a block that sees the spatial neighbourhood)."""
    cls = CONV_CLASSES[geometry.dim]
    return cls(in_channels, out_channels, geometry.kernel_size, stride=geometry.stride,
               padding=geometry.padding, dilation=geometry.dilation, groups=groups, bias=bias,
               padding_mode=geometry.padding_mode)


def pointwise_conv(dim: int, in_channels: int, out_channels: int, groups: int = 1,
                   bias: bool = False) -> nn.Module:
    """A 1×1 conv (kernel 1 in every spatial dimension)."""
    return CONV_CLASSES[dim](in_channels, out_channels, 1, groups=groups, bias=bias)


def check_conv(conv: nn.Module) -> ConvGeometry:
    """The geometry of ``conv``; ``ValueError`` unless it is an ``nn.Conv1d`` or ``nn.Conv2d``."""
    if not isinstance(conv, tuple(CONV_CLASSES.values())):
        raise ValueError(f"{type(conv).__name__}: only nn.Conv1d and nn.Conv2d can be factorized")
    return ConvGeometry.of(conv)


def copy_param(param: nn.Parameter, value: torch.Tensor, what: str) -> None:
    """Copy ``value`` into ``param`` (no broadcasting: shapes must match exactly)."""
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{what}: factor has shape {list(value.shape)}, "
                         f"the block expects {list(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def copy_bias(like: nn.Module, into: nn.Module) -> None:
    """Copy ``like.bias`` (when present) into ``into.bias``."""
    if like.bias is not None:
        copy_param(into.bias, like.bias.detach(), "bias")
