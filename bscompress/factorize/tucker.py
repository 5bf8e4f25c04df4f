"""Tucker-2 factorization of conv weights (tensorly ``partial_tucker`` on the channel modes).

A weight ``W [N, M/g, *kernel]`` is factorized group by group (g groups, each block
``W_j [N/g, M/g, *kernel]``) as

    W_j ≈ G_j ×₀ U_out_j ×₁ U_in_j,   G_j [R_out, R_in, *kernel],

with orthonormal columns in ``U_out_j [N/g, R_out]`` and ``U_in_j [M/g, R_in]``. Because the
factors are orthonormal and ``G_j`` is the projection of ``W_j`` on them, the truncation error
is ``‖W‖² − ‖G‖²`` exactly. Ranks are per group and the same for every group.

Rank clipping: the mode-0 unfolding of a block is ``N/g × (M/g·K)``, so no more than
``min(N/g, M/g·K)`` output factors are meaningful (the mode-1 bound is ``min(M/g, N/g·K)``);
requested ranks are clipped to these bounds (see :func:`clip_tucker2_ranks`). Full ranks
(``R_out = N/g``, ``R_in = M/g``, or the bounds) reproduce ``W`` exactly.

Pure math: no ``torch.nn`` modules; all outputs are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from bscompress.factorize.linalg import gram_eigh, gram_svd


@dataclass(frozen=True)
class Tucker2Factors:
    """A Tucker-2 factorization of a (grouped) conv weight, float64.

    Attributes:
        core: ``[g, R_out, R_in, *kernel]`` — the core conv of each group (``G_j``).
        out_factors: ``[g, N/g, R_out]`` — ``U_out_j``, orthonormal columns.
        in_factors: ``[g, M/g, R_in]`` — ``U_in_j``, orthonormal columns.
        relative_error: ``‖W − Ŵ‖² / ‖W‖²`` (``= 1 − ‖G‖²/‖W‖²``; 0 for an all-zero ``W``).
        out_spectrum: ``[g, min(N/g, M/g·K)]`` — singular values of each group's mode-0
            unfolding (HOSVD spectrum), descending. See :func:`hosvd_spectra`.
        in_spectrum: ``[g, min(M/g, N/g·K)]`` — the same for mode 1.
    """

    core: torch.Tensor
    out_factors: torch.Tensor
    in_factors: torch.Tensor
    relative_error: float
    out_spectrum: torch.Tensor
    in_spectrum: torch.Tensor

    @property
    def groups(self) -> int:
        return self.core.shape[0]

    @property
    def ranks(self) -> tuple[int, int]:
        """``(R_out, R_in)`` per group."""
        return self.core.shape[1], self.core.shape[2]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.core.shape[3:])

    def to_tensor(self) -> torch.Tensor:
        """The reconstruction ``Ŵ [N, M/g, *kernel]``, float64."""
        g, r_out, r_in = self.core.shape[:3]
        core = self.core.reshape(g, r_out, r_in, -1)
        w = torch.einsum("gor,grsk,gis->goik", self.out_factors, core, self.in_factors)
        return w.reshape(-1, self.in_factors.shape[1], *self.kernel_size)


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[N, M/g, *kernel]`` → float64 ``[g, N/g, M/g, *kernel]``."""
    n = weight.shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"{n} output channels do not split into {groups} groups")
    return weight.detach().to(torch.float64).reshape(groups, n // groups, *weight.shape[1:])


def clip_tucker2_ranks(
    weight_shape: tuple[int, ...] | torch.Size, ranks: tuple[int, int] | int, groups: int = 1
) -> tuple[int, int]:
    """The per-group ranks a Tucker-2 factorization actually uses.

    Args:
        weight_shape: ``(N, M/g, *kernel)``.
        ranks: ``(R_out, R_in)`` per group, or one int for both.
    Returns:
        ``(min(R_out, N/g, M/g·K), min(R_in, M/g, N/g·K))``.
    Raises:
        ValueError: a rank below 1, or N not divisible by ``groups``.
    """
    r_out, r_in = (ranks, ranks) if isinstance(ranks, int) else tuple(ranks)
    if r_out < 1 or r_in < 1:
        raise ValueError(f"Tucker-2 ranks must be at least 1, got {(r_out, r_in)}")
    n, m_g = weight_shape[0], weight_shape[1]
    if groups < 1 or n % groups:
        raise ValueError(f"{n} output channels do not split into {groups} groups")
    n_g = n // groups
    k = 1
    for s in weight_shape[2:]:
        k *= s
    return min(r_out, n_g, m_g * k), min(r_in, m_g, n_g * k)


def _singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a float64 matrix via the smaller Gram matrix (descending)."""
    a = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    return torch.linalg.eigvalsh(a @ a.T).flip(0).clamp_min(0).sqrt()


def left_gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **kw: object):
    """``gram_svd`` whose ``U`` always has orthonormal columns (a tensorly ``svd=`` callable).

    For a tall matrix ``gram_svd`` goes through the column Gram matrix and builds ``U`` as
    ``A V / S``, which has zero columns where ``A`` is rank-deficient; Tucker factors must stay
    orthonormal, so tall matrices take the eigenvectors of the row Gram matrix instead.
    """
    if matrix.shape[0] <= matrix.shape[1]:
        return gram_svd(matrix, n_eigenvecs, **kw)
    eigvals, u = gram_eigh(matrix)
    s, u = eigvals.flip(0).clamp_min(0).sqrt(), u.flip(1)
    k = min(matrix.shape[1], u.shape[1] if n_eigenvecs is None else n_eigenvecs)
    u, s = u[:, :k], s[:k]
    v = (u.T @ matrix) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return u, s, v


def hosvd_spectra(weight: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of each group's mode-0 and mode-1 unfoldings (no Tucker fit).

    For rank selection without refitting: with ``e0(R) = Σ_{j≥R} s0_j²`` the energy dropped
    along mode 0 (likewise ``e1`` for mode 1), every Tucker-2 approximation with ranks
    ``(R_out, R_in)`` has ``‖W − Ŵ‖² ≥ max(e0(R_out), e1(R_in))`` (Eckart–Young on each
    unfolding), and the truncated HOSVD (``n_iter_max=0``) reaches ``≤ e0(R_out) + e1(R_in)``;
    HOOI iterations land in between. Sum the per-group values for the whole layer.

    Args:
        weight: ``[N, M/g, *kernel]``.
    Returns:
        ``(out_spectrum [g, min(N/g, M/g·K)], in_spectrum [g, min(M/g, N/g·K)])``, float64,
        descending per row.
    """
    w = _grouped(weight, groups)
    g, n_g, m_g = w.shape[:3]
    blocks = w.reshape(g, n_g, m_g, -1)
    out = torch.stack([_singular_values(b.reshape(n_g, -1)) for b in blocks])
    inn = torch.stack([_singular_values(b.transpose(0, 1).reshape(m_g, -1)) for b in blocks])
    return out, inn


def tucker2_factors(
    weight: torch.Tensor,
    ranks: tuple[int, int] | int,
    groups: int = 1,
    n_iter_max: int = 5,
    tol: float = 1e-4,
) -> Tucker2Factors:
    """Tucker-2 factorization of a conv weight over its channel modes (0 = out, 1 = in).

    tensorly ``partial_tucker`` with a truncated-HOSVD init (``gram_svd``: fast), then up to
    ``n_iter_max`` HOOI iterations (each a full SVD per mode inside tensorly: about 0.8 s per
    iteration for a 512×512×3×3 block on one thread), stopping early once the relative error
    changes by less than ``tol`` (tensorly's criterion on ``‖W − Ŵ‖/‖W‖``).
    ``n_iter_max=0`` gives the truncated HOSVD.

    Args:
        weight: ``[N, M/g, *kernel]`` (any float dtype; computed in float64).
        ranks: ``(R_out, R_in)`` per group, or one int for both; clipped by
            :func:`clip_tucker2_ranks`.
        groups: the conv's groups; each group is factorized separately.
    Returns:
        :class:`Tucker2Factors` (float64, on the CPU device of ``weight``).
    """
    r_out, r_in = clip_tucker2_ranks(weight.shape, ranks, groups)
    w = _grouped(weight, groups)
    g, n_g, m_g = w.shape[:3]
    kernel = tuple(w.shape[3:])
    cores, outs, ins = [], [], []
    with tl.backend_context("pytorch"):
        for block in w:
            if not bool(block.any()):  # an all-zero group: any orthonormal factors, zero core
                outs.append(torch.eye(n_g, r_out, dtype=torch.float64, device=w.device))
                ins.append(torch.eye(m_g, r_in, dtype=torch.float64, device=w.device))
                cores.append(block.new_zeros(r_out, r_in, *kernel))
                continue
            (core, (u_out, u_in)), _ = partial_tucker(
                block, rank=[r_out, r_in], modes=[0, 1], init="svd", svd=left_gram_svd,
                n_iter_max=n_iter_max, tol=tol, random_state=0,
            )
            # core = block ×₀ U_outᵀ ×₁ U_inᵀ, the projection on the (orthonormal) factors
            outs.append(torch.as_tensor(u_out))
            ins.append(torch.as_tensor(u_in))
            cores.append(torch.as_tensor(core))
    core = torch.stack(cores)
    total = float(w.square().sum())
    kept = float(core.square().sum())
    error = 0.0 if total == 0.0 else max(total - kept, 0.0) / total
    out_spectrum, in_spectrum = hosvd_spectra(weight, groups)
    return Tucker2Factors(
        core=core,
        out_factors=torch.stack(outs),
        in_factors=torch.stack(ins),
        relative_error=error,
        out_spectrum=out_spectrum,
        in_spectrum=in_spectrum,
    )
