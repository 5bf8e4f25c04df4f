"""Depthwise-separable: depthwise (multiplier r) → pointwise (per-input-channel SVD of
W[:, m] ``[N, K]``)."""

from __future__ import annotations

import torch

from bscompress.factorize.gsvd import refit_last, whitened_lowrank
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
        depthwise = right.transpose(2, 3)  # [g, m, r, k]
        set_weight(block.dw.weight, depthwise)
        if cov.full is None:
            set_weight(block.pw.weight, left.permute(0, 2, 1, 3))  # [g, n, m, r]
            return "whitened depthwise (Σ blocks only)"
        eye = torch.eye(m, dtype=torch.float64)
        front = torch.einsum("gmjk,mp->gmjpk", depthwise, eye).reshape(g, m * r, m * k)
        set_weight(block.pw.weight, refit_last(weight, front, cov.full))
        return "whitened depthwise + pointwise refit"
