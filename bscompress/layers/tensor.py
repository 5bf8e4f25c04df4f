"""Tensor-decomposition blocks: Tucker-2 and CP (shared-bottleneck) convolutions.

Both replace a trained ``nn.Conv1d`` / ``nn.Conv2d`` (N out, M in, g groups, weight
``W [N, M/g, *kernel]``) by a chain of convs with no nonlinearity in between, so the chain is
one linear map with the dense weight returned by ``to_dense()``:

- :class:`Tucker2Conv` — ``pw1`` 1×1 M→g·R_in (``U_inᵀ``), ``core`` with the original kernel
  g·R_in→g·R_out (carries stride, padding, dilation, padding_mode), ``pw2`` 1×1 g·R_out→N
  (``U_out``, carries the bias). All three are grouped with the conv's g.
- :class:`CPConv` — ``pw1`` 1×1 M→g·R (rows ``b_r``), a depthwise conv over the g·R channels
  (``dw`` with kernels ``K_r`` for cp3; ``dw1`` kh×1 then ``dw2`` 1×kw for cp4, the geometry
  split per axis), ``pw2`` 1×1 g·R→N (columns ``λ_r a_r``, carries the bias). ``pw1``/``pw2``
  are grouped with the conv's g; each group has its own R blueprints.

Only the spatial stage pads; padding a 1×1 conv's output equals applying the 1×1 conv to the
padded input for every padding mode (zeros because the first 1×1 has no bias), so the chain
is exact for ``zeros``, ``reflect``, ``replicate`` and ``circular``. For cp4, padding H then W
(each by its own conv) equals padding both at once for each of these modes, since each mode
remaps the two axes independently. The input padding of a conv subclass that pads in its
``forward`` (``ConvGeometry.pad``: static amounts or TF "same") goes on the spatial stage too
(zeros, after a bias-free 1×1), split per axis for cp4.

Ranks are per group. Factors are computed in float64 and cast to the original conv's
dtype/device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bscompress.factorize.cp import CPFactors, CPMode, clip_cp_rank, cp_factors
from bscompress.factorize.tucker import Tucker2Factors, clip_tucker2_ranks, tucker2_factors
from bscompress.layers.base import (
    ConvGeometry,
    check_conv,
    copy_bias,
    kernel_weight,
    pointwise_conv,
    spatial_conv,
)


def _set(module: nn.Module, weight: Tensor) -> None:
    """Copy ``weight`` (any dtype) into ``module.weight`` with the module's dtype/device."""
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))


class Tucker2Conv(nn.Module):
    """Tucker-2 factorized conv: ``pw1`` (1×1) → ``core`` (original kernel) → ``pw2`` (1×1).

    Shapes (B batch, spatial dims ``*S`` in, ``*S'`` out):
    input ``[B, M, *S]`` → pw1 ``[B, g·R_in, *S]`` → core ``[B, g·R_out, *S']`` →
    pw2 ``[B, N, *S']``. Weights: pw1 ``[g·R_in, M/g, 1…]``, core
    ``[g·R_out, R_in, *kernel]``, pw2 ``[N, R_out, 1…]`` + bias ``[N]``.

    Attributes:
        in_channels, out_channels, groups, kernel_size: those of the original conv.
        ranks: ``(R_out, R_in)`` per group.
        relative_error: ``‖W − Ŵ‖²/‖W‖²`` of the factorization when built by ``from_conv``
            (``None`` otherwise).
    """

    def __init__(self, geometry: ConvGeometry, in_channels: int, out_channels: int,
                 ranks: tuple[int, int], groups: int = 1, bias: bool = True) -> None:
        """Random-initialised structure; use ``from_conv`` / ``from_factors`` / ``empty_like``."""
        super().__init__()
        r_out, r_in = ranks
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = geometry.kernel_size
        self.ranks = (r_out, r_in)
        self.relative_error: float | None = None
        self.pw1 = pointwise_conv(geometry.dim, in_channels, groups * r_in, groups=groups)
        self.core = spatial_conv(geometry, groups * r_in, groups * r_out, groups=groups,
                                 bias=False)
        self.pw2 = pointwise_conv(geometry.dim, groups * r_out, out_channels, groups=groups,
                                  bias=bias)

    @classmethod
    def empty_like(cls, conv: nn.Module, ranks: tuple[int, int] | int) -> Tucker2Conv:
        """The block ``from_conv(conv, ranks)`` would build (same clipped ranks, shapes, dtype
        and device) without factorizing; for loading a state_dict."""
        geometry = check_conv(conv)
        ranks = clip_tucker2_ranks(conv.weight.shape, ranks, conv.groups)
        block = cls(geometry, conv.in_channels, conv.out_channels, ranks, conv.groups,
                    bias=conv.bias is not None)
        return block.to(dtype=conv.weight.dtype, device=conv.weight.device)

    @classmethod
    def from_factors(cls, factors: Tucker2Factors, like: nn.Module) -> Tucker2Conv:
        """The block holding ``factors`` with the geometry and bias of the conv ``like``."""
        geometry = check_conv(like)
        n, m_g = like.weight.shape[:2]
        g = like.groups
        r_out, r_in = factors.ranks
        expected = (g, r_out, r_in, *geometry.kernel_size)
        if tuple(factors.core.shape) != expected or factors.out_factors.shape[1] * g != n \
                or factors.in_factors.shape[1] != m_g:
            raise ValueError(
                f"Tucker-2 factors (core {tuple(factors.core.shape)}) do not fit a conv with "
                f"weight {tuple(like.weight.shape)} and groups={g}"
            )
        block = cls(geometry, like.in_channels, like.out_channels, (r_out, r_in), g,
                    bias=like.bias is not None)
        block = block.to(dtype=like.weight.dtype, device=like.weight.device)
        _set(block.pw1, factors.in_factors.transpose(1, 2))  # [g, R_in, M/g]
        _set(block.core, factors.core)  # [g, R_out, R_in, *k]
        _set(block.pw2, factors.out_factors)  # [g, N/g, R_out]
        copy_bias(like, block.pw2)
        block.relative_error = factors.relative_error
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, ranks: tuple[int, int] | int,
                  **kw: Any) -> Tucker2Conv:
        """Factorize ``conv``'s weight (``tucker2_factors(weight, ranks, groups, **kw)``:
        ``n_iter_max``, ``tol``) and build the block."""
        check_conv(conv)
        factors = tucker2_factors(conv.weight, ranks, groups=conv.groups, **kw)
        return cls.from_factors(factors, like=conv)

    def to_dense(self) -> Tensor:
        """The equivalent dense weight ``[N, M/g, *kernel]`` (bias is ``pw2.bias``)."""
        g, (r_out, r_in) = self.groups, self.ranks
        u_in = self.pw1.weight.reshape(g, r_in, -1)  # [g, R_in, M/g]
        core = self.core.weight.reshape(g, r_out, r_in, -1)  # [g, R_out, R_in, K]
        u_out = self.pw2.weight.reshape(g, -1, r_out)  # [g, N/g, R_out]
        w = torch.einsum("gor,grsk,gsi->goik", u_out, core, u_in)
        return w.reshape(self.out_channels, -1, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, M, *S]`` → ``[B, N, *S']``."""
        return self.pw2(self.core(self.pw1(x)))

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, groups={self.groups}"


def _split_geometry(geometry: ConvGeometry) -> tuple[ConvGeometry, ConvGeometry]:
    """A 2-D geometry as a kh×1 conv (H axis) followed by a 1×kw conv (W axis)."""
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    if isinstance(geometry.padding, str):  # 'same' / 'valid' are per-axis rules
        ph = pw = geometry.padding
    else:
        (ph, pw) = geometry.padding
        ph, pw = (ph, 0), (0, pw)
    mode = geometry.padding_mode
    pad_h = pad_w = geometry.pad  # 'same' is a rule per axis
    if isinstance(geometry.pad, tuple):  # F.pad order: (left, right, top, bottom)
        left, right, top, bottom = geometry.pad
        pad_h = (0, 0, top, bottom) if top or bottom else None
        pad_w = (left, right, 0, 0) if left or right else None
    return (ConvGeometry(2, (kh, 1), (sh, 1), ph, (dh, 1), mode, pad_h),
            ConvGeometry(2, (1, kw), (1, sw), pw, (1, dw), mode, pad_w))


class CPConv(nn.Module):
    """CP factorized conv with a shared bottleneck of R blueprints per group.

    cp3: ``pw1`` (1×1) → ``dw`` (depthwise, original kernel) → ``pw2`` (1×1).
    cp4: ``pw1`` → ``dw1`` (depthwise kh×1) → ``dw2`` (depthwise 1×kw) → ``pw2``.

    Shapes (B batch): input ``[B, M, *S]`` → pw1 ``[B, g·R, *S]`` → depthwise
    ``[B, g·R, *S']`` → pw2 ``[B, N, *S']``. Weights: pw1 ``[g·R, M/g, 1…]``, dw
    ``[g·R, 1, *kernel]`` (dw1 ``[g·R, 1, kh, 1]``, dw2 ``[g·R, 1, 1, kw]``), pw2
    ``[N, R, 1…]`` + bias ``[N]``.

    Attributes:
        in_channels, out_channels, groups, kernel_size: those of the original conv.
        rank: R per group. mode: ``'cp3'`` or ``'cp4'``.
        relative_error: the factorization's ``‖W − Ŵ‖²/‖W‖²`` when built by ``from_conv``
            / ``from_factors`` (``None`` otherwise).
    """

    def __init__(self, geometry: ConvGeometry, in_channels: int, out_channels: int, rank: int,
                 mode: CPMode = "cp3", groups: int = 1, bias: bool = True) -> None:
        """Random-initialised structure; use ``from_conv`` / ``from_factors`` / ``empty_like``."""
        super().__init__()
        if mode == "cp4" and geometry.dim != 2:
            raise ValueError(
                "cp4 separates a kernel into kh×1 and 1×kw convs, which needs a Conv2d; "
                "use cp3 for Conv1d"
            )
        if mode not in ("cp3", "cp4"):
            raise ValueError(f"CP mode must be 'cp3' or 'cp4', got {mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = geometry.kernel_size
        self.rank, self.mode = rank, mode
        self.relative_error: float | None = None
        c = groups * rank
        self.pw1 = pointwise_conv(geometry.dim, in_channels, c, groups=groups)
        if mode == "cp3":
            self.dw = spatial_conv(geometry, c, c, groups=c, bias=False)
        else:
            g_h, g_w = _split_geometry(geometry)
            self.dw1 = spatial_conv(g_h, c, c, groups=c, bias=False)
            self.dw2 = spatial_conv(g_w, c, c, groups=c, bias=False)
        self.pw2 = pointwise_conv(geometry.dim, c, out_channels, groups=groups, bias=bias)

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int, mode: CPMode = "cp3") -> CPConv:
        """The block ``from_conv(conv, rank, mode)`` would build (same clipped rank, shapes,
        dtype and device) without factorizing; for loading a state_dict."""
        geometry = check_conv(conv)
        rank = clip_cp_rank(conv.weight.shape, rank, mode, conv.groups)
        block = cls(geometry, conv.in_channels, conv.out_channels, rank, mode, conv.groups,
                    bias=conv.bias is not None)
        return block.to(dtype=conv.weight.dtype, device=conv.weight.device)

    @classmethod
    def from_factors(cls, factors: CPFactors, like: nn.Module) -> CPConv:
        """The block holding ``factors`` with the geometry and bias of the conv ``like``."""
        geometry = check_conv(like)
        n, m_g = like.weight.shape[:2]
        g, r = like.groups, factors.rank
        if (factors.groups != g or factors.out_factors.shape[1] * g != n
                or factors.in_factors.shape[1] != m_g
                or tuple(factors.kernel_size) != geometry.kernel_size):
            raise ValueError(
                f"CP factors (groups {factors.groups}, out {factors.out_factors.shape[1]}, in "
                f"{factors.in_factors.shape[1]}, kernel {factors.kernel_size}) do not fit a "
                f"conv with weight {tuple(like.weight.shape)} and groups={g}"
            )
        block = cls(geometry, like.in_channels, like.out_channels, r, factors.mode, g,
                    bias=like.bias is not None)
        block = block.to(dtype=like.weight.dtype, device=like.weight.device)
        _set(block.pw1, factors.in_factors.transpose(1, 2))  # [g, R, M/g]
        if factors.mode == "cp3":
            _set(block.dw, factors.kernels())  # [g, R, *kernel]
        else:
            h, w = factors.spatial_factors  # [g, kh, R], [g, kw, R]
            _set(block.dw1, h.transpose(1, 2))
            _set(block.dw2, w.transpose(1, 2))
        _set(block.pw2, factors.out_factors)  # [g, N/g, R]
        copy_bias(like, block.pw2)
        block.relative_error = factors.relative_error
        return block

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, mode: CPMode = "cp3", **kw: Any) -> CPConv:
        """Factorize ``conv``'s weight (``cp_factors(weight, rank, mode, groups, **kw)``:
        ``n_iter_max``, ``random_state``, ``tol``) and build the block."""
        check_conv(conv)
        factors = cp_factors(conv.weight, rank, mode, groups=conv.groups, **kw)
        return cls.from_factors(factors, like=conv)

    def kernels(self) -> Tensor:
        """The depthwise kernels ``[g·R, *kernel]`` (cp4: outer products of dw1 and dw2)."""
        if self.mode == "cp3":
            return kernel_weight(self.dw)[:, 0]
        return torch.einsum("ci,cj->cij", self.dw1.weight[:, 0, :, 0], self.dw2.weight[:, 0, 0])

    def to_dense(self) -> Tensor:
        """The equivalent dense weight ``[N, M/g, *kernel]`` (bias is ``pw2.bias``)."""
        g, r = self.groups, self.rank
        b = self.pw1.weight.reshape(g, r, -1)  # [g, R, M/g]
        k = self.kernels().reshape(g, r, -1)  # [g, R, K]
        a = self.pw2.weight.reshape(g, -1, r)  # [g, N/g, R]
        w = torch.einsum("grm,grk,gnr->gnmk", b, k, a)  # small pair first (left to right)
        return w.reshape(self.out_channels, -1, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, M, *S]`` → ``[B, N, *S']``."""
        x = self.pw1(x)
        x = self.dw(x) if self.mode == "cp3" else self.dw2(self.dw1(x))
        return self.pw2(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, rank={self.rank}, groups={self.groups}"
