"""BSConv-U: pointwise → depthwise, r blueprints per filter (per-filter SVD of W[n] ``[M, K]``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bscompress.factorize.gsvd import (
    blueprint_normal_equations,
    refit_blueprint_pointwise,
    refit_blueprints,
    solve_blueprints,
)
from bscompress.factorize.memo import reusing
from bscompress.factorize.separable import blueprint_factors, max_rank_blueprint
from bscompress.factorize.spectra import blueprint_spectrum
from bscompress.layers.separable import BSConvU
from bscompress.methods.base import DATA_FREE, ConvMethod, set_weight

#: the largest per-filter pointwise system (M/g·r unknowns) BSConv-U's ALS solves
MAX_POINTWISE_SYSTEM = 1024
#: the largest blueprint system (float64 bytes, every filter's (R·K)² at the full rank R)
#: the budget's candidates of a layer share; past it (large dense kernels: a 5×5 conv of 192
#: filters would take 600 MB) each rank builds its own, chunk by chunk. ResNet-50's 3×3
#: convs need at most 27 MB.
MAX_SHARED_SYSTEM_BYTES = 256 << 20


class BSConvUMethod(ConvMethod, name="bsconv-u"):
    """BSConv-U: pointwise → depthwise, rank r blueprints per filter (per-filter SVD)."""

    layers = (BSConvU,)
    in_auto = True
    spatial_kernels = True

    def spectrum(self, conv):
        return blueprint_spectrum(conv.weight, conv.groups)

    def full_rank(self, conv):
        return max_rank_blueprint(conv.weight.shape, conv.groups)

    def spatial_stage(self, block):
        return "dw"

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """Alternating least squares from the SVD factors: ``als_iters`` rounds of pointwise
        refit (when each filter's (M/g·r)² system is at most ``MAX_POINTWISE_SYSTEM``) then
        blueprint refit, with the full Σ; ``als_iters=0`` (budget candidates) refits the
        blueprints only, each filter's r·K unknowns instead of its (M/g·r)² system."""
        if cov.full is None:
            return DATA_FREE
        if als_iters == 0 and reusing():  # the budget's candidates of the layer, in turn
            shared = _shared_pointwise(original, block)
            if shared is not None:  # their systems are blocks of the full rank's
                g, n = block.groups, block.out_channels // block.groups
                w4 = weight.reshape(g, n, block.in_channels // g, -1)
                system = blueprint_normal_equations(w4, shared, cov.full,
                                                    precision=torch.float32)
                set_weight(block.dw.weight, solve_blueprints(*system, block.rank)
                           .transpose(2, 3))
                return "blueprint refit"
        return fit_bsconv_u(weight, block, cov.full, als_iters)


def _shared_pointwise(original: nn.Module, block: BSConvU) -> torch.Tensor | None:
    """The closed-form pointwise of ``original`` at full rank ``[g, N/g, M/g, R]`` when the
    block's (rank r) is its first r columns (the same per-filter SVD) and their system fits
    :data:`MAX_SHARED_SYSTEM_BYTES`, else ``None``."""
    g, n, r = block.groups, block.out_channels // block.groups, block.rank
    full = max_rank_blueprint(original.weight.shape, original.groups)
    taps = math.prod(original.weight.shape[2:])
    if g * n * (full * taps) ** 2 * 8 > MAX_SHARED_SYSTEM_BYTES:
        return None
    pw = blueprint_factors(original.weight, original.groups, full).pointwise
    pointwise = pw.detach().double().reshape(g, n, full, -1).transpose(2, 3)
    own = block.pw.weight.detach().double().reshape(g, n, r, -1).transpose(2, 3)
    return pointwise if torch.equal(pointwise[..., :r], own) else None


def fit_bsconv_u(weight: torch.Tensor, block: BSConvU, full: torch.Tensor,
                 als_iters: int) -> str:
    """BSConv-U's ALS on the target ``weight`` ``[g, N/g, M/g·K]`` with Σ ``full``
    (``als_iters`` rounds; 0, a budget candidate: the blueprint refit alone, its products
    in float32)."""
    g, n, r = block.groups, block.out_channels // block.groups, block.rank
    m = block.in_channels // g
    k = weight.shape[-1] // m
    w4 = weight.reshape(g, n, m, k)
    # pw [N·r, M/g] → P [g, n, m, r]; dw [N, r, K] → V [g, n, k, r]
    pointwise = block.pw.weight.detach().double().reshape(g, n, r, m).transpose(2, 3)
    blueprints = block.dw.weight.detach().double().reshape(g, n, r, k).transpose(2, 3)
    if als_iters == 0:  # a budget candidate: the blueprints given the SVD's pointwise
        fitted = refit_blueprints(w4, pointwise, full, precision=torch.float32)
        set_weight(block.dw.weight, fitted.transpose(2, 3))
        return "blueprint refit"
    refit_pw = m * r <= MAX_POINTWISE_SYSTEM
    als_iters = max(als_iters, 1)
    for _ in range(als_iters):
        if refit_pw:
            pointwise = refit_blueprint_pointwise(w4, blueprints, full)
        blueprints = refit_blueprints(w4, pointwise, full)
    set_weight(block.pw.weight, pointwise.transpose(2, 3))
    set_weight(block.dw.weight, blueprints.transpose(2, 3))
    return (f"als ×{als_iters}" if refit_pw else
            f"blueprint refit ×{als_iters} (pointwise system {m * r} > "
            f"{MAX_POINTWISE_SYSTEM})")
