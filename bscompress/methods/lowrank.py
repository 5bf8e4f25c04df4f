"""``svd``: low-rank SVD of 1×1 convs and Linear layers (two thin layers of rank r)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bscompress.core.covariance import output_sigma
from bscompress.core.hooks import hook_reason
from bscompress.core.padding import pad_options, refusal
from bscompress.core.surgery import SUPPORTED_CONVS, selection_reason, skip_reason
from bscompress.factorize.gsvd import lowrank_projection_errors, whitened_lowrank
from bscompress.factorize.separable import max_rank_lowrank, relative_errors
from bscompress.factorize.spectra import grouped_view
from bscompress.layers.lowrank import LowRankConv1x1, LowRankLinear
from bscompress.methods.base import (
    Method,
    plain_view,
    rank_for_energy,
    relative_error,
    round_up,
    set_weight,
)


class SVDMethod(Method, name="svd"):
    """Low-rank SVD of 1×1 convs and Linear layers (two thin layers of rank r)."""

    layers = (LowRankConv1x1, LowRankLinear)
    in_auto = True
    pointwise = True

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear | nn.modules.conv._ConvNd)

    def skip_reason(self, name, module, options, first):
        reason = selection_reason(name, options)
        if reason is not None or isinstance(module, nn.Linear):
            return reason or hook_reason(module)
        if not isinstance(module, SUPPORTED_CONVS) or isinstance(
            module, nn.modules.conv._ConvTransposeNd
        ):
            return skip_reason(name, module, options, first)
        if any(k != 1 for k in module.kernel_size):
            return "k×k kernel: --method svd rewrites 1×1 convs and Linear layers"
        return refusal(module)

    def _matrix(self, module: nn.Module) -> tuple[torch.Tensor, int]:
        if isinstance(module, nn.Linear):
            return module.weight, 1
        return module.weight.reshape(module.weight.shape[0], -1), module.groups

    def _spectrum(self, module):
        matrix, groups = self._matrix(module)
        # [g, N/g, M/g] per group
        return torch.linalg.svdvals(
            grouped_view(matrix.detach().to(torch.float64), groups).squeeze(-1)
        )

    def choose(self, module, options):
        matrix, groups = self._matrix(module)
        full = max_rank_lowrank(matrix.shape, groups)
        if options.energy is not None:
            rank = rank_for_energy(self._spectrum(module), options.energy)
        else:
            rank = options.rank or max(1, full // 4)
        return {"rank": round_up(rank, options.round_to, full)}, self._pad(module)

    @staticmethod
    def _pad(module: nn.Module) -> dict:
        return {} if isinstance(module, nn.Linear) else pad_options(module)

    #: at most this many ranks per layer are offered to the budget allocator
    MAX_CANDIDATES = 24

    def candidates(self, module, options, errors=True):
        matrix, groups = self._matrix(module)
        full = max_rank_lowrank(matrix.shape, groups)
        errors = relative_errors(self._spectrum(module))
        step = max(options.round_to, math.ceil(full / self.MAX_CANDIDATES))
        ranks = sorted({round_up(r, options.round_to, full) for r in range(step, full + 1, step)}
                       | {round_up(1, options.round_to, full)})
        pad = self._pad(module)
        return [({"rank": r}, dict(pad), float(errors[r])) for r in ranks]

    def _layer(self, module):
        return LowRankLinear if isinstance(module, nn.Linear) else LowRankConv1x1

    def build(self, module, entry):
        view = module if isinstance(module, nn.Linear) else plain_view(module, entry)[0]
        block = self._layer(module).from_conv(view, **entry.ranks)
        return block, relative_error(module.weight, block.to_dense())

    def structure(self, module, entry):
        view = module if isinstance(module, nn.Linear) else plain_view(module, entry)[0]
        return self._layer(module).empty_like(view, **entry.ranks)

    def held_out_errors(self, module, entry, rest, held_sigma):
        """Both fits of every rank are projections of W (the truncated SVD onto W's left
        singular vectors, the whitened one onto those of W L): their errors come from one
        product per basis and layer (``gsvd.lowrank_projection_errors``, reusable)."""
        matrix, groups = self._matrix(module)
        weight = grouped_view(matrix.detach().to(torch.float64), groups).squeeze(-1)
        tables = lowrank_projection_errors(weight, output_sigma(rest), held_sigma)
        rank = min(entry.ranks["rank"], tables[0].shape[-1] - 1)
        free, aware = (float(table[:, rank].clamp_min(0.0).sum()) for table in tables)
        return free, aware

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """Whitened SVD with Σ (its K×K blocks when the full Σ was over the memory bound):
        the exact optimum at the block's rank."""
        left, right, _ = whitened_lowrank(weight, output_sigma(cov), block.rank)
        first, second = ((block.fc1, block.fc2) if isinstance(block, LowRankLinear)
                         else (block.pw1, block.pw2))
        set_weight(first.weight, right.transpose(1, 2))
        set_weight(second.weight, left)
        return "whitened svd"
