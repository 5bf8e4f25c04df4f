"""CP (CANDECOMP/PARAFAC) factorization of conv weights (tensorly ``parafac``, ALS).

A weight ``W [N, M/g, *kernel]`` is factorized group by group (g groups, each block
``W_j [N/g, M/g, *kernel]``, the same rank R in every group) as a sum of R rank-one terms

    cp3:  W_j ≈ Σ_r a_r ∘ b_r ∘ K_r             on W_j reshaped ``[N/g, M/g, K]``
          (each spatial kernel ``K_r`` is kept whole, K = prod(kernel); Conv1d and Conv2d);
    cp4:  W_j ≈ Σ_r a_r ∘ b_r ∘ h_r ∘ w_r       on ``[N/g, M/g, kh, kw]`` (Lebedev et al.,
          Conv2d only: ``K_r = h_r w_rᵀ`` is separable, a kh×1 then a 1×kw depthwise conv).

ALS is seeded (``random_state``), bounded (``n_iter_max``) and starts from the SVD init
(``gram_svd`` on each unfolding, orthonormal even when rank-deficient; modes smaller than R
are completed with seeded random columns). It runs in float64. tensorly returns unit-norm
factors and weights λ (``normalize_factors=True``); λ is folded into the output factor, so
``a_r`` carries all the scale and ``b_r``, ``K_r`` (``h_r``, ``w_r``) have unit norm. The fit
error is computed here
from the reconstruction, not taken from tensorly's running estimate.

Rank clipping: a tensor of shape ``(I_1, …, I_d)`` has CP rank at most
``prod(I) / max(I)``, so R is clipped to that bound per group (see :func:`clip_cp_rank`).
CP is not exact at small ranks; even at the bound ALS need not reach zero error.

Pure math: no ``torch.nn`` modules; all outputs are float64.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Literal

import tensorly as tl
import torch
from tensorly.decomposition import parafac
from tensorly.tenalg.core_tenalg import CoreTenalgBackend

from bscompress.factorize.tucker import left_gram_svd

CPMode = Literal["cp3", "cp4"]
CP_MODES: tuple[str, ...] = ("cp3", "cp4")


@dataclass(frozen=True)
class CPFactors:
    """A CP factorization of a (grouped) conv weight, float64.

    Attributes:
        mode: ``'cp3'`` or ``'cp4'``.
        out_factors: ``[g, N/g, R]`` — column r is ``λ_r a_r`` (the weights are folded in).
        in_factors: ``[g, M/g, R]`` — column r is ``b_r``, unit norm.
        spatial_factors: unit-norm columns; cp3: ``([g, K, R],)`` with K = prod(kernel)
            (row-major over the kernel); cp4: ``([g, kh, R], [g, kw, R])``.
        kernel_size: the conv's kernel, ``(k,)`` or ``(kh, kw)``.
        relative_error: ``‖W − Ŵ‖² / ‖W‖²`` computed from the reconstruction
            (0 for an all-zero ``W``).
        n_iter: ALS iterations run, the largest over the groups.
    """

    mode: str
    out_factors: torch.Tensor
    in_factors: torch.Tensor
    spatial_factors: tuple[torch.Tensor, ...]
    kernel_size: tuple[int, ...]
    relative_error: float
    n_iter: int = 0

    @property
    def groups(self) -> int:
        return self.out_factors.shape[0]

    @property
    def rank(self) -> int:
        """R per group."""
        return self.out_factors.shape[2]

    def kernels(self) -> torch.Tensor:
        """The rank-one spatial kernels ``K_r``: ``[g, R, *kernel]``."""
        if self.mode == "cp3":
            (c,) = self.spatial_factors
            return c.transpose(1, 2).reshape(c.shape[0], c.shape[2], *self.kernel_size)
        h, w = self.spatial_factors
        return torch.einsum("gir,gjr->grij", h, w)

    def to_tensor(self) -> torch.Tensor:
        """The reconstruction ``Ŵ [N, M/g, *kernel]``, float64."""
        kernels = self.kernels().flatten(2)  # [g, R, K]
        # in and kernel factors first: torch.einsum contracts left to right (without
        # opt_einsum), and [g, N, M, R] first would be a gigabyte at 512 channels
        w = torch.einsum("gmr,grk,gnr->gnmk", self.in_factors, kernels, self.out_factors)
        return w.reshape(-1, self.in_factors.shape[1], *self.kernel_size)


def clip_cp_rank(
    weight_shape: tuple[int, ...] | torch.Size, rank: int, mode: CPMode = "cp3", groups: int = 1
) -> int:
    """The per-group rank a CP factorization actually uses.

    Args:
        weight_shape: ``(N, M/g, *kernel)``.
        rank: requested R per group.
    Returns:
        ``min(R, prod(dims) / max(dims))`` with dims = ``(N/g, M/g, K)`` for cp3 and
        ``(N/g, M/g, kh, kw)`` for cp4 — the generic upper bound of the CP rank.
    Raises:
        ValueError: rank below 1, unknown mode, cp4 on a non-2D kernel, or N not divisible by
            ``groups``.
    """
    dims = _mode_dims(weight_shape, mode, groups)
    if rank < 1:
        raise ValueError(f"CP rank must be at least 1, got {rank}")
    return min(rank, math.prod(dims) // max(dims))


def _mode_dims(weight_shape: tuple[int, ...] | torch.Size, mode: str, groups: int) -> tuple:
    if mode not in CP_MODES:
        raise ValueError(f"CP mode must be one of {CP_MODES}, got {mode!r}")
    n, m_g, *kernel = weight_shape
    if groups < 1 or n % groups:
        raise ValueError(f"{n} output channels do not split into {groups} groups")
    if mode == "cp4":
        if len(kernel) != 2:
            raise ValueError(
                f"cp4 needs a 2-D kernel (kh×1 then 1×kw depthwise convs); a kernel of size "
                f"{tuple(kernel)} has no second spatial axis to separate: use cp3"
            )
        return (n // groups, m_g, kernel[0], kernel[1])
    return (n // groups, m_g, math.prod(kernel))


#: the largest Khatri-Rao product :func:`mttkrp` forms (elements; 64 MB in float64)
KHATRI_RAO_ELEMENTS = 8 * 2**20


def mttkrp(tensor: torch.Tensor, cp_tensor: tuple, mode: int) -> torch.Tensor:
    """The MTTKRP ``unfold(X, mode) @ khatri_rao(factors except mode)`` of ALS, ``[I_mode,
    R]``, without forming the Khatri-Rao product (tensorly's default does: ``∏_{i≠mode} I_i``
    rows × R, a gigabyte for the size-3 modes of a 512×512×3×3 cp4 weight at R = 512).

    Mode 0 of a contiguous tensor, when the Khatri-Rao product of the other modes is small
    (at most :data:`KHATRI_RAO_ELEMENTS`: every mode but the output one of a conv weight),
    is one matmul of the tensor's rows with it, ``[I_0, ∏ I / I_0] @ [∏ I / I_0, R]``: about
    twice as fast as the contraction below, which must read the tensor strided. Otherwise,
    the largest other mode is contracted by one matmul, the rest one at a time, elementwise
    over R: the same ``∏ I · R`` multiply-adds, and intermediates of at most
    ``∏ I / I_largest · R``. tensorly's ``unfolding_dot_khatri_rao`` while
    :func:`cp_factors` runs."""
    weights, factors = cp_tensor
    rank = factors[mode].shape[1]
    if (mode == 0 and tensor.is_contiguous()
            and tensor.numel() // tensor.shape[0] * rank <= KHATRI_RAO_ELEMENTS):
        product = factors[1]
        for factor in factors[2:]:  # row (i_1, …, i_d) in C order, as the tensor's columns
            product = (product[:, None, :] * factor[None, :, :]).reshape(-1, rank)
        out = tensor.reshape(tensor.shape[0], -1) @ product
        return out if weights is None else out * weights[None, :]
    others = [i for i in range(tensor.ndim) if i != mode]
    largest = max(others, key=lambda i: tensor.shape[i])
    out = _contracted(tensor, factors[largest], largest)  # remaining modes…, R
    axes = [i for i in range(tensor.ndim) if i != largest]
    for i in reversed(others):
        if i == largest:
            continue
        position = axes.index(i)
        shape = [1] * out.ndim
        shape[position], shape[-1] = factors[i].shape
        out = (out * factors[i].reshape(shape)).sum(position)
        axes.remove(i)
    return out if weights is None else out * weights[None, :]


#: this thread's last contraction of :func:`mttkrp`: ``entry = (tensor, factor, key, result)``
_LAST = threading.local()


def _contracted(tensor: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    """``movedim(tensor, axis, -1) @ factor``, the first contraction of :func:`mttkrp`, given
    again for the same tensor and factor (the same objects, unchanged: ``_version``). Within
    an ALS sweep the modes after the first contract the same updated factor of the largest
    mode (the output channels of a conv weight): one contraction for modes 1 and 2 of cp3
    instead of two, for modes 1 to 3 of cp4 instead of three."""
    key = (axis, tensor._version, factor._version)
    last = getattr(_LAST, "entry", None)
    if last is not None and last[0] is tensor and last[1] is factor and last[2] == key:
        return last[3]
    out = torch.movedim(tensor, axis, -1) @ factor
    _LAST.entry = (tensor, factor, key, out)
    return out


def _forget_contraction() -> None:
    _LAST.entry = None


class _FastMTTKRP(CoreTenalgBackend, backend_name="bscompress-mttkrp"):
    """tensorly's core tenalg backend with :func:`mttkrp` as ``unfolding_dot_khatri_rao``;
    :func:`cp_factors` sets it for its own thread only."""

    unfolding_dot_khatri_rao = staticmethod(mttkrp)


_FAST_MTTKRP = _FastMTTKRP()


def cp_factors(
    weight: torch.Tensor,
    rank: int,
    mode: CPMode = "cp3",
    groups: int = 1,
    n_iter_max: int = 100,
    random_state: int = 0,
    tol: float = 1e-8,
    precision: torch.dtype = torch.float64,
) -> CPFactors:
    """CP factorization of a conv weight by ALS (tensorly ``parafac``).

    Args:
        weight: ``[N, M/g, *kernel]`` (any float dtype; computed in float64).
        rank: R per group, clipped by :func:`clip_cp_rank`.
        mode: ``'cp3'`` (kernel kept whole) or ``'cp4'`` (kernel separated, Conv2d only).
        groups: the conv's groups; each group is factorized separately with rank R.
        n_iter_max: ALS iterations at most, per group.
        random_state: seed of the init's random columns (same seed → identical factors).
        tol: stop once tensorly's relative error ``‖W − Ŵ‖/‖W‖`` changes by less than this
            between iterations; 0 runs all ``n_iter_max`` iterations.
        precision: the dtype ALS runs in; the factors and the error are float64 either way.
            float32 serves the budget's candidate fits, which only rank forms by their
            error: on a 256×256×3×3 weight at R = 32 … 256 (15 iterations), 2–3× faster
            than float64, with the same relative errors to 6 digits.
    Returns:
        :class:`CPFactors`.
    """
    dims = _mode_dims(weight.shape, mode, groups)
    r = clip_cp_rank(weight.shape, rank, mode, groups)
    kernel_size = tuple(weight.shape[2:])
    w = weight.detach().double().reshape(groups, *dims)
    if not bool(w.isfinite().all()):
        raise ValueError("CP needs a finite weight; this one holds NaN or Inf values")
    outs, ins, spatial, n_iter = [], [], [], 0
    with (tl.backend_context("pytorch"),
          tl.tenalg.backend_context(_FAST_MTTKRP, local_threadsafe=True),
          contextlib.ExitStack() as stack):
        stack.callback(_forget_contraction)  # (it holds a tensor of the size of the weight)
        for block in w:
            largest = float(block.abs().max())
            if largest == 0.0:  # all-zero group: zero output factor, unit others
                factors = [block.new_zeros(d, r) if i == 0 else _unit_columns(d, r, block)
                           for i, d in enumerate(dims)]
            else:  # ALS on the block scaled by a power of 2 (exactly) to a largest entry near
                # 1: no underflow or overflow of its Grams in float32; the scale put back after
                scale = 2.0 ** round(math.log2(largest))
                factors, iters = _als((block / scale).to(precision), r, n_iter_max, tol,
                                      random_state)
                factors[0] = factors[0] * scale
                n_iter = max(n_iter, iters)
            outs.append(factors[0])
            ins.append(factors[1])
            spatial.append(factors[2:])
    result = CPFactors(
        mode=mode,
        out_factors=torch.stack(outs),
        in_factors=torch.stack(ins),
        spatial_factors=tuple(torch.stack([s[i] for s in spatial]) for i in range(len(dims) - 2)),
        kernel_size=kernel_size,
        relative_error=0.0,
        n_iter=n_iter,
    )
    exact = weight.detach().double()
    total = float(exact.square().sum())
    if total == 0.0:
        return result
    error = float((result.to_tensor() - exact).square().sum())
    return CPFactors(**{**result.__dict__, "relative_error": error / total})


#: the ridge ``λ I`` added to ALS's normal equations when they are singular without it
#: (on a block scaled to a largest entry near 1)
ALS_RIDGE = 1e-6


def _als(block: torch.Tensor, rank: int, n_iter_max: int, tol: float, random_state: int
         ) -> tuple[list[torch.Tensor], int]:
    """tensorly's ALS of one group's ``block`` at ``rank``: the factors (float64, unit-norm
    columns but in the output factor, which carries the weights λ) and the iterations run.

    The normal equations of a mode are ``(∗_{i≠mode} F_iᵀ F_i) x = MTTKRP``: singular where
    the other factors are rank-deficient, as ALS makes them on a weight whose CP rank is
    below R (a block of equal kernels, filters that are all zero in a pruned or dead layer,
    an exactly low-rank layer). Those fits run again with the ridge :data:`ALS_RIDGE` and
    unnormalised factors (tensorly's normalisation divides by the weight λ of a component
    that went to zero), and give the same error as the rank they can use."""
    for ridge in (0.0, ALS_RIDGE):
        iters: list[int] = []
        try:
            weights, factors = parafac(
                block, rank, n_iter_max=n_iter_max, init="svd", svd=left_gram_svd,
                normalize_factors=not ridge, l2_reg=ridge, tol=max(tol, 1e-300),
                random_state=random_state,
                callback=lambda _cp, _err, iters=iters: iters.append(1),
            )
        except torch.linalg.LinAlgError:
            continue
        factors = [torch.as_tensor(f).double() for f in factors]
        if weights is not None:
            factors[0] = factors[0] * torch.as_tensor(weights).double()[None, :]
        if all(bool(f.isfinite().all()) for f in factors):
            break
    else:
        raise ValueError(f"CP ALS found no finite factors at rank {rank}, even with a ridge")
    for i in range(1, len(factors)):  # unit columns (tensorly's norms are off by up to 1e-5)
        norms = factors[i].norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        factors[i] = factors[i] / norms
        factors[0] = factors[0] * norms
    return factors, len(iters) - 1  # the callback also sees the init


def _unit_columns(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` with unit-norm columns (the first basis vector in each)."""
    out = like.new_zeros(rows, cols)
    out[0] = 1.0
    return out
