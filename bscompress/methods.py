"""The factorization methods: which layers each one takes, how it picks ranks, and how it builds
the replacement block (from the trained weights, or as an empty structure for archives).

Each method is a small object with

* ``skip_reason(module, options, first)``: why it leaves an (already user-selected) layer alone;
* ``choose(module, options)``: the ranks and options of the plan entry (cheap: spectra only);
* ``build(module, entry)``: the block with closed-form weights and its relative error
  ‖W − Ŵ‖²_F / ‖W‖²_F;
* ``structure(module, entry)``: the same block without computing weights.

A conv subclass that pads its input in its own ``forward`` (TF "same", static or from the input
size; :mod:`bscompress.padding`) gets ``options["pad"]`` in its entry from ``choose`` and
``candidates``; ``build`` and ``structure`` give that padding to the block's spatial stage, so
that archives rebuild it from the plan alone. A subclass whose ``forward`` cannot be reproduced
is refused by ``skip_reason`` with the reason.

Methods register themselves with :func:`bscompress.surgery.register_structure` so that
archives can be rebuilt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bscompress.errors import BadInput
from bscompress.factorize.cp import clip_cp_rank
from bscompress.factorize.separable import (
    bsconv_s_error_tables,
    bsconv_s_mid_channels,
    max_rank_blueprint,
    max_rank_depthwise,
    max_rank_lowrank,
    relative_errors,
)
from bscompress.factorize.spectra import blueprint_spectrum, depthwise_spectrum, grouped_view
from bscompress.factorize.tucker import clip_tucker2_ranks, hosvd_spectra
from bscompress.layers.lowrank import LowRankConv1x1, LowRankLinear
from bscompress.layers.separable import BSConvS, BSConvU, DSConv
from bscompress.layers.tensor import CPConv, Tucker2Conv
from bscompress.padding import as_plain_conv, pad_options, refusal
from bscompress.plan import LayerPlan
from bscompress.surgery import (
    SUPPORTED_CONVS,
    Eligibility,
    register_structure,
    selection_reason,
    skip_reason,
)


@dataclass(frozen=True)
class RankOptions:
    """How ranks are chosen, per layer.

    Attributes:
        rank: fixed rank (BSConv-U/-S and DSC: per filter / channel multiplier; svd: rank).
        energy: instead of ``rank``, the smallest rank keeping this fraction of the squared
            singular values of each layer (0 < energy ≤ 1).
        p: BSConv-S bottleneck ratio M'/M.
        tucker_ranks: Tucker-2 ranks as a fraction of the channels (≤ 1) or absolute (> 1).
        cp_rank: CP rank as a fraction of the output channels (≤ 1) or absolute (> 1).
        round_to: round bottleneck widths (Tucker-2/CP/svd ranks, BSConv-S M') up to a
            multiple of this, for hardware efficiency.
        allow_growth: rewrite layers even when the block costs more MACs than the layer.
        tucker_iters: HOOI iterations after the HOSVD initialisation of Tucker-2.
        cp_iters: ALS iterations of CP (seeded, SVD initialisation).
    """

    rank: int | None = None
    energy: float | None = None
    p: float = 0.25
    tucker_ranks: float = 0.25
    cp_rank: float = 0.25
    round_to: int = 1
    allow_growth: bool = False
    tucker_iters: int = 5
    cp_iters: int = 50

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise BadInput("give either --rank or --energy, not both")
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise BadInput(f"--energy must be in (0, 1], got {self.energy}")
        if not 0 < self.p <= 1:
            raise BadInput(f"--p must be in (0, 1], got {self.p}")
        for option, value in (("--tucker-ranks", self.tucker_ranks),
                              ("--cp-rank", self.cp_rank)):
            if value <= 0 or (value > 1 and value != int(value)):
                raise BadInput(f"{option} must be a fraction in (0, 1] or a whole number of "
                               f"channels, got {value}")
        if self.round_to < 1:
            raise BadInput(f"--round-to must be at least 1, got {self.round_to}")


def round_up(value: int, multiple: int, limit: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``, at least 1, at most ``limit``."""
    return max(1, min(limit, math.ceil(value / multiple) * multiple))


def rank_for_energy(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest rank whose relative truncation error is at most ``1 - energy``."""
    errors = relative_errors(spectrum)
    ok = (errors <= 1 - energy + 1e-12).nonzero()
    return max(1, int(ok[0]))


def plain_view(conv: nn.Module, entry: LayerPlan) -> tuple[nn.Module, dict]:
    """``conv`` as the plain conv its block is built from (padding its input as the entry's
    ``options["pad"]`` says, sharing the weights) and the entry's other options."""
    options = dict(entry.options)
    return as_plain_conv(conv, options.pop("pad", None)), options


def _channels(value: float, channels: int) -> int:
    """A fraction of ``channels`` (value ≤ 1) or an absolute count, at least 1."""
    count = math.ceil(value * channels) if value <= 1 else int(value)
    return max(1, count)


class ConvMethod:
    """Base of the methods that rewrite k×k convolutions."""

    name = ""
    layer: type[nn.Module] = nn.Module

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.conv._ConvNd)

    def skip_reason(self, name: str, module: nn.Module, options: Eligibility,
                    first: bool) -> str | None:
        return skip_reason(name, module, options, first)

    def _spectrum(self, conv: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def _full_rank(self, conv: nn.Module) -> int:
        raise NotImplementedError

    def choose(self, conv: nn.Module, options: RankOptions) -> tuple[dict, dict]:
        full = self._full_rank(conv)
        if options.energy is not None:
            rank = rank_for_energy(self._spectrum(conv), options.energy)
        else:
            rank = options.rank or 1
        return {"rank": min(rank, full)}, pad_options(conv)

    def candidates(self, conv: nn.Module, options: RankOptions,
                   errors: bool = True) -> list[tuple[dict, dict, float]]:
        """Every rank the budget allocator may give the layer: ``(ranks, options, error)``
        with the relative weight error from the singular values (exact for the SVD forms).

        ``errors=False`` tells a method whose errors need a fit per rank (CP) that the
        caller measures them itself; the spectra methods read theirs at no cost anyway."""
        spectrum_errors = relative_errors(self._spectrum(conv))
        pad = pad_options(conv)
        return [({"rank": r}, dict(pad), float(spectrum_errors[r]))
                for r in range(1, self._full_rank(conv) + 1)]

    def build(self, conv: nn.Module, entry: LayerPlan) -> tuple[nn.Module, float]:
        view, options = plain_view(conv, entry)
        block = self.layer.from_conv(view, **entry.ranks, **options)
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv: nn.Module, entry: LayerPlan) -> nn.Module:
        view, options = plain_view(conv, entry)
        return self.layer.empty_like(view, **entry.ranks, **options)


class BSConvUMethod(ConvMethod):
    """BSConv-U: pointwise → depthwise, rank r blueprints per filter (per-filter SVD)."""

    name = "bsconv-u"
    layer = BSConvU

    def _spectrum(self, conv):
        return blueprint_spectrum(conv.weight, conv.groups)

    def _full_rank(self, conv):
        return max_rank_blueprint(conv.weight.shape, conv.groups)


class DSCMethod(ConvMethod):
    """Depthwise-separable: depthwise (multiplier r) → pointwise (per-input-channel SVD)."""

    name = "dsc"
    layer = DSConv

    def _spectrum(self, conv):
        return depthwise_spectrum(conv.weight, conv.groups)

    def _full_rank(self, conv):
        return max_rank_depthwise(conv.weight.shape, conv.groups)


class BSConvSMethod(BSConvUMethod):
    """BSConv-S: BSConv-U whose pointwise matrix goes through an M' = p·M subspace."""

    name = "bsconv-s"
    layer = BSConvS

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


class Tucker2Method(ConvMethod):
    """Tucker-2: 1×1 (M→R_in) → k×k core (R_in→R_out) → 1×1 (R_out→N); tensorly HOOI."""

    name = "tucker2"

    def choose(self, conv, options):
        groups = conv.groups
        n_g, m_g = conv.out_channels // groups, conv.in_channels // groups
        if options.energy is not None:
            out_spectrum, in_spectrum = hosvd_spectra(conv.weight, groups)
            r_out = rank_for_energy(out_spectrum, options.energy)
            r_in = rank_for_energy(in_spectrum, options.energy)
        elif options.rank is not None:
            r_out = r_in = options.rank
        else:
            r_out = _channels(options.tucker_ranks, n_g)
            r_in = _channels(options.tucker_ranks, m_g)
        full_out, full_in = clip_tucker2_ranks(conv.weight.shape, (n_g, m_g), groups)
        r_out = round_up(r_out, options.round_to, full_out)
        r_in = round_up(r_in, options.round_to, full_in)
        return {"out": r_out, "in": r_in}, {"n_iter_max": options.tucker_iters,
                                            **pad_options(conv)}

    #: channel fractions the budget allocator tries (both modes alike)
    FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)

    def candidates(self, conv, options, errors=True):
        """Ranks at ``FRACTIONS`` of the channels; error = the truncated-HOSVD bound
        e_out(R_out) + e_in(R_in) (HOOI lands below it)."""
        out_spectrum, in_spectrum = hosvd_spectra(conv.weight, conv.groups)
        e_out, e_in = relative_errors(out_spectrum), relative_errors(in_spectrum)
        seen, result = set(), []
        for fraction in self.FRACTIONS:
            ranks, extra = self.choose(conv, RankOptions(tucker_ranks=fraction,
                                                         round_to=options.round_to,
                                                         tucker_iters=options.tucker_iters))
            key = (ranks["out"], ranks["in"])
            if key in seen:
                continue
            seen.add(key)
            error = float(e_out[min(key[0], len(e_out) - 1)] + e_in[min(key[1], len(e_in) - 1)])
            result.append((ranks, extra, min(error, 1.0)))
        return result

    def build(self, conv, entry):
        view, _ = plain_view(conv, entry)
        block = Tucker2Conv.from_conv(view, (entry.ranks["out"], entry.ranks["in"]),
                                      n_iter_max=entry.options.get("n_iter_max", 5))
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        view, _ = plain_view(conv, entry)
        return Tucker2Conv.empty_like(view, (entry.ranks["out"], entry.ranks["in"]))


class CPMethod(ConvMethod):
    """CP with a shared bottleneck: 1×1 (M→R) → depthwise over R → 1×1 (R→N); tensorly ALS.

    ``cp`` keeps each rank-one spatial kernel whole (3-mode CP), ``cp4`` splits it into
    kh×1 and 1×kw (4-mode CP, Lebedev et al.).
    """

    #: output-channel fractions the budget allocator tries
    FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)
    #: ALS iterations of the fits that measure each candidate's error
    CANDIDATE_ITERS = 15

    def candidates(self, conv, options, errors=True):
        """Ranks at ``FRACTIONS`` of N/g; the error of each is measured by an ALS fit (at
        most ``CANDIDATE_ITERS`` iterations, seeded): CP has no singular values to read it
        from, so this costs one tensorly ``parafac`` per rank and layer — skipped, with NaN
        errors, when ``errors`` is false."""
        from bscompress.factorize.cp import cp_factors

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
                                                        self.CANDIDATE_ITERS)).relative_error)
            result.append((ranks, extra, error))
        return result

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
        rank = options.rank or _channels(options.cp_rank, conv.out_channels // groups)
        full = clip_cp_rank(conv.weight.shape, 10**9, self.mode, groups)
        rank = round_up(min(rank, full), options.round_to, full)
        return {"rank": rank}, {"mode": self.mode, "n_iter_max": options.cp_iters,
                                **pad_options(conv)}

    def build(self, conv, entry):
        view, _ = plain_view(conv, entry)
        block = CPConv.from_conv(view, entry.ranks["rank"], mode=self.mode,
                                 n_iter_max=entry.options.get("n_iter_max", 50),
                                 random_state=0)
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        view, _ = plain_view(conv, entry)
        return CPConv.empty_like(view, entry.ranks["rank"], mode=self.mode)


class SVDMethod:
    """Low-rank SVD of 1×1 convs and Linear layers (two thin layers of rank r)."""

    name = "svd"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear | nn.modules.conv._ConvNd)

    def skip_reason(self, name, module, options, first):
        reason = selection_reason(name, options)
        if reason is not None or isinstance(module, nn.Linear):
            return reason
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


def relative_error(weight: torch.Tensor, dense: torch.Tensor) -> float:
    """‖W − Ŵ‖²_F / ‖W‖²_F (0 for an all-zero W)."""
    w = weight.detach().to(torch.float64)
    total = float(w.square().sum())
    if total == 0.0:
        return 0.0
    return float((w - dense.detach().to(torch.float64).reshape(w.shape)).square().sum()) / total


METHODS: dict[str, object] = {}


def register(method) -> None:
    """Make ``method`` available to ``decompose`` and to archive loading."""
    METHODS[method.name] = method
    register_structure(method.name, method.structure)


def get_method(name: str):
    """The method called ``name``; :class:`BadInput` listing the known ones otherwise."""
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


for _method in (BSConvUMethod(), BSConvSMethod(), DSCMethod(), Tucker2Method(),
                CPMethod("cp3"), CPMethod("cp4"), SVDMethod()):
    register(_method)
