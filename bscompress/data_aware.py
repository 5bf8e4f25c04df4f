"""Fit the weights of a factorized block to calibration statistics (the GSVD of DESIGN.md).

``fit_block(original, block, cov, als_iters)`` rewrites ``block``'s weights in place so that
its output error on the calibration patches, tr((W − Ŵ) Σ (W − Ŵ)ᵀ), is minimised for its
structure, and returns a note of what was done. Per block type:

* ``LowRankLinear`` / ``LowRankConv1x1``: whitened SVD, the exact optimum at that rank.
* ``DSConv``: whitened SVD per input channel (its K×K block of Σ), then the pointwise refit by
  least squares with the full Σ (cross-channel compensation).
* ``BSConvU``: alternating least squares from the SVD factors, ``als_iters`` rounds of
  pointwise refit (when each filter's (M/g·r)² system is at most ``MAX_POINTWISE_SYSTEM``)
  then blueprint refit.
* ``BSConvS``: the blueprints refit given its pw2·pw1 pointwise.
* ``Tucker2Conv`` / ``CPConv``: the last 1×1 (``pw2``) refit given the front stages.

Every refit is exact least squares for its stage, so the error never grows (up to the ridge).
In sequential mode (``cov.cross`` set) the target is W_eff = W C Σ⁻¹ (``sequential_target``):
the block then reproduces the original layer's outputs from the compressed network's inputs.
Layers whose full Σ was over the memory bound get the steps that need only the K×K blocks
(the DSC whitening), else stay data-free; the note says which.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bscompress.calibrate import PatchCovariance
from bscompress.factorize.gsvd import (
    refit_blueprint_pointwise,
    refit_blueprints,
    refit_last,
    sequential_target,
    whitened_lowrank,
)
from bscompress.layers.lowrank import LowRankConv1x1, LowRankLinear
from bscompress.layers.separable import BSConvS, BSConvU, DSConv
from bscompress.layers.tensor import CPConv, Tucker2Conv

#: the largest per-filter pointwise system (M/g·r unknowns) BSConv-U's ALS solves
MAX_POINTWISE_SYSTEM = 1024


def grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A dense weight ``[N, M/g, *kernel]`` (or ``[N, M]``) as ``[g, N/g, M/g·K]`` float64."""
    w = weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def grouped_weight(module: nn.Module) -> torch.Tensor:
    """``[g, N/g, M/g·K]`` float64 weight of a conv or Linear (rows = output channels)."""
    return grouped(module.weight, getattr(module, "groups", 1))


def block_diagonal(cov: PatchCovariance) -> torch.Tensor:
    """Σ restricted to its per-channel K×K blocks, as ``[g, M/g·K, M/g·K]``."""
    g, m, k = cov.groups, cov.channels, cov.kernel
    eye = torch.eye(m, dtype=torch.float64)
    return torch.einsum("gmkl,mp->gmkpl", cov.blocks, eye).reshape(g, m * k, m * k)


def output_sigma(cov: PatchCovariance) -> torch.Tensor:
    """The Σ the output error is measured with: full, else block-diagonal."""
    return cov.full if cov.full is not None else block_diagonal(cov)


def degenerate_statistics(cov: PatchCovariance, floored: int = 0) -> dict | None:
    """What is degenerate about a layer's calibration statistics (the Plan's
    ``statistics``), or ``None``: fewer patches than patch dimensions, dimensions that were
    always zero (dead channels, zero padding), solves that needed the eigenvalue floor."""
    diag = cov.blocks.diagonal(dim1=-2, dim2=-1)  # [g, M/g, K]
    scale = float(diag.mean()) if diag.numel() else 0.0
    dead = int((diag <= 1e-12 * scale).sum()) if scale > 0 else int(diag.numel())
    dims = cov.channels * cov.kernel
    if cov.patches >= dims and not dead and not floored:
        return None
    return {"dimensions": dims, "patches": int(cov.patches), "dead": dead,
            "floored": int(floored)}


def shrunk(cov: PatchCovariance, alpha: float) -> PatchCovariance:
    """Σ shrunk toward a scaled identity: (1 − α) Σ + α · (tr Σ / D) · I, per group.

    α = 0 is Σ itself; α = 1 makes every whitened fit the data-free one (a Σ ∝ I weighs every
    patch direction alike), so α blends the data-aware fit toward the data-free fit. Directions
    the calibration data never spanned get weight α·tr Σ/D instead of the ridge's ~0, which
    is what keeps a fit on a few hundred images from being arbitrary outside their span.
    Sequential statistics (``cross``) are returned unchanged.
    """
    if alpha == 0 or cov.cross is not None:
        return cov
    k = cov.kernel
    diag = cov.blocks.diagonal(dim1=-2, dim2=-1)  # [g, M/g, K]
    level = diag.mean(dim=(1, 2))  # [g]: tr Σ / D per group
    eye_k = torch.eye(k, dtype=torch.float64)
    blocks = (1 - alpha) * cov.blocks + alpha * level[:, None, None, None] * eye_k
    full = None
    if cov.full is not None:
        eye = torch.eye(cov.full.shape[-1], dtype=torch.float64)
        full = (1 - alpha) * cov.full + alpha * level[:, None, None] * eye
    return dataclasses.replace(cov, full=full, blocks=blocks)


def without(cov: PatchCovariance, part: PatchCovariance) -> PatchCovariance:
    """The statistics of the patches in ``cov`` but not in ``part`` (a held-out subset of the
    same data): (n Σ − n_h Σ_h) / (n − n_h), for the fits that ``part`` then scores."""
    n, h = cov.patches, part.patches
    rest = max(n - h, 1)

    def minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None or b is None else (n * a - h * b) / rest

    return dataclasses.replace(cov, full=minus(cov.full, part.full),
                               blocks=minus(cov.blocks, part.blocks), patches=rest,
                               cross=None, reference=None)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


def fit_block(original: nn.Module, block: nn.Module, cov: PatchCovariance,
              als_iters: int = 1) -> str:
    """Refit ``block`` (built from ``original``) to the calibration statistics ``cov``.

    Returns:
        A short note (``"whitened svd"``, ``"pointwise refit"``, ``"data-free (Σ over the
        memory bound)"`` …) recorded in the Plan.
    """
    weight = grouped_weight(original)
    full = cov.full
    if cov.cross is not None:  # sequential: fit the original outputs from the new inputs
        weight = sequential_target(weight, full, cov.cross)
    if isinstance(block, LowRankLinear | LowRankConv1x1):
        left, right, _ = whitened_lowrank(weight, output_sigma(cov), block.rank)
        first, second = ((block.fc1, block.fc2) if isinstance(block, LowRankLinear)
                         else (block.pw1, block.pw2))
        _set(first.weight, right.transpose(1, 2))
        _set(second.weight, left)
        return "whitened svd"
    if isinstance(block, DSConv):
        return _fit_dsc(weight, block, cov)
    if full is None:
        return "data-free (Σ over the memory bound)"
    if isinstance(block, BSConvU):
        return _fit_bsconv_u(weight, block, full, als_iters)
    if isinstance(block, BSConvS):
        g, n = block.groups, block.out_channels // block.groups
        m, k = block.in_channels // g, weight.shape[-1] // (block.in_channels // g)
        pointwise = _bsconv_s_pointwise(block).reshape(g, n, block.rank, m).transpose(2, 3)
        v = refit_blueprints(weight.reshape(g, n, m, k), pointwise, full)
        _set(block.dw.weight, v.transpose(2, 3))
        return "blueprint refit"
    if isinstance(block, Tucker2Conv | CPConv):
        last = refit_last(weight, _front(block), full)
        _set(block.pw2.weight, last)
        return "pw2 refit"
    raise TypeError(f"no data-aware fit for {type(block).__name__}")


def _fit_dsc(weight: torch.Tensor, block: DSConv, cov: PatchCovariance) -> str:
    g, n = block.groups, block.out_channels // block.groups
    m, k, r = cov.channels, cov.kernel, block.rank
    per_channel = weight.reshape(g, n, m, k).transpose(1, 2)  # [g, M/g, N/g, K]
    left, right, _ = whitened_lowrank(per_channel, cov.blocks, r)  # [g,m,n,r], [g,m,k,r]
    depthwise = right.transpose(2, 3)  # [g, m, r, k]
    _set(block.dw.weight, depthwise)
    if cov.full is None:
        _set(block.pw.weight, left.permute(0, 2, 1, 3))  # [g, n, m, r]
        return "whitened depthwise (Σ blocks only)"
    eye = torch.eye(m, dtype=torch.float64)
    front = torch.einsum("gmjk,mp->gmjpk", depthwise, eye).reshape(g, m * r, m * k)
    _set(block.pw.weight, refit_last(weight, front, cov.full))
    return "whitened depthwise + pointwise refit"


def _fit_bsconv_u(weight: torch.Tensor, block: BSConvU, full: torch.Tensor,
                  als_iters: int) -> str:
    g, n, r = block.groups, block.out_channels // block.groups, block.rank
    m = block.in_channels // g
    k = weight.shape[-1] // m
    w4 = weight.reshape(g, n, m, k)
    # pw [N·r, M/g] → P [g, n, m, r]; dw [N, r, K] → V [g, n, k, r]
    pointwise = block.pw.weight.detach().double().reshape(g, n, r, m).transpose(2, 3)
    blueprints = block.dw.weight.detach().double().reshape(g, n, r, k).transpose(2, 3)
    refit_pw = m * r <= MAX_POINTWISE_SYSTEM
    for _ in range(max(als_iters, 1)):
        if refit_pw:
            pointwise = refit_blueprint_pointwise(w4, blueprints, full)
        blueprints = refit_blueprints(w4, pointwise, full)
    _set(block.pw.weight, pointwise.transpose(2, 3))
    _set(block.dw.weight, blueprints.transpose(2, 3))
    rounds = max(als_iters, 1)
    return (f"als ×{rounds}" if refit_pw else
            f"blueprint refit ×{rounds} (pointwise system {m * r} > {MAX_POINTWISE_SYSTEM})")


def _bsconv_s_pointwise(block: BSConvS) -> torch.Tensor:
    g, mid = block.groups, block.mid_channels
    a = block.pw1.weight.detach().double().reshape(g, mid, -1)
    b = block.pw2.weight.detach().double().reshape(g, -1, mid)
    return torch.bmm(b, a)  # [g, N·r/g, M/g]


def _front(block: Tucker2Conv | CPConv) -> torch.Tensor:
    """The map from an input patch to the input of ``pw2``: ``[g, R, M/g·K]``."""
    g = block.groups
    if isinstance(block, Tucker2Conv):
        r_out, r_in = block.ranks
        u_in = block.pw1.weight.detach().double().reshape(g, r_in, -1)
        core = block.core.weight.detach().double().reshape(g, r_out, r_in, -1)
        front = torch.einsum("gosk,gsi->goik", core, u_in)
        return front.reshape(g, r_out, -1)
    r = block.rank
    b = block.pw1.weight.detach().double().reshape(g, r, -1)
    kernels = block.kernels().detach().double().reshape(g, r, -1)
    return torch.einsum("grm,grk->grmk", b, kernels).reshape(g, r, -1)
