"""Depthwise-separable: depthwise (multiplier r) → pointwise (per-input-channel SVD of
W[:, m] ``[N, K]``)."""

from __future__ import annotations

import torch

from bscompress.factorize.gsvd import refit_pointwise_after_depthwise, whitened_lowrank
from bscompress.factorize.separable import max_rank_depthwise
from bscompress.factorize.spectra import depthwise_spectrum
from bscompress.layers.separable import DSConv
from bscompress.methods.base import ConvMethod, set_weight


class DSCMethod(ConvMethod, name="dsc"):
    """Depthwise-separable: depthwise (multiplier r) → pointwise (per-input-channel SVD)."""

    layers = (DSConv,)
    in_auto = True
    spatial_kernels = True

    def spectrum(self, conv):
        return depthwise_spectrum(conv.weight, conv.groups)

    def full_rank(self, conv):
        return max_rank_depthwise(conv.weight.shape, conv.groups)

    def spatial_stage(self, block):
        return "dw"

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """Whitened SVD per input channel (its K×K block of Σ), then the pointwise refit by
        least squares with the full Σ (cross-channel compensation) when there is one."""
        g, n = block.groups, block.out_channels // block.groups
        m, k, r = cov.channels, cov.kernel, block.rank
        per_channel = weight.reshape(g, n, m, k).transpose(1, 2)  # [g, M/g, N/g, K]
        left, right, _ = whitened_lowrank(per_channel, cov.blocks, r)  # [g,m,n,r], [g,m,k,r]
        # unit-norm kernels, the scale moved to the pointwise (the same Ŵ): a channel that is
        # dead on the calibration data would otherwise get kernels of norm ~1/√ridge (1e15),
        # whose rounding makes the pointwise refit's Gram matrix indefinite
        norms = right.norm(dim=2, keepdim=True)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        left, depthwise = left * norms, (right / norms).transpose(2, 3)  # [g, m, r, k]
        set_weight(block.dw.weight, depthwise)
        if cov.full is None:
            set_weight(block.pw.weight, left.permute(0, 2, 1, 3))  # [g, n, m, r]
            return "whitened depthwise (Σ blocks only)"
        set_weight(block.pw.weight, refit_pointwise_after_depthwise(weight, depthwise,
                                                                    cov.full))
        return "whitened depthwise + pointwise refit"
