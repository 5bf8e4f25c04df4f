"""CondConv upcycling of a trained (or factorized) model: chosen convs become
:class:`~bscompress.layers.condconv.CondConv2d` with every expert equal to the trained kernel,
so the model's output is unchanged until fine-tuning lets the experts diverge.

A factorized model lacks capacity, not MACs: E experts on its pointwise convs multiply their
parameters by E at the cost of one routing FC and one mixing product per example.

Upcycling is recorded in the Plan, so archives reload: a conv inside a factorized block adds a
``condconv`` *modifier* to that block's entry (``{"kind": "condconv", "paths": ["pw"], …}``);
any other conv gets its own entry with method ``condconv``.

A subclass of ``nn.Conv2d`` whose ``forward`` pads its input (TF "same", static or from the
input size; :mod:`bscompress.core.padding`) is upcycled with that padding, recorded in its entry's
``options["pad"]``; one whose ``forward`` bscompress cannot reproduce is refused: it gets an
entry giving the reason and is listed in ``meta["upcycle"]["refused"]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bscompress.core.computed_weight import stood_in
from bscompress.core.errors import BadInput
from bscompress.core.padding import as_plain_conv, pad_options, refusal
from bscompress.core.plan import Plan
from bscompress.core.records import UpcycleRecord
from bscompress.core.stats import count_params, format_count, memory_bytes
from bscompress.core.surgery import (
    layer_entry,
    matching_pattern,
    register_modifier,
    register_structure,
    rewrite_finish,
    rewrite_start,
)
from bscompress.layers.condconv import ROUTINGS, CondConv2d

CONDCONV = "condconv"
#: The most experts per conv: CondConv uses 4 to 32; beyond, parameters grow E-fold for no
#: reported gain, and a typo (``--experts 100000``) would fill the disk.
MAX_EXPERTS = 64


@dataclass(frozen=True)
class UpcycleOptions:
    """How convs are upcycled.

    Attributes:
        experts: E, the number of expert kernels per conv (2 to :data:`MAX_EXPERTS`).
        routing: ``normalized-sigmoid`` (default), ``softmax`` or ``sigmoid`` (the paper's;
            see :meth:`CondConv2d.from_conv` for how each starts exact).
        include: glob patterns of conv names to upcycle (any kernel size). By default the
            pointwise (1×1) convs of the factorized blocks, or of the whole model when it has
            none.
        exclude: glob patterns of conv names never upcycled (wins over include).
        noise: standard deviation, relative to each kernel's RMS, of Gaussian noise added to
            every expert to break their symmetry (the output is then no longer exact).
        share_routing: one routing vector per factorized block for all its upcycled convs
            (the paper's choice), computed from the input of the first of them in module order
            (the block's input for the blocks bscompress builds); else one per conv.
        seed: seeds the router initialisation and the noise.
    """

    experts: int = 4
    routing: str = "normalized-sigmoid"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    noise: float = 0.0
    share_routing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_experts(self.experts, "--experts")
        if self.routing not in ROUTINGS:
            raise BadInput(f"--routing {self.routing!r} is unknown; choose one of "
                           f"{', '.join(ROUTINGS)}")
        if self.noise < 0:
            raise BadInput(f"--noise must be ≥ 0, got {self.noise}")


def _check_experts(experts: object, what: str) -> None:
    if isinstance(experts, bool) or not isinstance(experts, numbers.Integral):
        raise BadInput(f"{what} must be a whole number of experts, got {experts!r}")
    if experts < 2:
        raise BadInput(f"{what} must be at least 2, got {experts}")
    if experts > MAX_EXPERTS:
        raise BadInput(f"{what} {experts} is more than {MAX_EXPERTS} experts per conv "
                       f"(CondConv uses 4 to 32): choose {MAX_EXPERTS} or fewer")


def upcycled_size(model: nn.Module, targets: Sequence[str], experts: int) -> tuple[int, int]:
    """``(params, bytes)`` of ``model`` once the convs ``targets`` hold ``experts`` kernels
    each (and a router each: an upper bound with shared routing), before building it."""
    modules = dict(model.named_modules())
    params = count_params(model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for name in targets:
        conv = modules[name]
        kernel = sum(p.numel() for p in conv.parameters(recurse=False))
        size = conv.weight.element_size()
        extra = (experts - 1) * kernel + (conv.in_channels + 1) * experts
        params += extra
        nbytes += extra * size
    return params, nbytes


def check_upcycled_size(model: nn.Module, targets: Sequence[str], experts: int) -> None:
    """Refuse an upcycling whose model would not fit in a quarter of this machine's memory
    (the command holds the original beside it, then writes it), naming the size.

    Raises:
        BadInput: naming ``--experts``, the parameters and the bytes.
    """
    params, nbytes = upcycled_size(model, targets, experts)
    limit = memory_bytes() // 4
    if nbytes > limit:
        raise BadInput(
            f"--experts {experts} on {len(targets)} convs would make a model of "
            f"{format_count(params)} parameters ({nbytes / 2**30:.1f} GiB), more than a quarter "
            f"of this machine's memory ({limit / 2**30:.1f} GiB): use fewer --experts or "
            "upcycle fewer convs (--include/--exclude)")


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and all(k == 1 for k in module.kernel_size)


def select_targets(model: nn.Module, plan: Plan | None, options: UpcycleOptions) -> list[str]:
    """The dotted names of the convs to upcycle, in module order (see :class:`UpcycleOptions`).
    """
    blocks = [entry.name for entry in plan.replaced()] if plan else []

    def in_block(name: str) -> bool:
        return any(name.startswith(block + ".") for block in blocks)

    # a replaced layer that is a plain conv again (a block reduced to its 1×1) keeps its entry
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and name not in blocks]
    if options.include:
        chosen = [n for n, _ in convs if matching_pattern(n, options.include)]
    elif any(in_block(n) for n, _ in convs):
        chosen = [n for n, m in convs if in_block(n) and _is_pointwise(m)]
    else:
        chosen = [n for n, m in convs if _is_pointwise(m)]
    return [n for n in chosen if matching_pattern(n, options.exclude) is None]


@stood_in  # convs whose forward computes their weight (weight standardisation)
def upcycle(
    model: nn.Module,
    input_shape: Sequence[int],
    options: UpcycleOptions = UpcycleOptions(),
    plan: Plan | None = None,
) -> tuple[nn.Module, Plan]:
    """Upcycle, in place, the convs of ``model`` that ``options`` selects.

    Args:
        model: a trained model, or a factorized one with the ``plan`` it was built by.
        input_shape: the shape MACs are counted at (the plan's when it has one).
        options: experts, routing and which convs.
        plan: the model's Plan (archives); a new one is made for a plain model.

    Returns:
        ``(model, plan)``: the plan gains a ``condconv`` modifier on each factorized block
        holding upcycled convs and a ``condconv`` entry for each other upcycled conv, with
        params and MACs after, and ``meta["upcycle"]``.

    Raises:
        BadInput: when nothing is selected, or a selected conv cannot be upcycled.
    """
    targets = select_targets(model, plan, options)
    modules = dict(model.named_modules())
    plan, before, foreign = rewrite_start(model, plan, input_shape)
    refused = {name: reason for name in targets
               if (reason := refusal(modules[name]) or foreign.get(name)) is not None}
    targets = [name for name in targets if name not in refused]
    if not targets:
        if refused:
            raise BadInput("no conv to upcycle: " + "; ".join(
                f"{name}: {reason}" for name, reason in refused.items()))
        where = " matching --include" if options.include else " (1×1)"
        raise BadInput(f"no Conv2d{where} to upcycle in this model: name the convs with "
                       "--include GLOB (e.g. --include 'layer*.conv*')")
    check_upcycled_size(model, targets, options.experts)
    torch.manual_seed(options.seed)
    for name, reason in refused.items():
        entry = layer_entry(plan, name, modules[name], before)
        if not entry.replaced:
            entry.skip_reason = f"upcycle: {reason}"
    grouped: dict[str, list[str]] = {}
    own = []
    for name in targets:
        owner = next((e.name for e in plan.replaced() if name.startswith(e.name + ".")), None)
        if owner is not None:
            grouped.setdefault(owner, []).append(name[len(owner) + 1:])
            continue
        entry = layer_entry(plan, name, modules[name], before)
        entry.method, entry.ranks, entry.skip_reason = CONDCONV, {}, None
        entry.options = {"experts": options.experts, "routing": options.routing,
                         **pad_options(modules[name])}
        own.append(name)
    generator = torch.Generator().manual_seed(options.seed)
    for name in own:
        conv = as_plain_conv(modules[name], pad_options(modules[name]).get("pad"))
        model.set_submodule(name, CondConv2d.from_conv(
            conv, options.experts, options.routing, options.noise, generator=generator))
    entries = {entry.name: entry for entry in plan.layers}
    for owner, paths in grouped.items():
        spec = {"kind": CONDCONV, "paths": paths, "experts": options.experts,
                "routing": options.routing, "shared": options.share_routing}
        entries[owner].modifiers.append(spec)
        # the modifier keeps the block object, so no re-parenting
        _upcycle_block(modules[owner], spec, options.noise, generator)
    rewrite_finish(model, plan, input_shape, list(grouped) + own)
    plan.summary.upcycle = UpcycleRecord(**asdict(options), convs=len(targets), refused=refused)
    return model, plan


def _upcycle_block(block: nn.Module, spec: dict, noise: float = 0.0,
                   generator: torch.Generator | None = None) -> nn.Module:
    """The ``condconv`` modifier: the convs at ``spec["paths"]`` inside ``block`` become
    CondConv2d from their current weights (trained when upcycling, uninitialised when an
    archive is rebuilt); with ``spec["shared"]`` the first routes and the others reuse its
    gates."""
    paths = spec.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadInput(f"the condconv modifier of a {type(block).__name__} has paths "
                       f"{paths!r}, not a list of submodule names: the archive is damaged")
    _check_experts(spec.get("experts"), "the condconv modifier's experts")
    if spec.get("routing") not in ROUTINGS:
        raise BadInput(f"the condconv modifier's routing {spec.get('routing')!r} is unknown; "
                       f"the archive is damaged (one of {', '.join(ROUTINGS)} expected)")
    leader = None
    for path in paths:
        try:
            conv = block.get_submodule(path)
        except AttributeError:
            raise BadInput(f"the condconv modifier names {path!r}, which a "
                           f"{type(block).__name__} does not have: the archive is "
                           "damaged") from None
        if not isinstance(conv, nn.Conv2d):
            raise BadInput(f"cannot upcycle {path!r} of a {type(block).__name__}: it is a "
                           f"{type(conv).__name__}, not an nn.Conv2d")
        new = CondConv2d.from_conv(conv, spec["experts"], spec["routing"], noise, leader,
                                   generator)
        if spec.get("shared") and leader is None:
            leader = new
        block.set_submodule(path, new)
    return block


def _condconv_structure(conv: nn.Module, entry) -> CondConv2d:
    """The ``condconv`` method of a plan entry, rebuilt from the plan's options alone."""
    options = entry.options if isinstance(entry.options, dict) else {}
    _check_experts(options.get("experts"), f"layer {entry.name}: condconv experts")
    if options.get("routing") not in ROUTINGS:
        raise BadInput(f"layer {entry.name}: condconv routing {options.get('routing')!r} is "
                       f"unknown; the archive is damaged (one of {', '.join(ROUTINGS)} "
                       "expected)")
    if not isinstance(conv, nn.Conv2d):
        raise BadInput(f"layer {entry.name} is a {type(conv).__name__}, not an nn.Conv2d: "
                       "condconv applies to convs only; the archive is damaged")
    return CondConv2d.from_conv(as_plain_conv(conv, options.get("pad")), options["experts"],
                                options["routing"])


register_structure(CONDCONV, _condconv_structure)
register_modifier(CONDCONV, _upcycle_block)

__all__ = ["CONDCONV", "MAX_EXPERTS", "UpcycleOptions", "check_upcycled_size", "select_targets",
           "upcycle", "upcycled_size"]
