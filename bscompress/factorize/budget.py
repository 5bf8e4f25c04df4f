"""Allocating ranks across layers under a whole-model budget (multiple-choice knapsack).

Each layer offers candidates ``(cost, error)``: its factorized forms at every rank and the
dense layer itself (its original cost, error 0). ``allocate`` picks one candidate per layer
so that the summed error is small and the summed cost (plus the cost of the layers that are
not candidates) never exceeds the budget.

Greedy on the lower convex hull of each layer's candidates: start every layer at its
cheapest candidate, then repeatedly take the upgrade with the largest error decrease per
unit of cost that still fits; when no hull step fits, any cheaper-to-fit upgrade that lowers
the error is taken. On convex hulls this is the optimum of the Lagrangian relaxation at the
final multiplier, and the budget is met up to less than one rank step of one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One form of a layer: ``cost`` (MACs or params) and ``error`` (normalised, ≥ 0)."""

    cost: float
    error: float


class BudgetError(ValueError):
    """The budget is below the cheapest allocation."""


def lower_hull(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the candidates on the lower-left convex hull, by increasing cost."""
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].cost,
                                                          candidates[i].error))
    hull: list[int] = []
    for i in order:
        c = candidates[i]
        if hull and c.error >= candidates[hull[-1]].error:
            continue  # dominated: costs at least as much for no less error
        while len(hull) >= 2:
            a, b = candidates[hull[-2]], candidates[hull[-1]]
            # drop b when it lies on or above the segment a → c
            if (b.error - a.error) * (c.cost - a.cost) >= (c.error - a.error) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: Sequence[Sequence[Candidate]], budget: float,
             fixed_cost: float = 0.0) -> list[int]:
    """One candidate index per layer with ``fixed_cost + Σ cost ≤ budget``, error minimised.

    Raises:
        BudgetError: when even the cheapest candidates exceed the budget.
    """
    choice = [min(range(len(c)), key=lambda i, c=c: (c[i].cost, c[i].error)) for c in layers]
    total = fixed_cost + sum(c[i].cost for c, i in zip(layers, choice, strict=True))
    if total > budget * (1 + 1e-12):
        raise BudgetError(f"the cheapest allocation costs {total:.6g} > budget {budget:.6g}")
    hulls = [lower_hull(c) for c in layers]
    position = [h.index(i) if i in h else 0 for h, i in zip(hulls, choice, strict=True)]
    while True:
        best, best_ratio = None, 0.0
        for layer, (cands, hull) in enumerate(zip(layers, hulls, strict=True)):
            p = position[layer]
            if p + 1 >= len(hull):
                continue
            cur, nxt = cands[hull[p]], cands[hull[p + 1]]
            extra = nxt.cost - cur.cost
            if total + extra > budget:
                continue
            ratio = (cur.error - nxt.error) / max(extra, 1e-30)
            if ratio > best_ratio:
                best, best_ratio = layer, ratio
        if best is None:
            break
        cands, hull = layers[best], hulls[best]
        total += cands[hull[position[best] + 1]].cost - cands[hull[position[best]]].cost
        position[best] += 1
        choice[best] = hull[position[best]]
    # fill the leftover with the best single upgrades off the hull
    improved = True
    while improved:
        improved = False
        best, best_gain = None, 0.0
        for layer, cands in enumerate(layers):
            cur = cands[choice[layer]]
            for i, cand in enumerate(cands):
                extra = cand.cost - cur.cost
                gain = cur.error - cand.error
                if gain > best_gain and total + extra <= budget:
                    best, best_gain = (layer, i, extra), gain
        if best is not None:
            layer, i, extra = best
            choice[layer], total = i, total + extra
            improved = True
    return choice
