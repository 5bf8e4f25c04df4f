"""BSConv-S: BSConv-U whose pointwise matrix goes through an M' = p·M subspace."""

from __future__ import annotations

import torch

from bscompress.core.padding import pad_options
from bscompress.factorize.gsvd import refit_blueprints
from bscompress.factorize.separable import bsconv_s_error_tables, bsconv_s_mid_channels
from bscompress.layers.separable import BSConvS
from bscompress.methods.base import DATA_FREE, RankOptions, round_up, set_weight
from bscompress.methods.bsconv_u import BSConvUMethod


class BSConvSMethod(BSConvUMethod, name="bsconv-s"):
    """BSConv-S: BSConv-U whose pointwise matrix goes through an M' = p·M subspace."""

    layers = (BSConvS,)
    in_auto = False

    def choose(self, conv, options):
        ranks, _ = super().choose(conv, options)
        groups = conv.groups
        mid = bsconv_s_mid_channels(conv.weight.shape, groups, ranks["rank"], options.p)
        limit = min(conv.in_channels // groups, conv.out_channels // groups * ranks["rank"])
        mid = round_up(mid, options.round_to, limit)
        # p recomputed from the rounded width, so that the block rebuilds with exactly M'
        return ranks, {"p": mid / (conv.in_channels // groups), **pad_options(conv)}

    #: bottleneck widths M' the budget allocator tries, as fractions of M/g
    FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)

    def candidates(self, conv, options, errors=True):
        """Every blueprint rank × the widths at ``FRACTIONS``; the error is exact
        (``bsconv_s_error_tables``: BSConv-U's plus the dropped pointwise energy)."""
        result, seen = [], set()
        tables = bsconv_s_error_tables(conv.weight, conv.groups)  # one per rank, 1…full
        for rank, table in enumerate(tables, start=1):
            for fraction in self.FRACTIONS:
                ranks, extra = self.choose(conv, RankOptions(rank=rank, p=fraction,
                                                             round_to=options.round_to))
                mid = round(extra["p"] * (conv.in_channels // conv.groups))
                if (rank, mid) in seen:
                    continue
                seen.add((rank, mid))
                result.append((ranks, extra, float(table[min(mid, len(table) - 1)])))
        return result

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """The blueprints refit by least squares given the block's pw2·pw1 pointwise."""
        if cov.full is None:
            return DATA_FREE
        g, n = block.groups, block.out_channels // block.groups
        m, k = block.in_channels // g, weight.shape[-1] // (block.in_channels // g)
        pointwise = _pointwise(block).reshape(g, n, block.rank, m).transpose(2, 3)
        v = refit_blueprints(weight.reshape(g, n, m, k), pointwise, cov.full)
        set_weight(block.dw.weight, v.transpose(2, 3))
        return "blueprint refit"


def _pointwise(block: BSConvS) -> torch.Tensor:
    """pw2·pw1: ``[g, N·r/g, M/g]`` float64."""
    g, mid = block.groups, block.mid_channels
    a = block.pw1.weight.detach().double().reshape(g, mid, -1)
    b = block.pw2.weight.detach().double().reshape(g, -1, mid)
    return torch.bmm(b, a)  # [g, N·r/g, M/g]
