"""CP with a shared bottleneck: 1×1 (M→R) → depthwise over R → 1×1 (R→N); tensorly ALS.

Two methods: ``cp`` (3-mode CP, each rank-one spatial kernel kept whole) and ``cp4`` (4-mode
CP, Lebedev et al.: the kernel split into kh×1 then 1×kw)."""

from __future__ import annotations

import math

import torch

from bscompress.core.errors import BadInput
from bscompress.core.padding import pad_options
from bscompress.factorize.cp import clip_cp_rank, cp_factors
from bscompress.factorize.gsvd import refit_last
from bscompress.layers.tensor import CPConv
from bscompress.methods.base import (
    DATA_FREE,
    ConvMethod,
    RankOptions,
    channels,
    plain_view,
    register,
    relative_error,
    round_up,
    set_weight,
)


class CPMethod(ConvMethod):
    """CP with a shared bottleneck: 1×1 (M→R) → depthwise over R → 1×1 (R→N); tensorly ALS.

    ``cp`` keeps each rank-one spatial kernel whole (3-mode CP), ``cp4`` splits it into
    kh×1 and 1×kw (4-mode CP, Lebedev et al.).
    """

    layers = (CPConv,)
    in_auto = True
    energy_supported = False
    lr_group = "cp"  # unstable under plain SGD: fine-tuned at lr·cp_lr
    spatial_kernels = True

    #: output-channel fractions the budget allocator tries
    FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)
    #: ALS iterations of the fits that measure each candidate's error
    CANDIDATE_ITERS = 15
    #: the dtype those fits run in (``cp_factors(precision=)``): they only rank forms
    CANDIDATE_PRECISION = torch.float32

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = "cp" if mode == "cp3" else "cp4"

    def skip_reason(self, name, module, options, first):
        reason = super().skip_reason(name, module, options, first)
        if reason is None and self.mode == "cp4" and len(module.kernel_size) != 2:
            return "cp4 needs a 2-D kernel: use --method cp for Conv1d"
        return reason

    def choose(self, conv, options):
        if options.energy is not None:
            raise BadInput("--energy does not apply to CP (it has no singular values): "
                           "use --cp-rank or --rank")
        groups = conv.groups
        rank = options.rank or channels(options.cp_rank, conv.out_channels // groups)
        full = clip_cp_rank(conv.weight.shape, 10**9, self.mode, groups)
        rank = round_up(min(rank, full), options.round_to, full)
        return {"rank": rank}, {"mode": self.mode, "n_iter_max": options.cp_iters,
                                **pad_options(conv)}

    def candidates(self, conv, options, errors=True):
        """Ranks at ``FRACTIONS`` of N/g; the error of each is measured by an ALS fit (at
        most ``CANDIDATE_ITERS`` iterations, seeded): CP has no singular values to read it
        from, so this costs one tensorly ``parafac`` per rank and layer — skipped, with NaN
        errors, when ``errors`` is false."""
        seen, result = set(), []
        for fraction in self.FRACTIONS:
            ranks, extra = self.choose(conv, RankOptions(cp_rank=fraction,
                                                         round_to=options.round_to,
                                                         cp_iters=options.cp_iters))
            if ranks["rank"] in seen:
                continue
            seen.add(ranks["rank"])
            error = math.nan
            if errors:
                error = float(cp_factors(conv.weight, ranks["rank"], self.mode, conv.groups,
                                         n_iter_max=min(options.cp_iters,
                                                        self.CANDIDATE_ITERS),
                                         precision=self.CANDIDATE_PRECISION).relative_error)
            result.append((ranks, extra, error))
        return result

    def candidate_options(self, options):
        """A candidate's ALS fit is capped at ``CANDIDATE_ITERS`` iterations and runs in
        float32, like its data-free error (``candidates``): it only ranks forms."""
        if "n_iter_max" not in options:
            return options
        return {**options, "n_iter_max": min(options["n_iter_max"], self.CANDIDATE_ITERS),
                "als_dtype": "float32"}

    def build(self, conv, entry):
        view, _ = plain_view(conv, entry)
        precision = (self.CANDIDATE_PRECISION if entry.options.get("als_dtype") == "float32"
                     else torch.float64)
        block = CPConv.from_conv(view, entry.ranks["rank"], mode=self.mode,
                                 n_iter_max=entry.options.get("n_iter_max", 50),
                                 random_state=0, precision=precision)
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        view, _ = plain_view(conv, entry)
        return CPConv.empty_like(view, entry.ranks["rank"], mode=self.mode)

    def spatial_stage(self, block):
        """The depthwise ``dw`` of 3-mode CP; none for 4-mode CP (pairs of 1-D kernels)."""
        return "dw" if block.mode == "cp3" else None

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """The last 1×1 (``pw2``) refit by least squares given ``pw1`` and the kernels."""
        if cov.full is None:
            return DATA_FREE
        g, r = block.groups, block.rank
        b = block.pw1.weight.detach().double().reshape(g, r, -1)
        kernels = block.kernels().detach().double().reshape(g, r, -1)
        front = torch.einsum("grm,grk->grmk", b, kernels).reshape(g, r, -1)
        set_weight(block.pw2.weight, refit_last(weight, front, cov.full))
        return "pw2 refit"


register(CPMethod("cp3"))
register(CPMethod("cp4"))
