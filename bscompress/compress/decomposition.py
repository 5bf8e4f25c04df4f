"""``decompose``: plan and apply a closed-form factorization to every eligible layer."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bscompress.compress.batchnorm import (
    OriginalSeen,
    correct_batchnorm_checked,
    following_batchnorms,
    held_out_output_error,
    original_outputs,
)
from bscompress.compress.block_inputs import PairedStatistics
from bscompress.compress.calibrate import (
    DEFAULT_MAX_BYTES,
    MIN_BATCHNORM_SAMPLES,
    check_batchnorm_samples,
    check_calibration_fits,
    collect_patch_covariances,
    in_fast_layout,
    measure_output_errors,
)
from bscompress.compress.data_aware import (
    absorb_mean,
    conditioned,
    degenerate_statistics,
    fit_block,
    grouped,
    grouped_weight,
    merged,
    output_bias,
    shrunk,
    without,
)
from bscompress.compress.guard import LatencyGuard, Untimed, runtime_of
from bscompress.compress.reconstruct import ReconstructionOptions, reconstruct
from bscompress.compress.sensitivity import SensitivityProbe
from bscompress.core.computed_weight import stood_in
from bscompress.core.covariance import PatchCovariance, centred, output_sigma
from bscompress.core.errors import BadInput
from bscompress.core.foreign_reads import read_reason, watch_reads
from bscompress.core.plan import FitReport, LayerPlan, Plan
from bscompress.core.progress import Reporter, Step
from bscompress.core.records import (
    BudgetRecord,
    CalibrationRecord,
    GuardRecord,
    ReconstructionRecord,
    SensitivityRecord,
    Summary,
)
from bscompress.core.stats import check_finite, count_params, format_count, module_macs
from bscompress.core.surgery import (
    CLASSIFIER_REASON,
    Eligibility,
    apply_plan,
    conv_layers,
    matching_pattern,
)
from bscompress.deploy.latency import LatencyTimer, default_cache_path
from bscompress.factorize.budget import BudgetError, Candidate, allocate
from bscompress.factorize.gsvd import (
    conditioning,
    output_error,
    paired_relative_error,
    relative_output_error,
)
from bscompress.factorize.linalg import quadratic_trace
from bscompress.factorize.memo import Reuse
from bscompress.methods import (
    METHODS,
    Method,
    RankOptions,
    auto_methods,
    get_method,
    relative_error,
)


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


def _eligible(model: nn.Module, method: str, eligibility: Eligibility) -> list[str]:
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


#: Shrinkage strengths of Σ toward a scaled identity (``data_aware.shrunk``) tried for every
#: data-aware fit, the data-free fit being the other candidate; the held-out error decides.
SHRINKAGE = (0.0, 0.3)
#: The share of the calibration batches held out to choose between the candidates.
HOLDOUT = 0.25
#: ``als_iters`` of the data-aware fits that measure budget candidates: the cheapest refit
#: of each method (``Method.fit_data_aware``); the chosen blocks get the user's rounds
CANDIDATE_ALS_ITERS = 0


#: The calibration samples the in-network errors of the replaced layers are measured on (a
#: diagnostic of the Plan; two forward passes, 109 s of a 918 s ResNet-50 run on 512 images)
MEASURED_SAMPLES = 128


def _first_samples(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The leading batches holding ``count`` samples (the last one cut)."""
    head, seen = [], 0
    for x in batches:
        if seen >= count:
            break
        head.append(x if len(x) <= count - seen else x[:count - seen])
        seen += len(head[-1])
    return head


def split_calibration(batches: list[torch.Tensor], holdout: float
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(batches, held)``: every ``round(1/holdout)``-th batch is held out (``held`` is a
    sub-list of the returned ``batches``, which hold all the data); a single batch is split
    in two first. No hold-out (``held`` empty) under 8 samples or with ``holdout`` 0."""
    total = sum(len(x) for x in batches)
    if holdout <= 0 or total < 8:
        return batches, []
    if len(batches) == 1:
        cut = max(1, round(len(batches[0]) * (1 - holdout)))
        batches = [batches[0][:cut], batches[0][cut:]]
    step = max(2, round(1 / holdout))
    held = [x for i, x in enumerate(batches) if i % step == step - 1]
    return batches, held or [batches[-1]]


def _split(cov: PatchCovariance, held: PatchCovariance, centre: bool
           ) -> tuple[PatchCovariance, PatchCovariance]:
    """``(rest, held)``: the statistics outside the held-out part ``held`` of ``cov`` (to fit
    on) and ``held`` (to score on), both centred with ``centre``."""
    rest = without(cov, held)
    rest, held = (centred(rest), centred(held)) if centre else (rest, held)
    return conditioned(rest), conditioned(held)


@dataclass(frozen=True)
class HeldScore:
    """The relative output error of a block on held-out statistics, tr(E Σ Eᵀ) / tr(W Σ Wᵀ)
    with E = W − Ŵ (``gsvd.relative_output_error``), prepared once per layer for the many
    blocks scored on it: Σ is kept in float32, where E Σ costs a quarter of float64 (the
    scores only rank fits: relative accuracy about 1e-6), the denominator in float64; the
    trace takes the tiles of Σ on and above its diagonal only (``linalg.quadratic_trace``).
    """

    weight: torch.Tensor  # [g, N/g, D] float64
    sigma: torch.Tensor  # [g, D, D] float32
    total: float
    groups: int

    @classmethod
    def of(cls, module: nn.Module, held: PatchCovariance) -> HeldScore:
        weight, sigma = grouped_weight(module), output_sigma(held)
        total = output_error(weight, torch.zeros_like(weight), sigma)
        return cls(weight, sigma.float(), total, getattr(module, "groups", 1))

    def __call__(self, block: nn.Module) -> float:
        if self.total <= 0:
            return 0.0
        e = (self.weight - grouped(block.to_dense(), self.groups).double()).float()
        return self.relative(quadratic_trace(e, self.sigma))

    def relative(self, error: float) -> float:
        """An output error e(Ŵ) on the held-out Σ as a fraction of the layer's."""
        return error / self.total if self.total > 0 else 0.0


def _select(module: nn.Module, entry: LayerPlan, free: nn.Module, rest: PatchCovariance,
            score: HeldScore, als_iters: int, strengths: Sequence[float] | None = None
            ) -> tuple[float | None, float]:
    """``(strength, error)``: the shrinkage strength of ``strengths`` whose fit (from the
    data-free block ``free``, left as it is) on ``rest`` has the smallest output error on the
    held-out part (``score``; ``_split``; ``None``: the data-free fit beats every data-aware
    one), and that held-out error."""
    method = get_method(entry.method)
    strengths = SHRINKAGE if strengths is None else strengths
    scores: dict[float | None, float] = {None: score(free)}
    for alpha in strengths if rest.full is not None else strengths[:1]:
        block = copy.deepcopy(free)
        fit_block(module, block, shrunk(rest, alpha), als_iters, method)
        scores[alpha] = score(block)
    choice = min(scores, key=lambda a: (scores[a], a is not None))  # ties: data-free
    return choice, scores[choice]


def _absorbable(module: nn.Module, block: nn.Module, norm: nn.Module | None) -> bool:
    """Whether ``block``'s mean output error can be given back (``data_aware.absorb_mean``):
    to its output bias when ``module`` has a bias, else to the BatchNorm ``norm``."""
    if getattr(module, "bias", None) is not None:
        return output_bias(block) is not None
    return norm is not None


def _fit(module: nn.Module, entry: LayerPlan, cov: PatchCovariance | None,
         als_iters: int, held: PatchCovariance | None = None,
         one_shot: PatchCovariance | None = None, centre: bool = False,
         norm: nn.Module | None = None) -> tuple[nn.Module, FitReport]:
    """``entry``'s block for ``module`` (the entry is read, not written) and how it was
    fitted: closed form from the kernel, then fitted to the input statistics ``cov`` when
    given (paired ones for the sequential fit), with the output error on them.

    With ``held`` (the statistics of a held-out part of the calibration data, included in
    ``one_shot``, the layer's one-shot statistics, which default to ``cov``), the data-free
    fit and the data-aware fits at each :data:`SHRINKAGE` strength are fitted without the
    held-out part and scored on it; the best is then fitted on all the data (the data-free
    one needs none), and its held-out error is reported.

    With ``centre`` (statistics with a mean only), the fits and errors use the
    covariances of the patches, and the mean output error is then given back
    (``data_aware.absorb_mean``): to the block's bias when the layer has one, else to the
    running mean of ``norm``, the BatchNorm after the layer; with neither, no centring."""
    method = get_method(entry.method)
    output = statistics = held_error = None
    with torch.no_grad():
        block, error = method.build(module, entry)
        fit = method.closed_form_fit
        centre = (centre and cov is not None and cov.mean is not None
                  and _absorbable(module, block, norm))
        if cov is not None:
            alpha: float | None = 0.0
            if held is not None:
                with conditioning():
                    rest, scored = _split(one_shot or cov, held, centre)
                    alpha, held_error = _select(module, entry, block, rest,
                                                HeldScore.of(module, scored), als_iters)
            raw = cov
            with conditioning() as record:
                cov = conditioned(centred(cov) if centre else cov)
                if alpha is None:  # the data-free block as built
                    fit = (f"{method.closed_form_fit} (the data-aware fits were worse "
                           "on held-out data)")
                else:
                    fit = fit_block(module, block,
                                    shrunk(cov, alpha, grouped_weight(module)), als_iters,
                                    method)
                    fit += f", Σ shrunk {alpha:g}" if alpha else ""
                    error = relative_error(module.weight, block.to_dense())
            statistics = degenerate_statistics(raw, record["floored"])
            dense = grouped(block.to_dense(), getattr(module, "groups", 1))
            if cov.cross is not None:
                fit += ", sequential" if alpha is not None else ""
                output = paired_relative_error(dense, cov.full, cov.cross,
                                               cov.target_energy)
            else:
                output = relative_output_error(grouped_weight(module), dense,
                                               output_sigma(cov))
            if centre:
                fit += f", centred ({absorb_mean(module, block, raw, norm)})"
    if not math.isfinite(error) or not all(bool(torch.isfinite(p).all())
                                           for p in block.parameters()):
        raise BadInput(f"factorizing layer {entry.name!r} with {entry.method} "
                       f"(ranks {entry.ranks}) gave non-finite factors: its weights or its "
                       "calibration statistics are degenerate; exclude it with --exclude or "
                       "try another method")
    return block, FitReport(fit, error, output, statistics, held_error)


@stood_in  # convs whose forward computes their weight (weight standardisation)
def decompose(
    model: nn.Module,
    method: str = "bsconv-u",
    input_shape: Sequence[int] = (1, 3, 224, 224),
    ranks: RankOptions = RankOptions(),
    eligibility: Eligibility = Eligibility(),
    progress: Reporter | None = None,
    budget: Budget | None = None,
    covariances: dict[str, PatchCovariance] | None = None,
    als_iters: int = 1,
    calibration: Iterable[torch.Tensor] | None = None,
    calib_max_bytes: int = DEFAULT_MAX_BYTES,
    reestimate_bn: bool = True,
    sequential: bool = False,
    latency: LatencyTimer | None = None,
    sensitivity: bool = False,
    sensitivity_cache: str | Path | None = None,
    reconstruction: ReconstructionOptions | None = None,
    holdout: float = HOLDOUT,
    guard: LatencyGuard | None = None,
) -> tuple[nn.Module, Plan]:
    """Rewrite ``model`` in place: every eligible layer becomes ``method``'s block with weights
    computed in closed form from its trained kernel.

    Args:
        model: a trained model (eval mode is used for counting). A conv whose forward
            convolves with a weight it computes (weight standardisation: timm's
            ``StdConv2d``, ``ScaledStdConv2d``) is factorized from that weight, and kept as it
            is where it stays dense (``core.computed_weight``).
        method: the name of a registered method (``bscompress.methods.METHODS``:
            ``bsconv-u``, ``bsconv-s``, ``dsc``, ``tucker2``, ``cp``, ``cp4``, ``svd``, and any
            plug-in) or ``auto``.
        input_shape: input shape with batch, for the MAC counts and the growth check.
        ranks: how ranks are chosen (fixed, by energy, BSConv-S ``p``, rounding ...).
        eligibility: which layers may be rewritten (globs, channel floor).
        progress: called with each unit of work before it runs (``progress.Step``: its
            stage, layer or block, and how many of how many): calibration batches, budget
            candidates, layers factorized, blocks reconstructed.
        budget: allocate ranks across layers to meet a whole-model MACs, params or latency
            target instead of using ``ranks.rank`` / ``ranks.energy`` (see
            ``plan_decomposition``); with ``calibration`` each candidate is charged its
            data-aware relative output error instead of its weight error.
        covariances: input-patch statistics per layer name (``calibrate.
            collect_patch_covariances``); the layers found there get data-aware weights
            (``data_aware.fit_block``) and their relative output error on that data.
        als_iters: alternating least-squares rounds of the data-aware BSConv-U fit.
        calibration: re-iterable input batches ``[B, C, H, W]`` (e.g. a list). When given,
            the covariances of the replaced layers are collected on them first (full Σ for
            layers under ``calib_max_bytes``), and afterwards every BatchNorm's running
            statistics are moved by the shift compression causes on them
            (``batchnorm.correct_batchnorm``; kept only where the network's output error on
            the held-out batches goes down) unless ``reestimate_bn`` is false.
        sequential: with ``calibration``, fit each layer on the inputs the partly compressed
            network gives it, against the original network's outputs (multi-layer error
            compensation; two passes over the calibration data per layer). Layers whose
            full covariance is over ``calib_max_bytes`` fall back to the one-shot statistics.
        latency: the ONNX Runtime timer of a latency budget (``latency.LatencyTimer``; one
            with the default on-disk cache when ``None``); the compressed model is timed too.
        guard: with ``budget``, offer only candidate blocks timed faster than their layer
            (``guard.LatencyGuard``); the chosen blocks and the whole model are timed
            against the original once built (the plan summary's ``guard`` record).
        sensitivity: with ``budget`` and ``calibration``, allocate by each candidate's
            measured network KL divergence (``sensitivity.SensitivityProbe``, data-aware
            blocks) instead of its weight error.
        sensitivity_cache: folder of the sensitivity results, reused by the next run with
            the same model and data (``None``: not kept).
        reconstruction: with ``calibration``, train each block holding replaced layers to
            reproduce the original's block output on the calibration data once the closed-form
            fits (and BatchNorm correction) are done (``reconstruct.reconstruct``); with a
            hold-out, on the other batches, each block kept trained only where its error on
            the held-out batches went down.
        holdout: with ``calibration``, the share of its batches held out to choose, per
            layer, between the data-free fit and the data-aware fits at each
            :data:`SHRINKAGE` strength (``split_calibration``; 0: always the data-aware fit
            at full strength, as before); the chosen one is refitted on all the data and its
            held-out output error recorded (``LayerPlan.held_out_error``). The same batches
            decide whether the BatchNorm correction and each reconstructed block are kept.

    Returns:
        ``(model, plan)``; the plan records, per layer, the ranks, params and MACs before and
        after, and the relative truncation error ‖W − Ŵ‖²/‖W‖² (or the skip reason).
    """
    if method != AUTO:
        get_method(method)
    check_finite(model)
    norms: dict[str, nn.Module] = {}  # layer → the BatchNorm taking its output
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:
            raise BadInput("the calibration data is empty: give at least one batch (--calib)")
        if not all(bool(torch.isfinite(x).all()) for x in calibration):
            raise BadInput("the calibration data holds NaN or infinite values: check the "
                           "data and its --mean/--std")
        if reestimate_bn and any(isinstance(m, _BatchNorm) for m in model.modules()):
            check_batchnorm_samples(sum(len(x) for x in calibration))  # before the work
        check_calibration_fits(model, calibration)  # the batches as the user gave them
        calibration = in_fast_layout(model, calibration)
        calibration, held_batches = split_calibration(calibration, holdout)
        eligible = _eligible(model, method, eligibility)
        if reestimate_bn:  # where a layer without bias can give its mean output error back
            norms = following_batchnorms(model, eligible, calibration[0][:1])
    if sequential and calibration is None:
        raise BadInput("--sequential needs calibration data (--calib)")
    if reconstruction is not None and calibration is None:
        raise BadInput("--reconstruct trains blocks on calibration data: add --calib")
    if sensitivity and (budget is None or calibration is None):
        raise BadInput("--sensitivity measures candidates on calibration data to allocate a "
                       "budget: add --calib and --budget")
    if budget is not None and budget.kind == "latency" and latency is None:
        latency = LatencyTimer(default_cache_path())
    probe = measured = None
    held_covs: dict[str, PatchCovariance] = {}  # the held-out batches' statistics per layer
    given = covariances is not None  # (ours are over all the calibration batches)

    def report(stage: str, item: str = "", done: int = 0, total: int | None = None) -> None:
        if progress is not None:
            progress(Step(stage, item, done, total))

    def collect(batches: list[torch.Tensor], layers: list[str], before: int = 0,
                total: int | None = None, observe: Callable | None = None
                ) -> dict[str, PatchCovariance]:
        total = total or sum(len(x) for x in batches)
        report("collecting statistics", "", before, total)
        return collect_patch_covariances(
            model, batches, layers, calib_max_bytes,
            progress=lambda seen: report("collecting statistics", "", before + seen, total),
            observe=observe)

    # what the statistics pass sees of the original network for the BatchNorm correction:
    # its BatchNorm inputs on the fitting batches and its outputs on the held-out ones
    observed = OriginalSeen()

    def statistics(layers: list[str]) -> tuple[dict[str, PatchCovariance],
                                               dict[str, PatchCovariance]]:
        """``(all, held)``: the statistics of ``layers`` on all the calibration batches
        and on the held-out ones, in one pass over the data: the held-out batches' and the
        others' are collected apart, and added up (``merged``)."""
        rest = [x for x in calibration if not any(x is h for h in held_batches)]
        total = sum(len(x) for x in calibration)
        fitted = collect(rest, layers, 0, total, lambda: observed.moment_hooks(model))
        if not held_batches:
            return fitted, {}
        held = collect(held_batches, layers, sum(len(x) for x in rest), total,
                       lambda: observed.output_hooks(model))
        return {name: merged(fitted[name], held[name]) for name in layers}, held

    if budget is not None and calibration is not None:  # candidates' errors measured on data
        if covariances is None:
            covariances, held_covs = statistics(eligible)

        def capped(entry: LayerPlan) -> LayerPlan:
            # a candidate is fitted as its method measures its data-free error (CP: fewer
            # ALS iterations, Tucker-2: no HOOI); a copy: the allocator keeps its own entry
            return dataclasses.replace(
                entry, options=get_method(entry.method).candidate_options(entry.options))

        def fit(name: str, module: nn.Module, entry: LayerPlan,
                rounds: int = als_iters) -> tuple[nn.Module, FitReport]:
            # centred only where the block's own bias takes the mean error: the network
            # runs the candidate with the BatchNorms as they are
            return _fit(module, capped(entry), covariances.get(name), rounds, centre=True)

        if sensitivity:
            probe = SensitivityProbe(model, calibration,
                                     lambda *args: fit(*args)[0], sensitivity_cache,
                                     tag=f"als={als_iters}|max_bytes={calib_max_bytes}")
            measured = CandidateError(lambda name, entry: probe(name, entry)["kl"], SENSITIVITY,
                                      progress)
        elif covariances:
            if held_batches and not held_covs:  # for the statistics given
                held_covs = collect(held_batches, list(covariances))

            splits: dict[tuple[str, bool], tuple] = {}  # one split per layer, not per rank
            # the candidates come layer by layer: their rank-independent decompositions
            # (the kernel's SVDs, Σ's whitening) are computed once per layer
            reuse, layer = Reuse(), [None]

            def candidate_error(name: str, entry: LayerPlan) -> float:
                if layer[0] != name:
                    reuse.clear()
                    layer[0] = name
                with reuse.active():
                    return layer_candidate_error(name, entry)

            def layer_candidate_error(name: str, entry: LayerPlan) -> float:
                trial = capped(entry)
                module, held = model.get_submodule(name), held_covs.get(name)
                if held is not None:  # the better of the data-free and data-aware fits
                    with torch.no_grad(), conditioning():
                        block, _ = get_method(trial.method).build(module, trial)
                        centre = (covariances[name].mean is not None
                                  and _absorbable(module, block, norms.get(name)))
                        if (name, centre) not in splits:
                            splits.clear()  # the candidates come layer by layer
                            rest, scored = _split(covariances[name], held, centre)
                            splits[name, centre] = rest, HeldScore.of(module, scored)
                        rest, score = splits[name, centre]
                        errors = get_method(trial.method).held_out_errors(
                            module, trial, rest, score.sigma)
                        if errors is not None:  # every rank's from one product
                            return score.relative(min(errors))
                        return _select(module, trial, block, rest, score,
                                       CANDIDATE_ALS_ITERS, strengths=SHRINKAGE[:1])[1]
                output = fit(name, module, entry, CANDIDATE_ALS_ITERS)[1].output_error
                return output if output is not None else 1.0

            measured = CandidateError(candidate_error, HELD_OUT_ERROR if held_covs
                                      else OUTPUT_ERROR, progress)
    plan = plan_decomposition(model, method, input_shape, ranks, eligibility, budget,
                              latency=latency, error=measured, guard=guard)
    original = copy.deepcopy(model) if calibration is not None else None
    reference = original if sequential else None
    if calibration is not None and covariances is None:
        covariances, held_covs = statistics([entry.name for entry in plan.replaced()])
    if measured is not None:  # keep the statistics of the layers replaced
        covariances = {e.name: covariances[e.name] for e in plan.replaced()
                       if e.name in covariances}
    if probe is not None:
        plan.summary.sensitivity = SensitivityRecord(
            measured=probe.measured, cache=str(probe.cache) if probe.cache else None)

    if calibration is not None and held_batches and plan.replaced() and not held_covs:
        # (a budget measured on data collected them for every candidate layer already)
        held_covs = collect(held_batches, [e.name for e in plan.replaced()])
    names = [entry.name for entry in plan.replaced()]
    position = {name: i for i, name in enumerate(names)}
    # the sequential fit's statistics, from the blocks' cached inputs
    paired = (PairedStatistics(reference, model, names, calibration)
              if reference is not None and names else None)
    reused = paired.reused if paired is not None else {}  # fitted one-shot

    def build(module: nn.Module, entry: LayerPlan) -> nn.Module:
        report("factorizing", entry.name, position[entry.name], len(names))
        cov = one_shot = (covariances or {}).get(entry.name)
        sequential = (paired is not None and cov is not None and cov.full is not None
                      and entry.name not in reused)
        if sequential:
            # E[p pᵀ] of the original layer is its one-shot Σ: not computed again
            cov = paired.covariance(entry.name, reference=None if given else one_shot)
        held = held_covs.get(entry.name) if one_shot is not None else None
        block, fits[entry.name] = _fit(module, entry, cov, als_iters, held, one_shot,
                                       centre=True, norm=norms.get(entry.name))
        if entry.name in reused and cov is not None:
            fits[entry.name] = dataclasses.replace(
                fits[entry.name], fit=f"{fits[entry.name].fit}, one-shot (the network runs "
                f"this layer {reused[entry.name]} times a pass: no sequential fit)")
        return block

    fits: dict[str, FitReport] = {}

    try:
        apply_plan(model, plan, build=build)
    finally:
        if paired is not None:
            paired.close()
    in_network: dict[str, float] = {}
    if calibration is not None:
        if names:  # before BatchNorm re-estimation: the layer outputs themselves
            report("measuring the layers' errors in the network")
            in_network = measure_output_errors(original, model, names,
                                               _first_samples(calibration, MEASURED_SAMPLES))
        full = sum(1 for c in covariances.values() if c.full is not None)
        # the held-out batches choose; the rest fit (all of them when too few are left)
        fitting = [x for x in calibration if not any(x is h for h in held_batches)]
        if sum(len(x) for x in fitting) < MIN_BATCHNORM_SAMPLES:
            fitting, held_batches = calibration, []
        if reestimate_bn:
            report("correcting BatchNorm")
        batchnorm = (correct_batchnorm_checked(model, original, fitting, held_batches,
                                                 observed)
                     if reestimate_bn else {"corrected": 0})
        plan.summary.calibration = CalibrationRecord(
            layers=len(covariances), full_covariance_layers=full,
            covariance_mb=round(sum(c.nbytes for c in covariances.values()) / 2**20, 1),
            batchnorm_reestimated=batchnorm["corrected"], batchnorm=batchnorm,
            als_iters=als_iters, sequential=sequential)
        if reconstruction is not None:
            # the network before, to keep the reconstruction only where its output error
            # on the held-out batches goes down (each block's own error can fall while the
            # network's rises: a flat CNN whose BatchNorms stand outside the blocks)
            scored = held_batches or fitting
            targets = original_outputs(original, scored, observed)
            error_before = held_out_output_error(model, targets, scored)
            saved = copy.deepcopy(model.state_dict())
            count = iter(range(len(names)))  # a block holds one or more of the layers
            blocks = reconstruct(model, original, fitting, names, reconstruction,
                                 progress=lambda block: report("reconstructing", block,
                                                               next(count)),
                                 held=held_batches)
            again = {}
            if reestimate_bn and any(not b.restored and b.skipped is None for b in blocks):
                # a block trained to the original's output with a BatchNorm outside it
                # (a flat CNN's conv1/bn1 siblings) undid the mean error that the
                # correction, and the fit's mean → BatchNorm, had moved into that
                # BatchNorm: measured again on the trained blocks, from the original's
                # statistics, and kept where the held-out error says so
                report("correcting BatchNorm")
                again = correct_batchnorm_checked(model, original, fitting, held_batches,
                                                  observed)
            error_after = held_out_output_error(model, targets, scored)
            kept = error_after <= error_before
            if not kept:
                model.load_state_dict(saved)
            plan.summary.reconstruction = ReconstructionRecord(
                **asdict(reconstruction), blocks=blocks, batchnorm=again, kept=kept,
                network_error={"before": error_before, "after": error_after,
                               **({"in_sample": True} if not held_batches else {})})
    if budget is not None and budget.kind == "latency":
        plan.summary.budget.measured = latency.time(model, tuple(input_shape))
    if guard is not None and plan.summary.guard is not None:  # the built model, timed
        plan.summary.guard.whole = {str(b): r for b, r in guard.whole(model, input_shape).items()}
        plan.summary.guard.untimed_why = guard.why
    _report(plan, model, input_shape, fits, in_network)
    return model, plan


def _report(plan: Plan, model: nn.Module, input_shape: Sequence[int],
            fits: dict[str, FitReport], in_network: dict[str, float]) -> None:
    """The one place the outcome of the fits and of the built model is written into the
    plan's entries (whose decisions planning and allocation made): each replaced layer's
    fit, its error in the network (``in_network``, calibrated runs), its params and MACs,
    and the whole model's."""
    modules = dict(model.named_modules())
    after = module_macs(model, input_shape)
    for entry in plan.replaced():
        if entry.name in fits:  # every replaced layer was built (apply_plan)
            entry.record(fits[entry.name])
        entry.measured_error = in_network.get(entry.name)
        entry.params_after = count_params(modules[entry.name])
        entry.macs_after = after.module_macs.get(entry.name, 0)
    plan.summary.params_after, plan.summary.macs_after = after.params, after.macs

