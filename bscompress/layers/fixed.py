"""A depthwise conv in which some channels have fixed kernels (VGNet, Zhang et al. 2022).

:class:`FixedKernelConv` is an ``nn.Conv2d``-like depthwise conv (C in, C·r out, groups C,
channel multiplier r, any stride / padding / dilation / padding_mode, optional bias) whose
C·r kernels are split in two parts:

* ``weight`` — ``nn.Parameter`` ``[L, 1, kh, kw]``, the learnable kernels, for the output
  channels not in ``fixed_indices`` (ascending order);
* ``fixed_weight`` — buffer ``[F, 1, kh, kw]``, the fixed kernels (e.g. a scaled Gaussian,
  Sobel or identity of :mod:`bscompress.factorize.kernel_bank`) of the output channels
  ``fixed_indices`` (ascending order). A buffer: saved in the state_dict, moved by ``.to()``,
  never in ``parameters()``, never given a gradient.

``forward`` gathers the full ``[C·r, 1, kh, kw]`` weight from the two parts (one concatenation
and one index gather by a constant permutation, which export to ONNX as Concat + Gather) and
runs one depthwise conv. With r > 1 the input channels are repeated r times in place first
(as :class:`bscompress.layers.base.MultiplierConv2d`), so the conv is a plain depthwise one.

The structure is the list of fixed output channels only (plain JSON data):
``FixedKernelConv.empty_like(conv, indices)`` rebuilds it before ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.core.padding import PAD_ATTR, Pad, check_pad, pad_input
from bscompress.layers.base import repeat_channels

__all__ = ["FixedKernelConv"]

#: ``{channel: kernel}`` or ``(channels, kernels)``
FixedSpec = Mapping[int, torch.Tensor] | tuple[Sequence[int], torch.Tensor | Sequence[torch.Tensor]]


def _check_depthwise(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise ValueError(f"{type(conv).__name__}: FixedKernelConv replaces an nn.Conv2d")
    if conv.groups != conv.in_channels:
        raise ValueError(
            f"FixedKernelConv needs a depthwise conv (groups = in_channels), got groups="
            f"{conv.groups} with {conv.in_channels} input channels"
        )


def _check_indices(indices: Iterable[int], channels: int) -> list[int]:
    out = [int(i) for i in indices]
    if len(set(out)) != len(out):
        raise ValueError(f"fixed channel indices repeat: {out}")
    bad = [i for i in out if not 0 <= i < channels]
    if bad:
        raise ValueError(f"fixed channel indices {bad} are outside 0…{channels - 1}")
    return sorted(out)


class FixedKernelConv(nn.Module):
    """Depthwise ``Conv2d`` (C → C·r, groups C) with the kernels of ``fixed_indices`` fixed.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode,
        groups: as the original ``nn.Conv2d`` (``groups == in_channels``).
        fixed_indices: the output channels with fixed kernels, ascending (JSON-able list).
        learnable_indices: the others, ascending; row i of ``weight`` is channel
            ``learnable_indices[i]``.
        weight: ``Parameter [L, 1, kh, kw]``. fixed_weight: buffer ``[F, 1, kh, kw]``.
        bias: ``Parameter [C·r]`` or ``None`` (always learnable).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 fixed_indices: Iterable[int] = (), stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
                 bias: bool = True, padding_mode: str = "zeros",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, pad: Pad | None = None) -> None:
        """Structure with default-initialised learnable kernels and zero fixed kernels; use
        ``from_conv`` / ``empty_like``. ``pad``: a zero padding of the input before the conv
        (``F.pad`` amounts or TF ``'same'``; see :mod:`bscompress.core.padding`)."""
        super().__init__()
        if in_channels < 1 or out_channels % in_channels:
            raise ValueError(f"FixedKernelConv: out_channels ({out_channels}) must be a multiple "
                             f"of in_channels ({in_channels})")
        # a throwaway conv on the meta device normalises the geometry exactly like nn.Conv2d
        # (tuples, 'same'/'valid' checks, the padding of non-zero padding modes)
        like = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=in_channels, bias=False,
                         padding_mode=padding_mode, device="meta")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups = in_channels
        self.kernel_size: tuple[int, int] = tuple(like.kernel_size)
        self.stride: tuple[int, int] = tuple(like.stride)
        self.padding = like.padding
        self.dilation: tuple[int, int] = tuple(like.dilation)
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = list(like._reversed_padding_repeated_twice)
        self.bscompress_pad = check_pad(pad, 2)
        self.fixed_indices = _check_indices(fixed_indices, out_channels)
        fixed = set(self.fixed_indices)
        self.learnable_indices = [i for i in range(out_channels) if i not in fixed]
        kw = {"device": device, "dtype": dtype}
        weight = torch.empty(len(self.learnable_indices), 1, *self.kernel_size, **kw)
        # the default init of nn.Conv2d (kaiming uniform, a = √5) over the learnable rows
        fan_in = self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / fan_in**0.5
        nn.init.uniform_(weight, -bound, bound)
        self.weight = nn.Parameter(weight)
        self.register_buffer(
            "fixed_weight", torch.zeros(len(self.fixed_indices), 1, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw).uniform_(-bound, bound)) \
            if bias else None
        # position of every output channel in cat([weight, fixed_weight]): a constant gather
        order = torch.empty(out_channels, dtype=torch.long)
        order[self.learnable_indices] = torch.arange(len(self.learnable_indices))
        order[self.fixed_indices] = torch.arange(len(self.fixed_indices)) + len(
            self.learnable_indices)
        self.register_buffer("order", order.to(device), persistent=False)

    @classmethod
    def empty_like(cls, conv: nn.Module, indices: Iterable[int]) -> FixedKernelConv:
        """The structure ``from_conv(conv, …)`` builds with the fixed channels ``indices``
        (the plain list a Plan records), dtype and device of ``conv``, weights not copied;
        for ``load_state_dict``."""
        _check_depthwise(conv)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), indices,
                   stride=tuple(conv.stride), padding=conv.padding,
                   dilation=tuple(conv.dilation), bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, device=conv.weight.device,
                   dtype=conv.weight.dtype, pad=getattr(conv, PAD_ATTR, None))

    @classmethod
    def from_conv(cls, conv: nn.Module, fixed: FixedSpec) -> FixedKernelConv:
        """The trained depthwise ``conv`` with the kernels of some output channels fixed.

        Args:
            conv: an ``nn.Conv2d`` with ``groups == in_channels`` (any channel multiplier).
            fixed: ``{channel: kernel [kh, kw]}`` or ``(indices, kernels [F, kh, kw])``; a
                kernel may also be ``[1, kh, kw]``. The learnable kernels and the bias are
                copied from ``conv``.
        """
        _check_depthwise(conv)
        if isinstance(fixed, Mapping):
            indices, kernels = list(fixed.keys()), list(fixed.values())
        else:
            indices, kernels = fixed
            indices = [int(i) for i in indices]
        kh, kw = conv.kernel_size
        if isinstance(kernels, torch.Tensor):
            kernels = list(kernels) if len(indices) else []
        if len(kernels) != len(indices):
            raise ValueError(f"{len(indices)} fixed channel indices but {len(kernels)} kernels")
        rows = []
        for i, kernel in zip(indices, kernels, strict=True):
            kernel = torch.as_tensor(kernel).detach()
            if kernel.numel() != kh * kw or kernel.shape[-2:] != (kh, kw):
                raise ValueError(f"fixed kernel of channel {i} has shape {list(kernel.shape)}, "
                                 f"the conv's kernels are {kh}×{kw}")
            rows.append(kernel.reshape(1, kh, kw))
        block = cls.empty_like(conv, indices)
        by_channel = dict(zip([int(i) for i in indices], rows, strict=True))
        with torch.no_grad():
            block.weight.copy_(conv.weight.detach()[block.learnable_indices])
            if block.fixed_indices:
                block.fixed_weight.copy_(torch.stack([by_channel[i]
                                                      for i in block.fixed_indices]))
            if conv.bias is not None:
                block.bias.copy_(conv.bias.detach())
        return block

    @property
    def multiplier(self) -> int:
        """Channel multiplier r = out_channels / in_channels."""
        return self.out_channels // self.in_channels

    def full_weight(self) -> torch.Tensor:
        """The ``[C·r, 1, kh, kw]`` weight (differentiable in ``weight`` only)."""
        if not self.fixed_indices:
            return self.weight
        if not self.learnable_indices:
            return self.fixed_weight
        return torch.cat([self.weight, self.fixed_weight]).index_select(0, self.order)

    def to_dense(self) -> torch.Tensor:
        """The full weight ``[C·r, 1, kh, kw]`` of the equivalent ``nn.Conv2d`` (groups C)."""
        return self.full_weight().detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → ``[B, C·r, H', W']``."""
        r = self.multiplier
        x = pad_input(x, self.bscompress_pad, self.kernel_size, self.stride, self.dilation)
        if r > 1:
            x = repeat_channels(x, r)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, self.full_weight(), self.bias, self.stride, padding, self.dilation,
                        self.out_channels)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, fixed={len(self.fixed_indices)}/{self.out_channels}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.bscompress_pad is not None:
            text += f", pad={self.bscompress_pad!r}"
        if self.bias is None:
            text += ", bias=False"
        return text
