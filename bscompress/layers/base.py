"""Helpers shared by the factorized blocks: building Conv1d/Conv2d of the right dimension and
copying a conv's geometry (stride, padding, dilation, padding_mode, and the input padding of
a conv subclass that pads in its ``forward``: :mod:`bscompress.core.padding`) onto the
spatial stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.core.padding import PAD_ATTR, PADDED_CONVS, InputPadMixin, Pad, pad_input

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv except its channels, groups and weights.

    Attributes:
        dim: 1 for Conv1d, 2 for Conv2d.
        kernel_size, stride, dilation: per spatial dimension.
        padding: per spatial dimension, or the string ``'same'`` / ``'valid'``.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        pad: a zero padding of the input before the conv (whose ``padding`` is then 0):
            ``F.pad`` amounts or ``'same'`` (TensorFlow's, from the input size); ``None``
            for a plain conv. Read from the ``bscompress_pad`` of the views that
            :func:`bscompress.core.padding.as_plain_conv` makes of conv subclasses.
    """

    dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"
    pad: Pad | None = None

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of an ``nn.Conv1d`` / ``nn.Conv2d``."""
        dim = len(conv.kernel_size)
        if dim not in CONV_CLASSES:
            raise ValueError(f"{type(conv).__name__}: only Conv1d and Conv2d are supported")
        return cls(dim, tuple(conv.kernel_size), tuple(conv.stride), conv.padding,
                   tuple(conv.dilation), conv.padding_mode, getattr(conv, PAD_ATTR, None))

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
    cls = (CONV_CLASSES if geometry.pad is None else PADDED_CONVS)[geometry.dim]
    return _padded(cls(in_channels, out_channels, geometry.kernel_size, stride=geometry.stride,
                       padding=geometry.padding, dilation=geometry.dilation, groups=groups,
                       bias=bias, padding_mode=geometry.padding_mode), geometry)


def _padded(conv: nn.Module, geometry: ConvGeometry) -> nn.Module:
    if geometry.pad is not None:
        setattr(conv, PAD_ATTR, geometry.pad)
    return conv


def _conv_nd(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
             groups: int) -> torch.Tensor:
    """``module``'s convolution (geometry and padding mode) with another weight and groups,
    without bias."""
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    conv = F.conv2d if len(module.kernel_size) == 2 else F.conv1d
    return conv(x, weight, None, module.stride, padding, module.dilation, groups)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x [B, C, H, W]`` is laid out channels-last (and not also contiguous)."""
    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def repeat_channels(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x [B, C, ...]`` with each channel repeated ``r`` times in place (channel ``c·r + j``
    is ``x[:, c]``), in ``x``'s layout. ``repeat_interleave`` writes a contiguous (NCHW)
    tensor: after it, PyTorch's CPU convs run a channels-last network in NCHW, a depthwise
    conv of 64·4 channels on 56² maps 2.5× slower, and every layer downstream with it."""
    if _channels_last(x):
        return x.permute(0, 2, 3, 1).repeat_interleave(r, 3).permute(0, 3, 1, 2)
    return x.repeat_interleave(r, 1)


def sum_channel_groups(y: torch.Tensor, groups: int) -> torch.Tensor:
    """``y [B, G·r, ...]`` → ``[B, G, ...]``: the sum of each run of r consecutive
    channels, in ``y``'s layout (a reduction over an unflattened channel axis writes NCHW)."""
    if _channels_last(y):
        return y.permute(0, 2, 3, 1).unflatten(3, (groups, -1)).sum(4).permute(0, 3, 1, 2)
    return y.unflatten(1, (groups, -1)).sum(2)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.reshape(1, -1, *([1] * (y.dim() - 2)))


def conv_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
              groups: int) -> torch.Tensor:
    """``module``'s whole convolution of ``x`` (the input padding of a padded conv class,
    geometry, padding mode and bias) with another ``weight`` and ``groups``."""
    pad = getattr(module, PAD_ATTR, None)
    if pad is not None:
        x = pad_input(x, pad, module.kernel_size, module.stride, module.dilation)
    return _add_bias(_conv_nd(module, x, weight, groups), module.bias)


class _BlueprintSum:
    """Forward of a blueprint stage ``N·r → N, groups N``, run as a depthwise conv then a sum.

    Output n is ``Σ_j blueprint_{n·r+j} ⋆ x_{n·r+j}``. A grouped conv with r input channels per
    group takes a slow generic path in ONNX Runtime and oneDNN; the same numbers computed as a
    depthwise conv ``N·r → N·r`` (each blueprint on its own channel) followed by a sum over
    the r channels of each group are 1.3–5× faster (docs/experiments.md). The weight keeps the
    ``[N, r, *kernel]`` layout of a grouped conv, so state dicts and ``to_dense`` are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, r = self.out_channels, self.in_channels // self.groups
        if r == 1 or self.groups != n:
            return super().forward(x)
        y = _conv_nd(self, x, self.weight.reshape(n * r, 1, *self.kernel_size), n * r)
        return _add_bias(sum_channel_groups(y, n), self.bias)


class _ChannelMultiplier:
    """Forward of a depthwise stage with channel multiplier r (``M → M·r, groups M``), run as
    a plain depthwise conv on the input channels repeated r times (each in place), which ONNX
    Runtime runs 1.4–3× faster than the grouped form. Weight ``[M·r, 1, *kernel]`` as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, r = self.in_channels, self.out_channels // self.groups
        if r == 1 or self.groups != m:
            return super().forward(x)
        return _add_bias(_conv_nd(self, repeat_channels(x, r), self.weight, m * r),
                         self.bias)


class BlueprintConv1d(_BlueprintSum, nn.Conv1d):
    """``nn.Conv1d`` for the blueprint stage of a BSConv block (see ``_BlueprintSum``)."""


class BlueprintConv2d(_BlueprintSum, nn.Conv2d):
    """``nn.Conv2d`` for the blueprint stage of a BSConv block (see ``_BlueprintSum``)."""


class MultiplierConv1d(_ChannelMultiplier, nn.Conv1d):
    """``nn.Conv1d`` for the depthwise stage of a DSC block (see ``_ChannelMultiplier``)."""


class MultiplierConv2d(_ChannelMultiplier, nn.Conv2d):
    """``nn.Conv2d`` for the depthwise stage of a DSC block (see ``_ChannelMultiplier``)."""


class PaddedBlueprintConv1d(InputPadMixin, BlueprintConv1d):
    """:class:`BlueprintConv1d` after a zero padding of its input (static or TF "same")."""


class PaddedBlueprintConv2d(InputPadMixin, BlueprintConv2d):
    """:class:`BlueprintConv2d` after a zero padding of its input (static or TF "same")."""


class PaddedMultiplierConv1d(InputPadMixin, MultiplierConv1d):
    """:class:`MultiplierConv1d` after a zero padding of its input (static or TF "same")."""


class PaddedMultiplierConv2d(InputPadMixin, MultiplierConv2d):
    """:class:`MultiplierConv2d` after a zero padding of its input (static or TF "same")."""


def blueprint_conv(geometry: ConvGeometry, out_channels: int, rank: int,
                   bias: bool) -> nn.Module:
    """The blueprint stage ``N·r → N``, groups N, carrying ``geometry``; weight
    ``[N, r, *kernel]``; output n sums the r blueprints ``n·r … n·r+r−1``."""
    classes = ({1: BlueprintConv1d, 2: BlueprintConv2d} if geometry.pad is None else
               {1: PaddedBlueprintConv1d, 2: PaddedBlueprintConv2d})
    return _padded(classes[geometry.dim](
        out_channels * rank, out_channels, geometry.kernel_size, stride=geometry.stride,
        padding=geometry.padding, dilation=geometry.dilation, groups=out_channels, bias=bias,
        padding_mode=geometry.padding_mode), geometry)


def multiplier_conv(geometry: ConvGeometry, in_channels: int, rank: int,
                    bias: bool = False) -> nn.Module:
    """The depthwise stage ``M → M·r``, groups M (channel multiplier r), carrying
    ``geometry``; weight ``[M·r, 1, *kernel]``; output channels ``m·r … m·r+r−1`` see input m."""
    classes = ({1: MultiplierConv1d, 2: MultiplierConv2d} if geometry.pad is None else
               {1: PaddedMultiplierConv1d, 2: PaddedMultiplierConv2d})
    return _padded(classes[geometry.dim](
        in_channels, in_channels * rank, geometry.kernel_size, stride=geometry.stride,
        padding=geometry.padding, dilation=geometry.dilation, groups=in_channels, bias=bias,
        padding_mode=geometry.padding_mode), geometry)


def pointwise_conv(dim: int, in_channels: int, out_channels: int, groups: int = 1,
                   bias: bool = False) -> nn.Module:
    """A 1×1 conv (kernel 1 in every spatial dimension)."""
    return CONV_CLASSES[dim](in_channels, out_channels, 1, groups=groups, bias=bias)


def check_conv(conv: nn.Module) -> ConvGeometry:
    """The geometry of ``conv``; ``ValueError`` unless it is an ``nn.Conv1d`` or ``nn.Conv2d``."""
    if not isinstance(conv, tuple(CONV_CLASSES.values())):
        raise ValueError(f"{type(conv).__name__}: only nn.Conv1d and nn.Conv2d can be factorized")
    return ConvGeometry.of(conv)


def kernel_weight(conv: nn.Module) -> torch.Tensor:
    """The whole weight of a block's stage: ``conv.weight``, or for a stage whose kernels are
    partly fixed (``FixedKernelConv``) its fixed and learnable kernels put together."""
    full = getattr(conv, "full_weight", None)
    return full() if callable(full) else conv.weight


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
