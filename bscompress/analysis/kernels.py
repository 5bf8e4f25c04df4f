"""``inspect --kernels``: what the spatial kernels of a model look like (VGNet, Zhang et al. 2022).

VGNet's observation: trained strided depthwise kernels look like Gaussian blurs, many others
are edge detectors (Sobel, Laplacian) or near-identity, so they can be **fixed**. This module
measures that on any model. It collects every spatial kernel that acts on one channel:

* ``depthwise``: every ``nn.Conv2d`` / ``nn.Conv1d`` with ``groups == in_channels`` and a
  kernel larger than 1 (a channel multiplier is fine): one kernel per output channel;
* ``blueprint``: the ``dw`` stage of :class:`~bscompress.layers.BSConvU` /
  :class:`~bscompress.layers.BSConvS` (N·r blueprints);
* ``dsc``: the ``dw`` stage of :class:`~bscompress.layers.DSConv` (M·r kernels);
* ``cp``: the depthwise stage of :class:`~bscompress.layers.CPConv` (g·R kernels; cp4: the
  outer products of its kh×1 and 1×kw kernels);
* ``fixed``: a :class:`~bscompress.layers.FixedKernelConv` (its full weight).

Tucker-2 cores mix channels: they hold no single-channel kernels. A Conv1d kernel ``[k]`` is
read as a ``1×k`` kernel (its bank then has Gaussians and the identity only).

Every kernel is matched against :func:`bscompress.factorize.kernel_bank.kernel_bank` of its
size by sign-invariant normalised correlation: best member, signed ρ, least-squares scale and
family (gaussian / edge / identity). A kernel is **matched** when |ρ| ≥ ``match`` (default
0.9); counts of matched kernels per family and of negative matches (ρ < 0, i.e. a negated
Gaussian, a flipped Sobel…) are given per layer, per stage, for strided against stride-1
layers (the paper's claim is about strided kernels) and for the whole model.

**Stages.** A layer belongs to the stage named by the dotted prefix of its *parent* path up to
and including the first component that contains a digit (``layer2.0.conv2`` → ``layer2``,
``features.3.1.block.1.0`` → ``features.3``, ``trunk_output.block2.block2-0.f.b`` →
``trunk_output.block2``, ``stages.1.blocks.0.conv_dw`` → ``stages.1``); when no parent component
has a digit, the first component (``features.4`` → ``features``); a top-level layer is its own
stage (``conv1``). For a factorized block the path is the one of the conv it replaced. This
gives torchvision's ResNet ``layerN``, EfficientNet / ConvNeXt ``features.N``, RegNet
``blockN`` and ShuffleNet ``stageN`` stages; MobileNetV2/V3 and MNASNet-style flat
``features`` lists give one stage per block.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.surgery import Eligibility, selection_reason
from bscompress.factorize.kernel_bank import (
    FAMILIES,
    GAUSSIAN_SIGMAS,
    family,
    kernel_bank,
    match_bank,
)
from bscompress.layers import BSConvS, BSConvU, CPConv, DSConv, FixedKernelConv
from bscompress.layers.base import kernel_weight

__all__ = ["FAMILY_NAMES", "KernelReport", "KernelSummary", "LayerKernels", "fixed_assignments",
           "inspect_kernels", "plot_kernels", "stage_of"]

#: The families of the bank, in report order (those of ``kernel_bank.FAMILIES``).
FAMILY_NAMES = tuple(dict.fromkeys(FAMILIES.values()))

#: |ρ| is compared with ``match`` with this slack, so that ``match=1`` accepts exact members.
_RHO_SLACK = 1e-9


def _check_match(match: float) -> float:
    if not (isinstance(match, int | float) and 0 < match <= 1):
        raise BadInput(f"--match {match}: give a correlation threshold in (0, 1], e.g. 0.9")
    return float(match)


def stage_of(name: str) -> str:
    """The stage of the layer ``name`` (see the module docstring)."""
    parts = name.split(".")
    parents = parts[:-1]
    if not parents:
        return name
    for i, part in enumerate(parents):
        if any(c.isdigit() for c in part):
            return ".".join(parts[: i + 1])
    return parents[0]


def fixed_assignments(
    kernels: torch.Tensor,
    bank_names: Sequence[str],
    bank: torch.Tensor,
    match: float = 0.9,
    families: Iterable[str] = FAMILY_NAMES,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[int, str, float]]:
    """Which of ``kernels`` ``[C, kh, kw]`` to replace by a fixed bank member.

    Kernel c is chosen when its best member (sign-invariant normalised correlation, see
    :func:`~bscompress.factorize.kernel_bank.match_bank`) has |ρ| ≥ ``match`` and belongs to
    one of ``families``. A kernel whose best member is of another family is not chosen even
    when a member of an allowed family also passes. With ``moments`` (``(Σ [C, K, K], μ [C, K])``,
    the kernels' input patch second moments and means) ρ and the scale are those of the
    outputs on the data: 1 − ρ² is then the fixed kernel's output error as a share of its
    output's variance.

    Returns:
        ``[(c, member_name, scale)]`` in ascending c; the fixed kernel is
        ``scale · bank[bank_names.index(member_name)]`` (``scale`` signed, least squares).

    Raises:
        ValueError: ``match`` outside (0, 1], an unknown family, or shapes that do not fit.
    """
    if not 0 < match <= 1:
        raise ValueError(f"match must be in (0, 1], got {match}")
    allowed = set(families)
    unknown = allowed - set(FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}: use {list(FAMILY_NAMES)}")
    if len(bank_names) != len(bank):
        raise ValueError(f"{len(bank_names)} bank names for {len(bank)} bank members")
    if kernels.dim() != 3 or tuple(kernels.shape[1:]) != tuple(bank.shape[1:]):
        raise ValueError(f"kernels {list(kernels.shape)} do not fit a bank of "
                         f"{list(bank.shape[1:])} kernels")
    taps = math.prod(kernels.shape[1:])
    if moments is not None and (tuple(moments[0].shape) != (len(kernels), taps, taps)
                                or tuple(moments[1].shape) != (len(kernels), taps)):
        raise ValueError(f"input moments {[list(t.shape) for t in moments]} do not fit "
                         f"{len(kernels)} kernels of {taps} taps")
    result = match_bank(kernels, bank, moments)
    chosen = []
    for c, (i, rho, scale) in enumerate(zip(result.index.tolist(), result.correlation.tolist(),
                                            result.scale.tolist(), strict=True)):
        name = bank_names[i]
        if abs(rho) >= match - _RHO_SLACK and family(name) in allowed:
            chosen.append((c, name, float(scale)))
    return chosen


# --------------------------------------------------------------------------------- report


@dataclass
class KernelSummary:
    """Counts over a set of kernels (a layer, a stage, the strided layers, the model).

    ``matched`` kernels have |ρ| ≥ the report's ``match``; ``gaussian`` + ``edge`` +
    ``identity`` = ``matched`` (by the family of the best member); ``negative`` counts the
    matched kernels with ρ < 0. Shares (``to_dict``) are fractions of ``kernels``, except
    ``negative_share`` which is a fraction of ``matched``.
    """

    name: str
    layers: int
    kernels: int
    matched: int = 0
    gaussian: int = 0
    edge: int = 0
    identity: int = 0
    negative: int = 0
    mean_abs_rho: float = 0.0
    top_member: str | None = None

    def share(self, count: int) -> float:
        """``count`` as a fraction of ``kernels`` (0 when there are none)."""
        return count / self.kernels if self.kernels else 0.0

    @property
    def negative_share(self) -> float:
        return self.negative / self.matched if self.matched else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name, "layers": self.layers, "kernels": self.kernels,
            "matched": self.matched, "gaussian": self.gaussian, "edge": self.edge,
            "identity": self.identity, "negative": self.negative,
            "matched_share": self.share(self.matched),
            "gaussian_share": self.share(self.gaussian), "edge_share": self.share(self.edge),
            "identity_share": self.share(self.identity), "negative_share": self.negative_share,
            "mean_abs_rho": self.mean_abs_rho, "top_member": self.top_member,
        }


@dataclass
class LayerKernels:
    """The kernels of one module and their best bank members.

    Attributes:
        name: the module holding the kernels (``layer1.0.conv1.dw``).
        kind: ``depthwise``, ``blueprint``, ``dsc``, ``cp`` or ``fixed`` (module docstring).
        block: the conv the kernels stand for (the depthwise conv itself, or the conv a
            factorized block replaced); ``stage`` is computed from it.
        kernel_size, stride, dilation: of the spatial stage (``[1, k]`` etc. for Conv1d).
        members, rho, scale: per kernel, the best member's name, signed ρ and scale.
        kernels: ``[C, kh, kw]`` float32 copies (for plots; not in ``to_dict``).
    """

    name: str
    kind: str
    block: str
    stage: str
    kernel_size: list[int]
    stride: list[int]
    dilation: list[int]
    members: list[str]
    rho: list[float]
    scale: list[float]
    kernels: torch.Tensor = field(repr=False)

    @property
    def strided(self) -> bool:
        return any(s > 1 for s in self.stride)

    def matched(self, match: float) -> list[bool]:
        return [abs(r) >= match - _RHO_SLACK for r in self.rho]

    def summary(self, match: float) -> KernelSummary:
        """The counts of this layer alone."""
        return _summarise(self.name, [self], match)

    def to_dict(self, match: float) -> dict:
        summary = self.summary(match).to_dict()
        del summary["name"], summary["layers"]
        return {
            "name": self.name, "kind": self.kind, "block": self.block, "stage": self.stage,
            "kernel_size": self.kernel_size, "stride": self.stride, "dilation": self.dilation,
            **summary,
            "best": self.members,
            "rho": [round(r, 4) for r in self.rho],
            "scale": [float(f"{s:.4g}") for s in self.scale],
        }


def _summarise(name: str, layers: Sequence[LayerKernels], match: float) -> KernelSummary:
    summary = KernelSummary(name, len(layers), sum(len(layer.rho) for layer in layers))
    top: Counter[str] = Counter()
    total_abs = 0.0
    for layer in layers:
        total_abs += sum(abs(r) for r in layer.rho)
        for member, rho, ok in zip(layer.members, layer.rho, layer.matched(match), strict=True):
            if not ok:
                continue
            summary.matched += 1
            kind = family(member)
            setattr(summary, kind, getattr(summary, kind) + 1)
            summary.negative += rho < 0
            top[member] += 1
    summary.mean_abs_rho = total_abs / summary.kernels if summary.kernels else 0.0
    summary.top_member = top.most_common(1)[0][0] if top else None
    return summary


@dataclass
class KernelReport:
    """``inspect --kernels``: per layer, per stage, strided vs stride 1, and the whole model.

    ``by_stride`` has the keys ``"stride 1"`` and ``"strided"`` (only those with layers).
    """

    match: float
    layers: list[LayerKernels]
    stages: list[KernelSummary]
    by_stride: dict[str, KernelSummary]
    total: KernelSummary

    def stage_layers(self, stage: str) -> list[LayerKernels]:
        return [layer for layer in self.layers if layer.stage == stage]

    def to_dict(self) -> dict:
        return {
            "match": self.match,
            "total": self.total.to_dict(),
            "by_stride": {k: v.to_dict() for k, v in self.by_stride.items()},
            "stages": [s.to_dict() for s in self.stages],
            "layers": [layer.to_dict(self.match) for layer in self.layers],
        }


def _geometry(conv: nn.Module) -> tuple[list[int], list[int], list[int]]:
    """Kernel size, stride and dilation of a conv, as 2-D lists (``[1, k]`` for Conv1d)."""
    pad = [1] * (2 - len(conv.kernel_size))
    return (pad + list(conv.kernel_size), pad + list(conv.stride), pad + list(conv.dilation))


def _as_2d(kernels: torch.Tensor, size: list[int]) -> torch.Tensor:
    return kernels.detach().reshape(-1, *size).float().cpu()


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise Conv1d/Conv2d (groups = in_channels, channel multiplier allowed) with a
    kernel larger than 1×1."""
    return (isinstance(module, nn.Conv1d | nn.Conv2d)
            and not isinstance(module, nn.modules.conv._ConvTransposeNd)
            and module.groups == module.in_channels and math.prod(module.kernel_size) > 1)


def _collect(model: nn.Module) -> list[tuple[str, str, str, torch.Tensor, list, list, list]]:
    """``(name, kind, block, kernels [C, kh, kw], kernel_size, stride, dilation)`` of every
    module holding single-channel kernels, in module order."""
    found, claimed = [], set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if name in claimed:
            continue
        if isinstance(module, BSConvU | BSConvS | DSConv):
            kind = "dsc" if isinstance(module, DSConv) else "blueprint"
            size, stride, dilation = _geometry(module.dw)
            if math.prod(size) > 1:
                kernels = _as_2d(kernel_weight(module.dw), size)
                found.append((prefix + "dw", kind, name, kernels, size, stride, dilation))
            claimed.add(prefix + "dw")
        elif isinstance(module, CPConv):
            if module.mode == "cp3":
                size, stride, dilation = _geometry(module.dw)
                where = prefix + "dw"
            else:
                (kh, _), (sh, _), (dh, _) = _geometry(module.dw1)
                (_, kw), (_, sw), (_, dw) = _geometry(module.dw2)
                size, stride, dilation = [kh, kw], [sh, sw], [dh, dw]
                where = prefix + "dw1*dw2"
            if math.prod(size) > 1:
                found.append((where, "cp", name, _as_2d(module.kernels(), size), size, stride,
                              dilation))
            claimed.update({prefix + "dw", prefix + "dw1", prefix + "dw2"})
        elif isinstance(module, FixedKernelConv):
            size = list(module.kernel_size)
            if math.prod(size) > 1:
                found.append((name, "fixed", name, _as_2d(module.to_dense(), size), size,
                              list(module.stride), list(module.dilation)))
        elif is_depthwise(module):
            size, stride, dilation = _geometry(module)
            found.append((name, "depthwise", name, _as_2d(module.weight, size), size, stride,
                          dilation))
    return found


def inspect_kernels(
    model: nn.Module,
    match: float = 0.9,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    sigmas: Sequence[float] = GAUSSIAN_SIGMAS,
    source: str = "the model",
) -> KernelReport:
    """Match every single-channel spatial kernel of ``model`` against the VGNet bank.

    Args:
        model: any module (see the module docstring for what is collected).
        match: |ρ| threshold in (0, 1] for a kernel to count as Gaussian / edge / identity.
        include, exclude: glob patterns on the layer names, as ``inspect --include/--exclude``
            (matched against the module holding the kernels and its dotted prefixes).
        sigmas: the σ of the bank's Gaussians.
        source: how error messages name the model (e.g. its file).

    Raises:
        BadInput: ``match`` outside (0, 1], or no depthwise or blueprint kernels selected.
    """
    match = _check_match(match)
    options = Eligibility(tuple(include), tuple(exclude))
    banks: dict[tuple[int, int], tuple[list[str], torch.Tensor]] = {}
    layers = []
    for name, kind, block, kernels, size, stride, dilation in _collect(model):
        if selection_reason(name, options) is not None:
            continue
        key = (size[0], size[1])
        if key not in banks:
            banks[key] = kernel_bank(key, tuple(sigmas))
        names, bank = banks[key]
        result = match_bank(kernels, bank)
        layers.append(LayerKernels(
            name=name, kind=kind, block=block, stage=stage_of(block), kernel_size=size,
            stride=stride, dilation=dilation,
            members=[names[i] for i in result.index.tolist()],
            rho=result.correlation.tolist(), scale=result.scale.tolist(), kernels=kernels,
        ))
    if not layers:
        selected = " among the layers --include/--exclude select" if include or exclude else ""
        raise BadInput(
            f"{source} has no depthwise convolutions or blueprints{selected} whose kernels "
            "could be matched (kernels > 1×1 of convs with groups = in_channels, or of "
            "BSConv/DSC/CP blocks): decompose it first, e.g. bscompress decompose -m bsconv-u"
        )
    stages = list(dict.fromkeys(layer.stage for layer in layers))
    by_stride = {}
    for key, keep in (("stride 1", False), ("strided", True)):
        chosen = [layer for layer in layers if layer.strided == keep]
        if chosen:
            by_stride[key] = _summarise(key, chosen, match)
    return KernelReport(
        match=match,
        layers=layers,
        stages=[_summarise(s, [la for la in layers if la.stage == s], match) for s in stages],
        by_stride=by_stride,
        total=_summarise("all", layers, match),
    )


# ----------------------------------------------------------------------------------- plot


def _short(member: str) -> str:
    head, _, rest = member.partition(" ")
    return {"gaussian": f"G {rest}", "laplacian": f"lap {rest}", "identity": "id"}.get(
        head, member)


def _pick_layers(layers: list[LayerKernels], count: int) -> list[LayerKernels]:
    """Up to ``count`` layers spread over the depth, half of them strided when there are."""
    if len(layers) <= count:
        return layers

    def spread(items: list[LayerKernels], k: int) -> list[LayerKernels]:
        if k <= 0 or not items:
            return []
        if len(items) <= k:
            return items
        return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]

    strided = [layer for layer in layers if layer.strided]
    plain = [layer for layer in layers if not layer.strided]
    first = spread(strided, min(len(strided), count // 2 if plain else count))
    chosen = {id(layer) for layer in first + spread(plain, count - len(first))}
    return [layer for layer in layers if id(layer) in chosen]


def plot_kernels(
    source: KernelReport | nn.Module,
    path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    max_layers: int = 6,
    per_layer: int = 12,
    match: float = 0.9,
) -> Path:
    """Write a PNG gallery of kernels, like the VGNet paper's figures.

    One row per layer (``layers`` by name, else up to ``max_layers`` spread over the depth,
    half of them strided when the model has strided ones), its first ``per_layer`` kernels
    drawn on a symmetric blue–red scale (per tile), each titled with its best bank member and
    signed ρ (green when |ρ| ≥ the report's ``match``).

    Args:
        source: a report of :func:`inspect_kernels`, or a model to analyse (with ``match``).
        path: the PNG to write (written as is: callers wanting atomic writes pass a
            temporary path).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = source if isinstance(source, KernelReport) else inspect_kernels(source, match)
    if layers is not None:
        by_name = {layer.name: layer for layer in report.layers}
        missing = [n for n in layers if n not in by_name]
        if missing:
            raise BadInput(f"no kernels analysed for layer(s) {', '.join(missing)}")
        rows = [by_name[n] for n in layers]
    else:
        rows = _pick_layers(report.layers, max_layers)
    cols = max(min(per_layer, len(layer.rho)) for layer in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.15 * cols + 1.6, 1.35 * len(rows)),
                             squeeze=False)
    for r, layer in enumerate(rows):
        ok = layer.matched(report.match)
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(layer.rho) or c >= per_layer:
                ax.axis("off")
                continue
            kernel = layer.kernels[c].numpy()
            scale = float(abs(kernel).max()) or 1.0
            ax.imshow(kernel, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
            ax.set_title(f"{_short(layer.members[c])}\nρ={layer.rho[c]:+.2f}", fontsize=6,
                         color="tab:green" if ok[c] else "0.45", pad=2)
        stride = "×".join(map(str, layer.stride)) if layer.strided else "1"
        axes[r][0].set_ylabel(f"{layer.name}\n{layer.kind}, stride {stride}", fontsize=6,
                              rotation=0, ha="right", va="center", labelpad=6)
    fig.suptitle(f"kernels and their best bank member (green: |ρ| ≥ {report.match:g})",
                 fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=130)
    plt.close(fig)
    return path
