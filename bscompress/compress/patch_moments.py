"""Second moments of a stride-1 conv's input patches without im2col.

A stride-1 conv with a k_h × k_w kernel (dilation d_h, d_w) on its padded input
``x [B, C, H_p, W_p]`` has an output grid O of H_o × W_o positions (H_o = H_p − (k_h − 1)d_h)
and takes at position o the patch of ``x[:, o + a]`` over the taps a = (i·d_h, j·d_w). Between
two maps x and y (the same one for Σ, the original and the compressed network's for the
sequential fit's cross term), the Gram matrix of the patches has, for the taps (a, a'), the
block

    G[a, a'] = Σ_b Σ_{q ∈ a + O} x[b, :, q] y[b, :, q + δ]ᵀ,   δ = a' − a,

a sum over the output grid shifted by a. im2col (``calibrate.patches``) costs
(k_h k_w)² · H_o W_o · C² multiply-adds per image; here one product per offset δ covers
every tap pair with that offset, (2k_h − 1)(2k_w − 1) · H_p W_p · C² in all: 2.5–3× fewer
for a 3×3 kernel on 14²–56² maps. A second moment (x = y) is symmetric, G[a', a] = G[a, a']ᵀ:
the offsets −δ are the transposes of δ, and about half the products are left out.

How: the map is laid out position-major, ``[(H_p·W_p)·B, C]`` with the B images of one
position side by side, so that the rows of the image r₀ ≤ r < r₁ are one contiguous block of
rows and a shift by δ is a shift of the block, both plain views: one matrix product
(K = rows · W_p · B) per offset and row segment, no copy. The row windows [a_h, a_h + H_o)
of the taps cut the rows into segments (the core every window holds, the edge rows some
windows hold), so each tap's window is a sum of segment products. Whole rows also hold the
W_p − W_o columns outside a tap's column window, and, with a column shift, pairs that wrap
into the next row: both lie in those columns, and a small product over them (gathered:
(k_w − 1)d_w · H_o · B rows) is subtracted per tap pair. Margins of zero rows at both ends
keep the wrapped indices inside the buffer.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """A stride-1 conv's patches on its padded input ``[B, C, H_p, W_p]``.

    Attributes:
        kernel: (k_h, k_w); dilation: (d_h, d_w); size: (H_p, W_p), the padded input's.
    """

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    size: tuple[int, int]

    @property
    def out(self) -> tuple[int, int]:
        """(H_o, W_o): the output grid."""
        (kh, kw), (dh, dw), (hp, wp) = self.kernel, self.dilation, self.size
        return hp - (kh - 1) * dh, wp - (kw - 1) * dw

    @property
    def margin(self) -> int:
        """Zero positions kept at both ends of the position-major buffer: a column shift
        wraps at most this far past the first or last position."""
        return (self.kernel[1] - 1) * self.dilation[1]

    @property
    def patches_per_image(self) -> int:
        ho, wo = self.out
        return ho * wo


def position_major(x: torch.Tensor, geometry: Geometry,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """``x [B, C, H_p, W_p]`` less ``shift [C]`` (per channel, padding included) as the
    buffer :func:`patch_gram` takes: ``[(2·margin + H_p·W_p)·B, C]`` float32, row
    ``(margin + r·W_p + s)·B + b`` holding ``x[b, :, r, s] − shift``, zero rows in the
    margins (one copy)."""
    b, c, hp, wp = x.shape
    margin = geometry.margin
    out = x.new_zeros(hp * wp + 2 * margin, b, c, dtype=torch.float32)
    body = out[margin:margin + hp * wp].view(hp, wp, b, c)
    body.copy_(x.permute(2, 3, 0, 1))
    if shift is not None:
        body -= shift.to(body)
    return out.view(-1, c)


def _segments(taps: Sequence[int], length: int) -> list[tuple[int, int]]:
    """The intervals between consecutive edges of the windows ``[t, t + length)``."""
    edges = sorted({edge for t in taps for edge in (t, t + length)})
    return list(itertools.pairwise(edges))


@dataclass(frozen=True)
class _Layout:
    """What :func:`patch_gram` needs of a geometry alone, computed once per geometry: the
    row segments, the segments inside each tap row's window, and, per tap (i, j), the
    buffer positions of its rows outside its column window (the pairs whole rows count
    that the tap does not, wrapped ones included)."""

    segments: list[tuple[int, int]]
    inside: dict[int, list[int]]
    outside: dict[tuple[int, int], torch.Tensor]  # long, on the CPU; the taps with any


@functools.cache
def _layout(geometry: Geometry) -> _Layout:
    (kh, kw), (dh, dw), (_, wp) = geometry.kernel, geometry.dilation, geometry.size
    ho, wo = geometry.out
    rows = [i * dh for i in range(kh)]
    cols = [j * dw for j in range(kw)]
    segments = _segments(rows, ho)
    inside = {i: [k for k, (lo, hi) in enumerate(segments) if lo >= rows[i]
                  and hi <= rows[i] + ho] for i in range(kh)}
    outside = {}
    for i, j in itertools.product(range(kh), range(kw)):
        cut = [s for s in range(wp) if not cols[j] <= s < cols[j] + wo]
        index = [geometry.margin + r * wp + s for r in range(rows[i], rows[i] + ho)
                 for s in cut]
        if index:
            outside[i, j] = torch.tensor(index, dtype=torch.long)
    return _Layout(segments, inside, outside)


def _product(x: torch.Tensor, y: torch.Tensor, groups: int) -> torch.Tensor:
    """``[g, m, m]``: xᵀ y per group of the channel columns of ``x, y [n, g·m]``."""
    if groups == 1:
        return (x.T @ y)[None]
    m = x.shape[1] // groups
    return torch.stack([x[:, k * m:(k + 1) * m].T @ y[:, k * m:(k + 1) * m]
                        for k in range(groups)])


def patch_gram(x: torch.Tensor, y: torch.Tensor, geometry: Geometry, batch: int,
               groups: int = 1) -> torch.Tensor:
    """Σ_b Σ_o p_x(o) p_y(o)ᵀ over the stride-1 patches of two maps, exactly as im2col's
    ``patches(x)ᵀ patches(y)`` (up to float32 rounding).

    Args:
        x, y: the maps as :func:`position_major` buffers of ``batch`` images (the same
            tensor for a second moment: the products of the offsets δ < 0 are then the
            transposes of those of −δ, and are not computed).
        geometry: the conv's kernel, dilation and padded input size.
        groups: g; the channels split into g groups of m = C/g, each with its own Gram.

    Returns:
        ``[g, m·K, m·K]`` float32 (K = k_h k_w), index ``c·K + i·k_w + j`` as ``F.unfold``
        and ``weight.reshape(N, -1)``.
    """
    (kh, kw), (dh, dw), (_, wp) = geometry.kernel, geometry.dilation, geometry.size
    margin, channels = geometry.margin, x.shape[1]
    m = channels // groups
    layout = _layout(geometry)
    segments, inside = layout.segments, layout.inside
    x3, y3 = x.view(-1, batch, channels), y.view(-1, batch, channels)
    outside = {key: index.to(x.device) for key, index in layout.outside.items()}
    strips = {key: x3[index].reshape(-1, channels) for key, index in outside.items()}
    gram = x.new_zeros(groups, m, kh, kw, m, kh, kw)
    # a second moment is symmetric: the offset −δ's blocks are the transposes of δ's
    symmetric = x is y
    for di in range(0 if symmetric else 1 - kh, kh):
        valid_i = [i for i in range(kh) if 0 <= i + di < kh]
        needed = sorted({k for i in valid_i for k in inside[i]})
        for dj in range(1 - kw, kw):
            if symmetric and di == 0 and dj < 0:
                continue
            shift = di * dh * wp + dj * dw  # in positions
            per_segment = {}
            for k in needed:
                lo, hi = segments[k]
                start, stop = (margin + lo * wp) * batch, (margin + hi * wp) * batch
                per_segment[k] = _product(x[start:stop],
                                          y[start + shift * batch:stop + shift * batch], groups)
            for i in valid_i:
                whole = sum(per_segment[k] for k in inside[i])
                for j in (j for j in range(kw) if 0 <= j + dj < kw):
                    block = whole
                    if (i, j) in strips:
                        shifted = y3[outside[i, j] + shift].reshape(-1, channels)
                        block = whole - _product(strips[i, j], shifted, groups)
                    gram[:, :, i, j, :, i + di, j + dj] = block
                    if symmetric and (di, dj) != (0, 0):
                        gram[:, :, i + di, j + dj, :, i, j] = block.transpose(-1, -2)
    size = m * kh * kw
    return gram.view(groups, size, size)


def patch_sum(x: torch.Tensor, geometry: Geometry, batch: int, groups: int = 1
              ) -> torch.Tensor:
    """Σ_b Σ_o p(o) of the map in the :func:`position_major` buffer ``x``: ``[g, m·K]``
    float32, indexed as :func:`patch_gram`."""
    (kh, kw), (dh, dw), (hp, wp) = geometry.kernel, geometry.dilation, geometry.size
    ho, wo = geometry.out
    margin, channels = geometry.margin, x.shape[1]
    image = x.view(-1, batch, channels)[margin:margin + hp * wp].sum(1).view(hp, wp, channels)
    sums = torch.stack([image[i * dh:i * dh + ho, j * dw:j * dw + wo].sum((0, 1))
                        for i in range(kh) for j in range(kw)], dim=1)  # [C, K]
    return sums.reshape(groups, -1)
