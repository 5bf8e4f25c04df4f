"""The global budget: the allocator never exceeds it, meets it up to one rank step, and
beats a uniform rank at equal cost."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch

from bscompress.compress.decomposition import AUTO_METHODS, Budget, decompose, plan_decomposition
from bscompress.core.errors import BadInput
from bscompress.core.plan import LayerPlan
from bscompress.core.stats import module_macs
from bscompress.core.surgery import Eligibility
from bscompress.factorize.budget import BudgetError, Candidate, allocate, lower_hull
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load, save_archive
from bscompress.methods import RankOptions, get_method
from tests.nets import INPUT_SHAPE, TinyNet


def _layer(rng: random.Random, steps: int) -> list[Candidate]:
    """A dense form plus ``steps`` ranks: cost grows, error falls (convex-ish, with noise)."""
    dense = rng.uniform(50, 200)
    costs = sorted(rng.uniform(0.05, 0.95) * dense for _ in range(steps))
    errors = sorted((rng.uniform(0, 1) ** 2 for _ in range(steps)), reverse=True)
    return [Candidate(dense, 0.0)] + [Candidate(c, e) for c, e in zip(costs, errors,
                                                                        strict=True)]


def test_lower_hull_drops_dominated_points():
    cands = [Candidate(1, 1.0), Candidate(2, 0.2), Candidate(3, 0.5), Candidate(4, 0.1),
             Candidate(5, 0.0)]
    assert lower_hull(cands) == [0, 1, 4]  # 3 dominated, 4 above the segment 2 → 5


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_feasible_tight_and_near_optimal(seed):
    rng = random.Random(seed)
    layers = [_layer(rng, rng.randint(1, 4)) for _ in range(4)]
    fixed = rng.uniform(0, 50)
    cheapest = fixed + sum(min(c.cost for c in cands) for cands in layers)
    dense = fixed + sum(cands[0].cost for cands in layers)
    budget = rng.uniform(cheapest, dense)
    choice = allocate(layers, budget, fixed)
    cost = fixed + sum(c[i].cost for c, i in zip(layers, choice, strict=True))
    error = sum(c[i].error for c, i in zip(layers, choice, strict=True))
    assert cost <= budget + 1e-9
    # no single change of one layer that fits lowers the error (a local optimum)
    for layer, cands in enumerate(layers):
        for cand in cands:
            extra = cand.cost - cands[choice[layer]].cost
            if cost + extra <= budget:
                assert cand.error >= cands[choice[layer]].error - 1e-12
    # and within the error of the best allocation found by brute force plus one step
    best = min(sum(c[i].error for c, i in zip(layers, combo, strict=True))
               for combo in itertools.product(*[range(len(c)) for c in layers])
               if fixed + sum(c[i].cost for c, i in zip(layers, combo, strict=True)) <= budget)
    worst_step = max(abs(a.error - b.error) for c in layers for a in c for b in c)
    assert error <= best + worst_step + 1e-12


def test_infeasible_budget_raises():
    with pytest.raises(BudgetError):
        allocate([[Candidate(10, 0.0), Candidate(5, 0.3)]], budget=4.0)


@pytest.mark.parametrize("method", ["bsconv-u", "bsconv-s", "dsc", "tucker2", "cp4", "svd"])
@pytest.mark.parametrize("kind,fraction", [("macs", 0.6), ("params", 0.7)])
def test_plan_meets_the_budget(method, kind, fraction):
    if method == "svd":  # only the last 1×1 conv and the classifier are svd's to shrink
        fraction = 0.98
    torch.manual_seed(0)
    model, plan = decompose(TinyNet(width=32), method, INPUT_SHAPE, RankOptions(),
                            budget=Budget(kind, fraction))
    totals = plan.summary
    after, before = getattr(totals, f"{kind}_after"), getattr(totals, f"{kind}_before")
    assert after <= fraction * before
    assert totals.budget.achieved == pytest.approx(after, rel=1e-9)
    # within one rank step of the target: the smallest cost difference of any layer
    assert after >= fraction * before * 0.8 or not plan.replaced()


def test_budget_beats_a_uniform_rank_at_equal_cost():
    torch.manual_seed(0)
    base = TinyNet(width=32)
    with torch.no_grad():  # make one layer far more compressible than the other
        w = base.features[2].weight
        u = torch.randn(w.shape[0], 1) @ torch.randn(1, w[0].numel())
        w.copy_(u.reshape(w.shape) + 0.01 * torch.randn_like(w))
    uniform, plan_u = decompose(copy.deepcopy(base), "bsconv-u", INPUT_SHAPE,
                                RankOptions(rank=2))
    fraction = plan_u.summary.macs_after / plan_u.summary.macs_before
    _, plan_b = decompose(copy.deepcopy(base), "bsconv-u", INPUT_SHAPE, RankOptions(),
                          budget=Budget("macs", fraction))
    assert plan_b.summary.macs_after <= plan_u.summary.macs_after

    def total(plan):  # summed relative errors, dense layers count 0
        return sum(e.predicted_error or 0.0 for e in plan.layers if e.replaced)

    assert total(plan_b) <= total(plan_u) + 1e-9


def test_budget_parse_and_unsupported():
    assert Budget.parse("macs=0.25") == Budget("macs", 0.25)
    assert Budget.parse("latency=0.5") == Budget("latency", 0.5)
    for bad in ("macs", "flops=0.2", "macs=0", "params=1.5", "latency=2"):
        with pytest.raises(BadInput, match="--budget"):
            Budget.parse(bad)
    with pytest.raises(BadInput, match="smallest ranks"):
        decompose(TinyNet(), "bsconv-u", INPUT_SHAPE, budget=Budget("macs", 0.01))


def test_auto_picks_per_layer_and_never_a_worse_form_at_the_same_cost(tmp_path):
    torch.manual_seed(0)
    base = TinyNet(width=32).eval()
    shapes = {}

    def record(name):
        def hook(_module, args):
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in base.named_modules()]
    base(torch.zeros(INPUT_SHAPE))
    for hook in hooks:
        hook.remove()
    # the plan alone: predicted errors are the ones the allocator compared
    plan = plan_decomposition(base, "auto", INPUT_SHAPE, RankOptions(), Eligibility(),
                              Budget("macs", 0.5))
    assert plan.summary.method == "auto" and plan.replaced()
    assert {e.method for e in plan.replaced()} <= set(AUTO_METHODS)
    modules = dict(base.named_modules())
    for entry in plan.replaced():
        mod = modules[entry.name]
        chosen = get_method(entry.method).structure(copy.deepcopy(mod), entry)
        chosen_cost = module_macs(chosen, shapes[entry.name]).macs
        for name in AUTO_METHODS:
            impl = get_method(name)
            if impl.skip_reason(entry.name, mod, Eligibility(), False) is not None:
                continue  # e.g. the low-rank pair of 1×1 convs for a 3×3 conv
            for ranks, options, error in impl.candidates(mod, RankOptions()):
                probe = LayerPlan(entry.name, entry.module_type, ranks=ranks, options=options)
                block = impl.structure(copy.deepcopy(mod), probe)
                if module_macs(block, shapes[entry.name]).macs <= chosen_cost:
                    assert error >= entry.predicted_error - 1e-12, (entry, name, ranks)
    # built and archived, every layer comes back with its own method
    model, built = decompose(copy.deepcopy(base), "auto", INPUT_SHAPE, RankOptions(),
                             budget=Budget("macs", 0.5))
    assert built.summary.macs_after <= 0.5 * built.summary.macs_before
    out = tmp_path / "auto.pt"
    save_archive(out, model, ArchSpec(f"{Path(__file__).parent / 'nets.py'}:TinyNet",
                                      {"width": 32}), built)
    x = torch.randn(2, *INPUT_SHAPE[1:])
    assert torch.equal(load(out)(x), model(x))


def test_tucker2_candidates_are_measured_as_the_truncated_hosvd():
    """A Tucker-2 budget candidate is fitted without HOOI (``candidate_options``): its
    weight error is then within the HOSVD bound e_out + e_in its data-free error reads, and
    the entry's own options (the chosen block's HOOI iterations) are left alone."""
    from bscompress.factorize.separable import relative_errors
    from bscompress.factorize.tucker import hosvd_spectra

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 16, 3, padding=1)
    method = get_method("tucker2")
    (ranks, options, bound), *_ = method.candidates(conv, RankOptions(tucker_iters=5))
    capped = method.candidate_options(options)
    assert capped["n_iter_max"] == 0 and options["n_iter_max"] == 5
    _, error = method.build(conv, LayerPlan("x", "Conv2d", method="tucker2", ranks=ranks,
                                            options=capped))
    e_out, e_in = (relative_errors(s) for s in hosvd_spectra(conv.weight))
    assert error <= float(e_out[ranks["out"]] + e_in[ranks["in"]]) + 1e-9
    assert error == pytest.approx(bound, rel=0.5)  # the HOSVD bound is close to it
    _, hooi = method.build(conv, LayerPlan("x", "Conv2d", method="tucker2", ranks=ranks,
                                           options=options))
    assert hooi <= error + 1e-12


@pytest.mark.parametrize("name", ["cp", "cp4"])
def test_cp_candidates_run_als_in_float32_and_the_chosen_block_in_float64(name):
    """A CP budget candidate's ALS runs in float32 (``candidate_options``): its error is the
    float64 fit's at the same iterations to 1e-5, its factors are float64, and the entry's
    own options are left alone (the chosen block is fitted in float64)."""
    from bscompress.factorize.cp import cp_factors

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 32, 3, padding=1)
    method = get_method(name)
    (ranks, options, error), *_ = method.candidates(conv, RankOptions(cp_iters=30))
    capped = method.candidate_options(options)
    assert capped["als_dtype"] == "float32" and "als_dtype" not in options
    block, fitted = method.build(conv, LayerPlan("x", "Conv2d", method=name, ranks=ranks,
                                                 options=capped))
    reference = cp_factors(conv.weight, ranks["rank"], method.mode,
                           n_iter_max=method.CANDIDATE_ITERS).relative_error
    assert fitted == pytest.approx(reference, abs=1e-5) and error == pytest.approx(fitted)
    assert all(p.dtype == torch.float32 for p in block.parameters())  # the module's dtype
    factors = cp_factors(conv.weight, ranks["rank"], method.mode, n_iter_max=3,
                         precision=torch.float32)
    assert factors.out_factors.dtype == torch.float64
    grouped = torch.cat([torch.zeros(8, 4, 3, 3), torch.randn(8, 4, 3, 3)])  # a zero group
    halves = cp_factors(grouped, 4, method.mode, groups=2, n_iter_max=3, precision=torch.float32)
    assert all(f.dtype == torch.float64 for f in (halves.out_factors, halves.in_factors,
                                                  *halves.spatial_factors))


def test_widths_under_the_channel_block_come_in_only_where_the_budget_needs_them():
    """Widths rounded up to a block (``round_to``) set a floor on the MACs; a budget under it
    lets narrower forms in (counted in the record) instead of being refused, and one over it
    keeps every width a multiple of the block (or the layer's full width)."""
    torch.manual_seed(0)
    net = TinyNet(width=32)
    rounded = RankOptions(round_to=16)

    def widths(plan) -> list[int]:
        return [w for e in plan.replaced() for w in e.ranks.values()]

    _, roomy = decompose(copy.deepcopy(net), "tucker2", INPUT_SHAPE, rounded,
                         budget=Budget("macs", 0.9))
    assert roomy.summary.budget.under_block is None and roomy.replaced()
    for entry in roomy.replaced():
        conv = net.get_submodule(entry.name)
        full = {"out": conv.out_channels, "in": conv.in_channels}
        assert all(w % 16 == 0 or w == full[k] for k, w in entry.ranks.items()), entry.ranks
    tight_plan = None
    for fraction in (0.5, 0.3, 0.2, 0.1):
        try:
            _, tight_plan = decompose(copy.deepcopy(net), "tucker2", INPUT_SHAPE, rounded,
                                      budget=Budget("macs", fraction))
        except BadInput:
            break
        if tight_plan.summary.budget.under_block:
            break
    assert tight_plan is not None and tight_plan.summary.budget.under_block > 0
    assert tight_plan.summary.macs_after <= tight_plan.summary.budget.target * 1.000001 + (
        tight_plan.summary.macs_before - sum(e.macs_before for e in tight_plan.layers))
    assert any(w % 16 for w in widths(tight_plan))
