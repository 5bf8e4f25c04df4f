"""``plan_decomposition``: what happens to every layer, decided without building anything
heavy: eligibility, the MAC-growth guard, and under a budget the allocation of methods and
ranks across the layers (candidates priced by MACs, parameters or measured latency, their
error the weight error or a measured one, ``CandidateError``; the latency guard's filter)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bscompress.compress.guard import LatencyGuard, Untimed, runtime_of
from bscompress.core.errors import BadInput
from bscompress.core.foreign_reads import read_reason, watch_reads
from bscompress.core.plan import LayerPlan, Plan
from bscompress.core.progress import Reporter, Step
from bscompress.core.records import BudgetRecord, GuardRecord, Summary
from bscompress.core.stats import count_params, format_count, module_macs
from bscompress.core.surgery import (
    CLASSIFIER_REASON,
    Eligibility,
    apply_plan,
    conv_layers,
    matching_pattern,
)
from bscompress.deploy.latency import LatencyTimer, default_cache_path
from bscompress.factorize.budget import BudgetError, Candidate, allocate
from bscompress.methods import METHODS, Method, RankOptions, auto_methods, get_method


@dataclass(frozen=True)
class Budget:
    """A whole-model target: ``kind`` (``macs``, ``params`` or ``latency``) at ``fraction`` of
    the model's.

    Parsed from ``macs=0.25`` / ``params=0.2`` / ``latency=0.5`` by :meth:`parse`. Latency is
    ONNX Runtime CPU latency at the plan's input shape (``latency.LatencyTimer``).
    """

    kind: str
    fraction: float

    KINDS = ("macs", "params", "latency")

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, _, value = text.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if kind not in cls.KINDS or not 0 < fraction <= 1:
            raise BadInput(f"--budget {text!r}: write macs=F, params=F or latency=F with "
                           "0 < F ≤ 1, e.g. macs=0.25")
        return cls(kind, fraction)


def plan_decomposition(
    model: nn.Module,
    method: str,
    input_shape: Sequence[int],
    ranks: RankOptions = RankOptions(),
    eligibility: Eligibility = Eligibility(),
    budget: Budget | None = None,
    latency: LatencyTimer | None = None,
    error: CandidateError | None = None,
    guard: LatencyGuard | None = None,
) -> Plan:
    """Decide, without building anything heavy, what happens to every layer ``method`` handles.

    The ranks come from the options (fixed, or by energy from the singular values); a layer
    whose block would not cost fewer MACs than the layer at its real input shape is skipped
    with a reason unless ``ranks.allow_growth``. With a ``budget``, the ranks are instead
    allocated across the layers (``factorize.budget.allocate``) to minimise the summed
    relative errors with the whole model at or under the budget; a layer may stay dense.
    A latency budget times every candidate block with ``latency`` (a cached ONNX Runtime
    timer; the default cache when ``None``) and never offers one slower than its layer.
    ``error`` replaces each candidate's data-free weight error by a measured one (the
    data-aware output error, or the network's KL divergence). Under a budget, a ``guard``
    (``guard.LatencyGuard``) offers a candidate block only where it is timed faster than its
    layer, and records what it left out in the plan's summary.
    """
    auto = method == AUTO
    if auto and budget is None:
        raise BadInput("--method auto chooses per layer under a budget: add --budget, e.g. "
                       "--budget macs=0.25")
    impls = method_impls(method)
    handled = handles(method)
    layers = [(name, mod) for name, mod in model.named_modules() if handled(mod)]
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []  # every conv and Linear layer in the order the forward pass runs them

    def recorder(name: str):
        def hook(_module, args):
            if name not in order:
                order.append(name)
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return hook

    hooks = [mod.register_forward_pre_hook(recorder(name))
                for name, mod in model.named_modules() if isinstance(mod, _LAYERS)]
    try:
        with watch_reads(model) as foreign:  # layers the model's code reads the weight of
            stats = module_macs(model, input_shape)
    finally:
        for handle in hooks:
            handle.remove()
    convs = conv_layers(model)
    first_conv = convs[0][0] if convs else None
    output_layer = order[-1] if order else None

    entries, usable = [], {}
    for name, mod in layers:
        entry = LayerPlan(name, type(mod).__name__, params_before=count_params(mod),
                          macs_before=stats.module_macs.get(name, 0))
        usable[name], reason = _usable(impls, name, mod, eligibility, name == first_conv)
        if reason is None and name in foreign:  # e.g. convolved with by its parent
            reason = read_reason(foreign[name])
        if reason is None and name not in shapes:
            reason = "not called in the forward pass"
        if reason is None and name == output_layer and _pointwise(mod) and (
                not eligibility.classifier
                and matching_pattern(name, eligibility.include) is None):  # named: consented
            reason = CLASSIFIER_REASON
        if reason is None and budget is not None:
            entry.method = method
            entries.append(entry)
            continue
        if reason is None:
            impl = impls[0]
            entry.ranks, entry.options = impl.choose(mod, ranks)
            # counted on the meta device: shapes only, no weight init and no arithmetic
            block = impl.structure(copy.deepcopy(mod).to("meta"), entry)
            macs_after = module_macs(block, shapes[name]).macs
            if macs_after >= entry.macs_before and not ranks.allow_growth:
                reason = (f"would not reduce MACs ({format_count(entry.macs_before)} → "
                          f"{format_count(macs_after)}); --allow-growth rewrites it anyway")
        if reason is None:
            entry.method = method
        else:
            entry.skip_reason, entry.ranks, entry.options = reason, {}, {}
        entries.append(entry)
    if budget is not None and not any(e.method for e in entries):  # nothing to allocate
        raise BadInput(nothing_to_rewrite(method, entries, eligibility))
    plan = Plan(
        layers=entries,
        input_shape=[int(s) for s in input_shape],
        summary=Summary(method=method, ranks=asdict(ranks), eligibility=asdict(eligibility),
                        params_before=stats.params, macs_before=stats.macs),
    )
    if budget is not None:
        modules = dict(layers)
        if budget.kind == "latency":
            timer = latency or LatencyTimer(default_cache_path())
            cost = _latency_cost(model, input_shape, timer, plan)
        else:
            cost = _count_cost(budget.kind, plan)
        if guard is not None:
            plan.summary.guard = GuardRecord(runtime=guard.runtime, batches=list(guard.batches),
                                             share=guard.share)
        _allocate(plan, {e.name: (modules[e.name], usable[e.name]) for e in entries
                         if e.method}, shapes, ranks, budget, cost, error, guard)
        if budget.kind == "latency":
            plan.summary.budget.runtime = runtime_of(timer)
        if guard is not None:
            _guard_report(plan, guard, model, modules, shapes, impls)
    return plan


def nothing_to_rewrite(method: str, entries: Sequence[LayerPlan],
                       eligibility: Eligibility) -> str:
    """The sentence for a model in which ``method`` may rewrite none of the layers of
    ``entries`` (each with its skip reason): the ``--include`` patterns that match no layer
    at all, else the reasons, the commonest first. A budget raises it (nothing to allocate);
    the commands raise it for a plan that rewrites nothing (``pipeline.run_decompose``),
    the library returns that plan."""
    names = [e.name for e in entries]
    if not names:
        return (f"-m {method} found no conv or Linear layer in this model to rewrite: "
                "check the model, or bscompress inspect it")
    unmatched = [p for p in eligibility.include
                 if not any(matching_pattern(name, (p,)) for name in names)]
    if unmatched:
        return (f"--include {' '.join(repr(p) for p in unmatched)} matches no layer of the "
                f"model (its layers are named like {names[0]!r}; a pattern matches a name "
                "or a dotted prefix of it): check the pattern against bscompress inspect")
    reasons = Counter(e.skip_reason for e in entries if e.skip_reason).most_common()
    said = "; ".join(f"{count} × {reason}" for reason, count in reasons[:3])
    more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    return (f"-m {method} can rewrite none of the model's {len(names)} conv and Linear layers "
            f"({said}{more}): choose another method, or widen --include / --exclude / "
            "--min-in-channels (bscompress inspect lists the layers)")


def _guard_report(plan: Plan, guard: LatencyGuard, model: nn.Module, modules: dict,
                  shapes: dict, impls: list[Method]) -> None:
    """The guard's record: its counts, and each chosen block's time ratio to its layer (the
    structure alone: the timer draws the weights, so these are the timings it made)."""
    record = plan.summary.guard
    by_name = {impl.name: impl for impl in impls}
    for e in plan.replaced():
        block = by_name[e.method].structure(copy.deepcopy(modules[e.name]).to("meta"), e)
        try:
            ratios = guard.ratios(modules[e.name], block, shapes[e.name])
        except Untimed:  # counted when it was a candidate
            continue
        record.layers[e.name] = {str(b): r for b, r in ratios.items()}
    record.checked, record.rejected = guard.checked, guard.rejected
    record.untimed, record.untimed_why = guard.untimed, guard.why
    guard.remember(model)


#: ``--method auto``: it chooses per layer among the registered methods with ``in_auto`` (those
#: with per-rank errors), in registration order: the k×k forms for k×k convs, the low-rank pair
#: for 1×1 convs and Linear layers. ``AUTO_METHODS`` (a module attribute read through
#: ``__getattr__``) is their names, as registered at the time it is read.
AUTO = "auto"
#: the layers whose execution order finds the output layer (``Eligibility.classifier``)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def __getattr__(name: str):
    if name == "AUTO_METHODS":
        return auto_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_impls(method: str) -> list[Method]:
    """The method objects ``method`` stands for: every ``in_auto`` method for ``auto``."""
    return ([get_method(m) for m in auto_methods()] if method == AUTO
            else [get_method(method)])


def handles(method: str) -> Callable[[nn.Module], bool]:
    """Whether ``method`` (or one of ``auto``'s) considers a module at all."""
    impls = method_impls(method)
    return lambda module: any(impl.handles(module) for impl in impls)


def _usable(impls: list[Method], name: str, module: nn.Module, eligibility: Eligibility,
            first: bool) -> tuple[list[Method], str | None]:
    """The methods of ``impls`` that may rewrite ``module``, and why none may (for 1×1 convs
    and Linear layers the reason of the first ``pointwise`` method, such as the low-rank pair;
    of the first method otherwise)."""
    reasons = {impl.name: impl.skip_reason(name, module, eligibility, first)
               for impl in impls if impl.handles(module)}
    usable = [impl for impl in impls if reasons.get(impl.name, "") is None]
    if usable:
        return usable, None
    pointwise = ([impl.name for impl in impls if impl.pointwise and impl.name in reasons]
                 if _pointwise(module) else [])
    primary = pointwise[0] if pointwise else next(iter(reasons))
    return [], reasons[primary]


def eligible_layers(model: nn.Module, method: str, eligibility: Eligibility) -> list[str]:
    """The layers some method of ``method`` may rewrite (those a budget's candidates come
    from): the ones calibration statistics are collected for before planning."""
    impls, handled = method_impls(method), handles(method)
    convs = conv_layers(model)
    first = convs[0][0] if convs else None
    return [name for name, module in model.named_modules() if handled(module)
            and _usable(impls, name, module, eligibility, name == first)[0]]


def _pointwise(module: nn.Module) -> bool:
    """A Linear layer or a 1×1 conv: what a classifier is made of."""
    return isinstance(module, nn.Linear) or all(k == 1 for k in module.kernel_size)


@dataclass(frozen=True)
class CandidateError:
    """A measured error of candidate forms: ``fn(layer name, entry) -> error`` and its
    ``label`` for the report."""

    fn: Callable[[str, LayerPlan], float]
    label: str
    progress: Reporter | None = None

    def __call__(self, name: str, entry: LayerPlan) -> float:
        return self.fn(name, entry)


SENSITIVITY = "network KL divergence (sensitivity)"
OUTPUT_ERROR = "relative output error (data-aware)"
HELD_OUT_ERROR = "held-out relative output error (data-aware or data-free)"
FEW_SAMPLES_ERROR = ("relative weight error (too few calibration samples to hold any out and "
                     "rank the candidates' fits on other data)")


@dataclass(frozen=True)
class _Cost:
    """How ``_allocate`` prices layers: ``total`` (the whole model), ``dense(entry, module,
    shape)`` (a layer as it is) and ``block(block, shape)`` (a candidate, maybe on meta);
    ``whole(plan)``, when given, measures the whole model as a plan would build it, for
    costs that do not add up exactly (latency)."""

    total: float
    unit: str
    dense: Callable[[LayerPlan, nn.Module, tuple], float]
    block: Callable[[nn.Module, tuple], float]
    whole: Callable[[Plan], float] | None = None


def _count_cost(kind: str, plan: Plan) -> _Cost:
    if kind == "macs":
        return _Cost(plan.summary.macs_before, "MAC",
                     lambda entry, module, shape: entry.macs_before,
                     lambda block, shape: module_macs(block, shape).macs)
    return _Cost(plan.summary.params_before, "parameter",
                 lambda entry, module, shape: entry.params_before,
                 lambda block, shape: count_params(block))


def _latency_cost(model: nn.Module, input_shape: Sequence[int], timer: LatencyTimer,
                  plan: Plan) -> _Cost:
    """Milliseconds of ONNX Runtime per block at its layer's input shape; ``total`` is the
    whole model's latency (the layers the budget does not touch are charged the rest)."""
    total = timer.time(model, tuple(input_shape))
    plan.summary.latency_before_ms = total

    def whole(planned: Plan) -> float:  # the structure alone: the timer draws the weights
        return timer.time(apply_plan(copy.deepcopy(model).to("meta"), planned),
                          tuple(input_shape))

    return _Cost(total, "millisecond", lambda entry, module, shape: timer.time(module, shape),
                 timer.time, whole)


#: bisection steps on the allocation target that bring the measured latency under the budget
LATENCY_STEPS = 6


def _allocate(plan: Plan, layers: dict[str, tuple[nn.Module, list]], shapes: dict,
              ranks: RankOptions, budget: Budget, cost: _Cost,
              measured: CandidateError | None, guard: LatencyGuard | None = None) -> None:
    """Give the entries named in ``layers`` (``name -> (module, the methods that may rewrite
    it)``) a method and ranks (or keep them dense) to meet ``budget``: candidates priced by
    ``cost``, their error the relative weight error or the ``measured`` one; with a
    ``guard``, only candidates it times faster than their layer by its share of their MAC
    saving (``guard.time_bound``).

    The guard times lazily: an allocation's chosen blocks not timed yet are timed, those
    slower than their layer leave the candidates, and the allocation runs again, until every
    chosen block has been timed faster. The result is the allocation over the faster
    candidates, having timed the blocks it considered choosing rather than every candidate
    (on the demo ResNet at 50% of the MACs, tens of blocks instead of 412)."""
    impls = list({impl.name: impl for _, usable in layers.values() for impl in usable}.values())
    for impl in impls:
        if not impl.budgetable:
            budgetable = [n for n, m in METHODS.items() if m.budgetable]
            raise BadInput(f"--budget does not support --method {impl.name} yet: use "
                           f"{', '.join(budgetable)} or auto, or give its ranks explicitly")
    entries = [e for e in plan.layers if e.name in layers]
    options, layer_candidates, probes = [], [], []
    untimed: list[list[tuple | None]] = []  # per candidate: (layer, block, shape) to time

    def offer(i: int, rank_options: RankOptions, below: float = math.inf) -> int:
        """Add the candidate forms of entry ``i`` under ``rank_options`` that cost less than
        the layer and than ``below``; how many."""
        entry = entries[i]
        (mod, usable), shape = layers[entry.name], shapes[entry.name]
        forms, cands, timing = options[i], layer_candidates[i], untimed[i]
        added = 0
        for impl in usable:
            # a measured error replaces the method's own: let it skip fitting for it
            for form_ranks, form_options, error in impl.candidates(
                    mod, rank_options, errors=measured is None):
                if (impl.name, form_ranks, form_options) in forms:
                    continue
                probe = LayerPlan(entry.name, entry.module_type, method=impl.name,
                                  ranks=form_ranks, options=form_options)
                block = impl.structure(copy.deepcopy(mod).to("meta"), probe)
                price = cost.block(block, shape)
                # never a block that costs more than the layer (nor, with a guard, one
                # slower than it: ``assign``)
                if price < min(cands[0].cost, below):
                    forms.append((impl.name, form_ranks, form_options))
                    cands.append(Candidate(price, error))
                    if guard is not None:  # the guard's bound depends on the MACs kept
                        macs = price if cost.unit == "MAC" else module_macs(block, shape).macs
                        timing.append((mod, block, shape, macs / max(entry.macs_before, 1)))
                    else:
                        timing.append(None)
                    probes.append((cands, len(cands) - 1, probe))
                    added += 1
        return added

    for entry in entries:
        (mod, _), shape = layers[entry.name], shapes[entry.name]
        options.append([None])
        layer_candidates.append([Candidate(cost.dense(entry, mod, shape), 0.0)])
        untimed.append([None])
        offer(len(options) - 1, ranks)
    # the rest of the model; a latency total can fall short of the layers timed one by one
    fixed = max(cost.total - sum(c[0].cost for c in layer_candidates), 0.0)
    total = fixed + sum(c[0].cost for c in layer_candidates)

    def cheapest() -> float:
        """The cost of the cheapest allocation over the candidates as they stand."""
        return fixed + sum(min(c.cost for c in cands) for cands in layer_candidates)

    under_block = 0
    if ranks.round_to > 1 and cheapest() > budget.fraction * total:
        # widths rounded up to the channel block cannot go low enough: the narrower forms
        # come in, below each layer's cheapest rounded one (out of the block layout, but
        # only where the budget needs them)
        free = dataclasses.replace(ranks, round_to=1)
        under_block = sum(offer(i, free, below=min(c.cost for c in layer_candidates[i]))
                          for i in range(len(entries)))
    if measured is not None:  # all of them counted first: the progress has a total
        for done, (cands, index, probe) in enumerate(probes):
            if measured.progress is not None:
                measured.progress(Step("measuring candidates", probe.name, done, len(probes)))
            cands[index] = Candidate(cands[index].cost, measured(probe.name, probe))
    floor = cheapest()
    names = "/".join(impl.name for impl in impls)

    def timed_faster(choice: list[int]) -> bool:
        """Time the chosen blocks not timed yet; those slower than their layer leave the
        candidates. Whether every chosen block was faster."""
        faster = True
        for i, j in enumerate(choice):
            if untimed[i][j] is None:
                continue
            if guard.keeps(*untimed[i][j]):
                untimed[i][j] = None
            else:
                del options[i][j], layer_candidates[i][j], untimed[i][j]
                faster = False
        return faster

    def assign(target: float) -> float:
        """Allocate under ``target`` and write the choice into the entries; the cost."""
        while True:
            try:
                choice = allocate(layer_candidates, target, fixed)
            except BudgetError:
                least = cheapest()
                slower = (f" (the latency guard left out {guard.rejected} candidate blocks "
                          "that save too little time; --guard-share 0 lets in any block "
                          "faster than its layer, --no-latency-guard every block)"
                          if guard is not None and guard.rejected else "")
                raise BadInput(f"--budget {budget.kind}={budget.fraction}: even the smallest "
                               f"ranks of {names} keep {least / total:.1%} of the model's "
                               f"{budget.kind}{slower}; raise the budget or let more layers in"
                               ) from None
            if guard is None or timed_faster(choice):
                break
        achieved = fixed
        for entry, forms, cands, index in zip(entries, options, layer_candidates, choice,
                                              strict=True):
            achieved += cands[index].cost
            entry.sensitivity = entry.predicted_error = None
            if forms[index] is None:
                entry.method, entry.ranks, entry.options = None, {}, {}
                entry.skip_reason = (f"kept dense by the {budget.kind} budget (the others "
                                     f"buy more accuracy per {cost.unit})")
            else:
                entry.method, entry.ranks, entry.options = forms[index]
                entry.skip_reason = None
                if measured is None:  # the build replaces it with the block's own
                    entry.predicted_error = cands[index].error
                elif measured.label == SENSITIVITY:
                    entry.sensitivity = cands[index].error
        return achieved

    target = budget.fraction * total
    achieved = assign(target)
    record = BudgetRecord(kind=budget.kind, fraction=budget.fraction, target=target,
                          achieved=achieved,
                          error=measured.label if measured else "relative weight error",
                          under_block=under_block or None)
    if cost.whole is not None:
        # the blocks' costs were measured alone: bisect the target until the whole model,
        # measured, is within the budget, keeping the largest target that is
        goal = budget.fraction * cost.total
        best = None
        lo, hi = floor, total
        for step in range(LATENCY_STEPS + 1):
            if step:
                target = (lo + hi) / 2
                achieved = assign(target)
            result = cost.whole(plan)
            if result <= goal:
                lo = target
                if best is None or target > best[0]:
                    best = (target, achieved, result)
            else:
                hi = target
        if best is None:
            raise BadInput(f"--budget {budget.kind}={budget.fraction}: the fastest allocation "
                           f"of {names} found measures {result:.3f} ms, "
                           f"{result / cost.total:.1%} of the model's {cost.total:.3f} ms; "
                           "raise the budget or let more layers in")
        target, achieved, result = best
        assign(target)
        record.target, record.achieved, record.goal, record.predicted = (
            target, achieved, goal, result)
    plan.summary.budget = record
