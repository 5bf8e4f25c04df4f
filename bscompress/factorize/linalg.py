"""Small linear-algebra helpers shared by the factorizations."""

from __future__ import annotations

import torch

from bscompress.factorize.memo import reusable


@reusable
def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` (batched): ``U [..., a, q]``,
    ``S [..., q]``, ``Vᴴ [..., q, b]``; answered from an active ``memo.Reuse`` table when the
    same matrix was decomposed before (every candidate rank of a layer truncates one SVD)."""
    return torch.linalg.svd(matrix, full_matrices=False)


@reusable
def gram_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(A Aᵀ)`` of ``matrix`` A ``[a, b]``: eigenvalues ascending
    ``[a]`` and eigenvectors ``[a, a]`` (reusable like :func:`thin_svd`)."""
    return torch.linalg.eigh(matrix @ matrix.T)


def gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object):
    """Thin SVD through the eigendecomposition of the smaller Gram matrix.

    A drop-in ``svd`` callable for tensorly (``partial_tucker(..., svd=gram_svd)``): the
    unfoldings of a conv weight are short and very wide (N × M·K), where a full SVD spends its
    time on the wide side. Accurate for the leading singular vectors in float64, which is what
    Tucker truncation uses.

    Args:
        matrix: ``[a, b]``.
        n_eigenvecs: how many singular triplets to return (all by default).
    Returns:
        ``U [a, k]``, ``S [k]`` (descending), ``V [k, b]``.
    """
    transpose = matrix.shape[0] > matrix.shape[1]
    a = matrix.T if transpose else matrix
    eigvals, u = gram_eigh(a)
    eigvals, u = eigvals.flip(0).clamp_min(0), u.flip(1)
    s = eigvals.sqrt()
    k = s.shape[0] if n_eigenvecs is None else min(n_eigenvecs, s.shape[0])
    u, s = u[:, :k], s[:k]
    v = (u.T @ a) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return (v.T, s, u.T) if transpose else (u, s, v)


#: the tile width of :func:`self_gram`'s block products: narrower tiles leave out more of
#: the mirrored half but run each product at a lower rate (a 64-wide one at half of a 512-wide
#: one's on this machine's 2 cores)
GRAM_TILE = 512


def self_gram(x: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """``xᵀ x`` per batch entry, ``x [g, P, D]`` → ``[g, D, D]``, symmetric: the columns cut
    into T = ⌈D / tile⌉ tiles, the products of the tiles on and above the diagonal computed
    and the others mirrored from them, (T + 1) / 2T of the multiply-adds of one product
    (5/8 for D = 2048)."""
    d = x.shape[-1]
    count = -(-d // tile)
    if count == 1:
        return x.transpose(-1, -2) @ x
    step = -(-d // count)
    out = x.new_empty(*x.shape[:-2], d, d)
    for i in range(0, d, step):
        left = x[..., i:i + step].transpose(-1, -2)
        for j in range(i, d, step):
            block = left @ x[..., j:j + step]
            out[..., i:i + step, j:j + step] = block
            if j != i:
                out[..., j:j + step, i:i + step] = block.transpose(-1, -2)
    return out


def quadratic_trace(x: torch.Tensor, sym: torch.Tensor, tile: int = GRAM_TILE) -> float:
    """``Σ_g tr(x_g S_g x_gᵀ)`` for ``x [g, N, D]`` and a symmetric ``S [g, D, D]``: the
    columns cut into T = ⌈D / tile⌉ tiles, only the tiles of S on and above the diagonal
    multiplied (each off-diagonal one counted twice), (T + 1) / 2T of the multiply-adds of
    ``x S`` (5/9 for D = 4608); the tile sums added up in float64."""
    d = x.shape[-1]
    count = -(-d // tile)
    if count == 1:
        return float(((x @ sym) * x).sum(dtype=torch.float64))
    step = -(-d // count)
    total = 0.0
    for i in range(0, d, step):
        row = x[..., i:i + step] @ sym[..., i:i + step, i:]  # [g, N, D − i]
        total += float((row[..., :step] * x[..., i:i + step]).sum(dtype=torch.float64))
        if i + step < d:
            total += 2.0 * float((row[..., step:] * x[..., i + step:]).sum(dtype=torch.float64))
    return total
