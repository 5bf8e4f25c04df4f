"""``inspect``: per-convolution cost, eligibility and the separability analysis of the papers.

For every eligible conv the report gives the fraction of ‖W‖² kept by

* a rank-1 blueprint per filter (BSConv-U; per-filter SVD of the M/g × K matrix),
* rank-1 depthwise decomposition (per-input-channel SVD of the N/g × K slice),
* Tucker-2 at ranks (ceil(N/4), ceil(M/4)) per group (truncated HOSVD through tensorly),

which tells before any rewrite which form a trained layer suits.

A conv subclass that changes ``forward`` is listed with how it pads its input (``padding``:
``"same"`` or static amounts, kept by every rewrite) or, when bscompress cannot reproduce its
``forward``, with that reason as its ``skip_reason`` (:mod:`bscompress.core.padding`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from bscompress.core.computed_weight import original_classes, standing_in
from bscompress.core.foreign_reads import read_reason, watch_reads
from bscompress.core.padding import input_padding, overrides_forward
from bscompress.core.plan import Plan
from bscompress.core.stats import check_finite, count_params, module_macs
from bscompress.core.surgery import Eligibility, conv_layers, eligibility
from bscompress.factorize.spectra import (
    blueprint_spectrum,
    depthwise_spectrum,
    kept_energy,
    quarter_rank,
    tucker2_kept_energy,
)


@dataclass
class ConvReport:
    """One convolution of the model.

    Energies are fractions of ‖W‖² in [0, 1], ``None`` for layers that are not eligible.
    ``padding``: for a conv subclass that pads its input in its ``forward``, ``"same"`` (TF's,
    from the input size) or the static ``F.pad`` amounts that every rewrite keeps.
    """

    name: str
    module_type: str
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    groups: int
    params: int
    macs: int
    mac_share: float
    skip_reason: str | None
    blueprint_rank1: float | None = None
    depthwise_rank1: float | None = None
    tucker2_quarter: float | None = None
    padding: str | list[int] | None = None

    @property
    def eligible(self) -> bool:
        return self.skip_reason is None


@dataclass
class InspectReport:
    """All convolutions of a model plus whole-model totals for ``input_shape``."""

    input_shape: list[int]
    params: int
    macs: int
    layers: list[ConvReport] = field(default_factory=list)

    @property
    def eligible_macs(self) -> int:
        return sum(layer.macs for layer in self.layers if layer.eligible)

    def to_dict(self) -> dict:
        return {
            "input_shape": self.input_shape,
            "params": self.params,
            "macs": self.macs,
            "eligible_layers": sum(layer.eligible for layer in self.layers),
            "eligible_macs": self.eligible_macs,
            "layers": [asdict(layer) for layer in self.layers],
        }


def inspect_model(
    model: nn.Module,
    input_shape: list[int] | tuple[int, ...],
    options: Eligibility = Eligibility(),
    analyse: bool = True,
    progress: Callable[[str], None] | None = None,
    plan: Plan | None = None,
) -> InspectReport:
    """Build the inspect report of ``model``.

    Args:
        model: any module; only its convolutions are listed.
        input_shape: input shape, batch included, for the MAC counts.
        options: which layers are eligible.
        analyse: compute the separability energies (the SVDs) for eligible layers.
        progress: called with each layer name as its analysis starts.
        plan: for a compressed model, the Plan it was built by (its blocks are not re-judged).
    """
    if analyse:
        check_finite(model)
    with standing_in(model) as swapped:  # convs whose forward computes their weight
        return _inspect(model, input_shape, options, analyse, progress, plan,
                        original_classes(swapped))


def _inspect(model: nn.Module, input_shape: list[int] | tuple[int, ...], options: Eligibility,
             analyse: bool, progress: Callable[[str], None] | None, plan: Plan | None,
             classes: dict[str, str]) -> InspectReport:
    with watch_reads(model) as foreign:  # layers the model's code reads the weight of
        stats = module_macs(model, input_shape)
    reasons = eligibility(model, options, plan)
    for name, read in foreign.items():
        if name in reasons and reasons[name] is None:
            reasons[name] = read_reason(read)
    total = max(stats.macs, 1)
    report = InspectReport(list(stats.input_shape), stats.params, stats.macs)
    for name, conv in conv_layers(model):
        macs = stats.module_macs.get(name, 0)
        row = ConvReport(
            name=name,
            module_type=classes.get(name, type(conv).__name__),
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=list(conv.kernel_size),
            stride=list(conv.stride),
            groups=conv.groups,
            params=count_params(conv),
            macs=macs,
            mac_share=macs / total,
            skip_reason=reasons[name],
        )
        lazy = isinstance(conv, nn.modules.lazy.LazyModuleMixin) and \
            conv.has_uninitialized_params()
        if overrides_forward(conv) and not lazy:
            row.padding = input_padding(conv).options().get("pad")
        if analyse and row.eligible:
            if progress is not None:
                progress(name)
            weight, groups = conv.weight, conv.groups
            row.blueprint_rank1 = kept_energy(blueprint_spectrum(weight, groups), 1)
            row.depthwise_rank1 = kept_energy(depthwise_spectrum(weight, groups), 1)
            ranks = (quarter_rank(conv.out_channels // groups),
                     quarter_rank(conv.in_channels // groups))
            row.tucker2_quarter = tucker2_kept_energy(weight, ranks, groups)
        report.layers.append(row)
    return report
