"""Layer surgery: which layers are eligible (with a reason when not) and module replacement.

The replacement walk follows BSConv's replacer: a *filter* decides whether a child is replaced,
a *transformer* builds its replacement, the walk goes down ``named_children`` and never descends
into a child it has replaced. Replacements keep the module's name, so state_dict keys of the
untouched layers do not change.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.foreign_reads import read_reason, watch_reads
from bscompress.core.padding import refusal
from bscompress.core.plan import LayerPlan, Plan
from bscompress.core.records import Summary
from bscompress.core.stats import ModelStats, count_params, module_macs

#: Convolutions the factorizations handle.
SUPPORTED_CONVS = (nn.Conv1d, nn.Conv2d)

Transformer = Callable[[nn.Module, LayerPlan], nn.Module]
Modifier = Callable[[nn.Module, dict], nn.Module]
_STRUCTURES: dict[str, Transformer] = {}
_MODIFIERS: dict[str, Modifier] = {}


@dataclass(frozen=True)
class Eligibility:
    """Which convolutions may be rewritten.

    Attributes:
        include: glob patterns; when given, only layers matching one are eligible.
        exclude: glob patterns; matching layers are never rewritten (wins over include).
        min_in_channels: convs with fewer input channels per group are skipped (a stem conv on
            RGB input has 3: too few for a separable form to save anything).
        classifier: rewrite the model's classifier too: its output layer (the conv or Linear
            layer that runs last) when that is a Linear layer or a 1×1 conv. It is kept dense
            by default — its errors reach the logits unfiltered and it holds few of the MACs —
            unless ``include`` names it.

    A pattern matches a layer name (``layer1.0.conv1``) or any of its dotted prefixes, so
    ``layer4`` matches every layer inside ``layer4``.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_in_channels: int = 8
    classifier: bool = False


#: the skip reason of the output layer (``Eligibility.classifier``)
CLASSIFIER_REASON = ("the model's output layer (its classifier): kept dense; "
                     "--include-classifier rewrites it")


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching ``name`` or one of its dotted prefixes, else ``None``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution (any dimension, transposed too) with its dotted name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def selection_reason(name: str, options: Eligibility = Eligibility()) -> str | None:
    """Why the user's ``--include`` / ``--exclude`` globs leave layer ``name`` out, if they do."""
    pattern = matching_pattern(name, options.exclude)
    if pattern is not None:
        return f"excluded by --exclude {pattern!r}"
    if options.include and matching_pattern(name, options.include) is None:
        return "not matched by --include"
    return None


def skip_reason(
    name: str, module: nn.Module, options: Eligibility = Eligibility(), first: bool = False
) -> str | None:
    """Why the factorizations leave ``module`` alone, or ``None`` if it is eligible.

    ``first`` marks the model's first convolution, named as such in the reason.
    """
    reason = selection_reason(name, options)
    if reason is not None:
        return reason
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed conv: not supported"
    if not isinstance(module, SUPPORTED_CONVS):
        return f"{type(module).__name__}: only Conv1d and Conv2d are supported"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not initialised yet: run one forward pass first"
    reason = refusal(module)  # a subclass whose forward is not a (padded) conv
    if reason is not None:
        return reason
    if all(k == 1 for k in module.kernel_size):
        return "1×1 kernel: nothing to separate"
    groups = module.groups
    if groups > 1 and groups == module.in_channels:
        return "depthwise conv: already separable"
    per_group = module.in_channels // groups
    if per_group < options.min_in_channels:
        where = "first layer, " if first else ""
        per = "" if groups == 1 else " per group"
        floor = options.min_in_channels
        plural = "s" if per_group != 1 else ""
        return f"{where}{per_group} input channel{plural}{per} < --min-in-channels {floor}"
    return None


def eligibility(
    model: nn.Module, options: Eligibility = Eligibility(), plan: Plan | None = None
) -> dict[str, str | None]:
    """Map every convolution's name to its skip reason (``None`` = eligible).

    With the ``plan`` a compressed model was built by, the convs inside its blocks are named
    as such instead of being judged on their own.
    """
    blocks = {entry.name: entry.method for entry in plan.replaced()} if plan else {}
    reasons = {}
    for i, (name, module) in enumerate(conv_layers(model)):
        parent = next((b for b in blocks if name.startswith(b + ".")), None)
        if parent is not None:
            reasons[name] = f"part of the {blocks[parent]} block of {parent}"
        else:
            reasons[name] = skip_reason(name, module, options, first=(i == 0))
    return reasons


def replace_modules(
    model: nn.Module,
    select: Callable[[str, nn.Module], bool],
    transform: Callable[[str, nn.Module], nn.Module],
    prefix: str = "",
) -> list[str]:
    """Replace, in place, every child for which ``select(name, child)`` holds by
    ``transform(name, child)``; do not descend into replaced children.

    A module reachable under several names (shared) is transformed once and the replacement
    is shared the same way. Returns the dotted names replaced, in walk order.
    """
    done: dict[int, nn.Module] = {}
    return _replace(model, select, transform, prefix, done)


def _replace(model, select, transform, prefix, done) -> list[str]:
    replaced = []
    # _modules rather than named_children(): the latter yields a shared child only once
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if id(child) in done or select(full, child):
            if id(child) not in done:
                done[id(child)] = transform(full, child)
            setattr(model, name, done[id(child)])
            replaced.append(full)
        else:
            replaced += _replace(child, select, transform, full, done)
    return replaced


# ---------------------------------------------------------------------------------------------
# rewrites after decomposition (upcycling, fixed kernels): the Plan bookkeeping they share


def rewrite_start(model: nn.Module, plan: Plan | None, input_shape: Sequence[int]
                  ) -> tuple[Plan, ModelStats, dict[str, str]]:
    """The plan a rewrite of ``model`` is recorded in (a new one for a plain model), the
    model's params and MACs before it, and the skip reasons of the layers whose weight its
    code reads outside their forward, which stay as they are (``foreign_reads``)."""
    with watch_reads(model) as foreign:
        before = module_macs(model, input_shape)
    if plan is None:
        plan = Plan(input_shape=[int(s) for s in input_shape],
                    summary=Summary(params_before=before.params, macs_before=before.macs))
    return plan, before, {name: read_reason(read) for name, read in foreign.items()}


def layer_entry(plan: Plan, name: str, module: nn.Module, before: ModelStats) -> LayerPlan:
    """The entry of layer ``name``; appended, with its params and MACs before, when the plan
    has none (a 1×1 or depthwise conv that no factorization lists)."""
    entry = next((e for e in plan.layers if e.name == name), None)
    if entry is None:
        entry = LayerPlan(name, type(module).__name__, params_before=count_params(module),
                          macs_before=before.module_macs.get(name, 0))
        plan.layers.append(entry)
    return entry


def rewrite_finish(model: nn.Module, plan: Plan, input_shape: Sequence[int],
                   names: Iterable[str]) -> None:
    """Params and MACs after of the entries ``names`` and of the whole model; the plan's
    entries back in module order."""
    after = module_macs(model, input_shape)
    modules = dict(model.named_modules())
    names = set(names)
    for entry in plan.layers:
        if entry.name in names:
            entry.params_after = count_params(modules[entry.name])
            entry.macs_after = after.module_macs.get(entry.name, 0)
    plan.summary.params_after, plan.summary.macs_after = after.params, after.macs
    order = {name: i for i, name in enumerate(modules)}
    plan.layers.sort(key=lambda e: order.get(e.name, 0))


def register_structure(method: str, transformer: Transformer) -> None:
    """Register how to build the (uninitialised) block of ``method`` for a plan entry; used to
    rebuild an archive's architecture before its weights are loaded."""
    _STRUCTURES[method] = transformer


def unregister_structure(method: str) -> None:
    """Forget ``method``'s structure (its archives no longer load)."""
    _STRUCTURES.pop(method, None)


def registered_methods() -> list[str]:
    return sorted(_STRUCTURES)


def register_modifier(kind: str, modifier: Modifier) -> None:
    """Register how to apply a plan entry's modifier of ``kind``: ``modifier(block, spec)``
    changes the built ``block`` (in place, or returns its replacement) as the JSON ``spec``
    says, building any new module's structure (weights are loaded afterwards, or were set
    by the caller that wrote the spec)."""
    _MODIFIERS[kind] = modifier


def apply_modifiers(block: nn.Module, entry: LayerPlan) -> nn.Module:
    """``block`` with ``entry.modifiers`` applied in order."""
    for spec in entry.modifiers:
        kind = spec.get("kind")
        if kind not in _MODIFIERS:
            raise BadInput(f"the plan modifies {entry.name!r} with {kind!r}, which this "
                           f"bscompress does not know (known: {sorted(_MODIFIERS)})")
        block = _MODIFIERS[kind](block, spec)
    return block


#: A rebuilt block may hold at most this many times its layer's parameters (CondConv with 64
#: experts is the largest form bscompress writes), plus ``_GROWTH_SLACK``.
MAX_GROWTH = 80
_GROWTH_SLACK = 2**20


def _check_structure_size(name: str, module: nn.Module, entry: LayerPlan,
                          maker: Transformer) -> None:
    """Build ``entry``'s structure on the meta device first (no memory) and refuse a block far
    larger than any plan bscompress writes: a tampered rank or expert count must not take
    the machine's memory."""
    import torch

    try:
        with torch.device("meta"):
            probe = apply_modifiers(maker(module, entry), entry)
    except Exception:  # builders that need real tensors: the real build reports errors
        return
    size = sum(p.numel() for p in probe.parameters()) + sum(
        b.numel() for b in probe.buffers())
    limit = MAX_GROWTH * count_params(module) + _GROWTH_SLACK
    if size > limit:
        raise BadInput(f"the plan's entry for layer {name!r} ({entry.label()}, ranks "
                       f"{entry.ranks}) builds a block of {size:,} values from a layer of "
                       f"{count_params(module):,}: the plan was altered")


def apply_plan(model: nn.Module, plan: Plan, build: Transformer | None = None) -> nn.Module:
    """Rewrite ``model`` in place as ``plan`` says.

    Args:
        model: the original architecture.
        plan: which layers to replace and how.
        build: builds a replacement from the original layer and its entry; by default the
            structure registered for the entry's method (weights to be loaded afterwards).

    Raises:
        BadInput: when the plan names a layer the model lacks or a method nobody registered.
    """
    entries = {entry.name: entry for entry in plan.replaced()}
    modules = dict(model.named_modules())
    for name, entry in entries.items():
        if name not in modules:
            raise BadInput(f"the plan rewrites layer {name!r}, which the model does not have")
        if build is None and entry.method not in _STRUCTURES:
            raise BadInput(
                f"the plan rewrites {name!r} with method {entry.method!r}, which this "
                f"bscompress does not know (known: {registered_methods()})"
            )

    def transform(name: str, module: nn.Module) -> nn.Module:
        entry = entries[name]
        maker = build or _STRUCTURES[entry.method]
        if build is not None:  # the caller's math: its errors are its own
            return apply_modifiers(maker(module, entry), entry)
        try:
            _check_structure_size(name, module, entry, maker)
            return apply_modifiers(maker(module, entry), entry)
        except BadInput:
            raise
        except Exception as err:  # a plan that does not fit its layer (e.g. a tampered one)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadInput(
                f"the plan's entry for layer {name!r} ({entry.label()}, ranks {entry.ranks}) "
                f"cannot be built on its {type(module).__name__} ({first}): the plan does not "
                "belong to this model or was altered"
            ) from None

    done = replace_modules(model, lambda name, _: name in entries, transform)
    missed = sorted(set(entries) - set(done))
    if missed:
        raise BadInput(f"the plan rewrites {missed}, nested inside other rewritten layers")
    return model
