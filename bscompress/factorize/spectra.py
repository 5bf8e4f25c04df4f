"""Singular-value spectra of conv kernels: how separable a trained layer is.

These are the analyses of the BSConv paper (intra-kernel correlations: per-filter SVD) and of
depthwise decomposition (per-input-channel SVD). The fraction of ‖W‖² kept by a rank-r
truncation is Σ_{j<r} S_j² / Σ S_j², summed over all filters (or channels), so the dropped
energy of every candidate rank is known before any module is built.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from bscompress.factorize.linalg import gram_svd


def grouped_view(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[N, M/g, *kernel]`` → ``[g, N/g, M/g, K]``: the weight of each group of a conv."""
    n, m_per_group = weight.shape[:2]
    if n % groups:
        raise ValueError(f"{n} output channels do not split into {groups} groups")
    return weight.reshape(groups, n // groups, m_per_group, -1)


def blueprint_spectrum(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Singular values of every filter's ``M/g × K`` matrix (BSConv's blueprints).

    Args:
        weight: ``[N, M/g, *kernel]``.
    Returns:
        ``[N, min(M/g, K)]``, float64, descending per row.
    """
    n, m_per_group = weight.shape[:2]
    filters = weight.detach().to(torch.float64).reshape(n, m_per_group, -1)
    return torch.linalg.svdvals(filters)


def depthwise_spectrum(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Singular values of every input channel's ``N/g × K`` slice (depthwise decomposition).

    Args:
        weight: ``[N, M/g, *kernel]``.
    Returns:
        ``[M, min(N/g, K)]``, float64, descending per row; channel order is group-major.
    """
    w = grouped_view(weight.detach().to(torch.float64), groups)  # [g, N/g, M/g, K]
    g, n_g, m_g, k = w.shape
    slices = w.permute(0, 2, 1, 3).reshape(g * m_g, n_g, k)
    return torch.linalg.svdvals(slices)


def kept_energy(spectrum: torch.Tensor, rank: int) -> float:
    """Fraction of the total squared singular values kept by the first ``rank`` per row."""
    energy = spectrum.square()
    total = float(energy.sum())
    if total == 0.0:
        return 1.0
    return float(energy[:, :rank].sum()) / total


def tucker2_kept_energy(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    groups: int = 1,
    n_iter_max: int = 0,
) -> float:
    """Fraction of ‖W‖² kept by a Tucker-2 approximation (tensorly ``partial_tucker``).

    With ``n_iter_max=0`` this is the truncated HOSVD (one SVD per mode: cheap, within a
    small factor of optimal); each HOOI iteration refines it at the cost of full SVDs.

    Args:
        weight: ``[N, M/g, *kernel]``.
        ranks: ``(R_out, R_in)`` per group, clipped to the channel counts.
        n_iter_max: HOOI iterations after the SVD initialisation.
    Returns:
        ‖core‖² / ‖W‖² summed over groups (the factors are orthonormal).
    """
    w = grouped_view(weight.detach().to(torch.float64), groups)
    g, n_g, m_g, k = w.shape
    r_out, r_in = min(ranks[0], n_g), min(ranks[1], m_g)
    total = float(w.square().sum())
    if total == 0.0:
        return 1.0
    kept = 0.0
    with tl.backend_context("pytorch"):
        for block in w:
            (core, _factors), _errors = partial_tucker(
                block, rank=[r_out, r_in], modes=[0, 1], init="svd", svd=gram_svd,
                n_iter_max=n_iter_max,
            )
            kept += float(core.square().sum())
    return min(kept / total, 1.0)


def quarter_rank(channels: int) -> int:
    """C/4 rounded up, at least 1: the Tucker-2 rank used by ``inspect``."""
    return max(1, math.ceil(channels / 4))
