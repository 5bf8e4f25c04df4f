"""The reuse of rank-independent decompositions across a layer's candidates
(``factorize.memo``): same results as computing, no state outside an active table, no
answer for changed or different arguments."""

from __future__ import annotations

import pytest
import torch

from bscompress.compress.decomposition import Budget, decompose
from bscompress.factorize import memo
from bscompress.factorize.gsvd import conditioning, whitened_lowrank, whitening
from bscompress.factorize.linalg import thin_svd
from bscompress.methods import RankOptions
from tests.nets import INPUT_SHAPE, PointwiseNet, TinyNet


def test_a_reusable_function_computes_outside_a_table():
    calls = []

    @memo.reusable
    def double(x):
        calls.append(1)
        return 2 * x

    x = torch.ones(3)
    double(x), double(x)
    assert len(calls) == 2


def test_an_active_table_answers_equal_arguments_with_clones():
    calls = []

    @memo.reusable
    def double(x, k=1):
        calls.append(1)
        return 2 * x * k, k

    table = memo.Reuse()
    x = torch.arange(4.0)
    with table.active():
        first, _ = double(x)
        first.add_(100)  # a caller changing its result changes nobody else's
        again, _ = double(x.clone())  # equal by value
        assert torch.equal(again, 2 * x) and len(calls) == 1
        double(x, k=2)  # other keyword: computed
        x.add_(1)  # changed in place since: computed again
        assert torch.equal(double(x)[0], 2 * x)
        double(x.double())  # other dtype: computed
    assert len(calls) == 4 and table.hits == 1 and table.misses == 4
    double(x)  # inactive again
    assert len(calls) == 5
    table.clear()
    assert not table.entries


def test_the_table_is_bounded():
    table = memo.Reuse(limit=2)
    with table.active():
        for i in range(5):
            thin_svd(torch.full((3, 3), float(i)))
    assert len(table.entries) == 2


def test_reused_whitening_notes_its_floored_count_again():
    sigma = torch.zeros(1, 4, 4, dtype=torch.float64)
    sigma[0, 0, 0] = -1.0  # indefinite beyond the ridge: the floored eigendecomposition
    table = memo.Reuse()
    counts = []
    with table.active():
        for _ in range(2):
            with conditioning() as record:
                whitening(sigma)
            counts.append(record["floored"])
    assert table.hits == 1 and counts[0] == counts[1] > 0


def test_whitened_lowrank_is_the_same_from_the_table():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 6, 12, generator=g, dtype=torch.float64)
    x = torch.randn(1, 40, 12, generator=g, dtype=torch.float64)
    sigma = x.transpose(1, 2) @ x / 40
    expected = [whitened_lowrank(w, sigma, r) for r in (1, 3, 6)]
    table = memo.Reuse()
    with table.active():
        got = [whitened_lowrank(w, sigma, r) for r in (1, 3, 6)]
    assert table.hits >= 4  # the whitening and the SVD of W L, twice each
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("net", [TinyNet, PointwiseNet])
def test_a_calibrated_budget_builds_the_same_model_with_and_without_reuse(monkeypatch, net):
    """The candidates' errors, hence the allocation and the fits, do not change."""
    def run():
        torch.manual_seed(0)
        model = net().eval()
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
        model, plan = decompose(model, "auto", INPUT_SHAPE, RankOptions(),
                                budget=Budget("macs", 0.5), calibration=batches)
        return model.state_dict(), [(e.method, e.ranks) for e in plan.layers]

    found, lookup = [], memo.Reuse.lookup

    def counted(self, fn, args, kwargs):
        answer = lookup(self, fn, args, kwargs)
        found.append(answer[0])
        return answer

    monkeypatch.setattr(memo.Reuse, "lookup", counted)
    reused = run()
    assert any(found)  # the candidates did share decompositions
    monkeypatch.setattr(memo.Reuse, "lookup", lambda self, fn, args, kwargs: (False, None))
    computed = run()
    assert reused[1] == computed[1]
    assert reused[0].keys() == computed[0].keys()
    assert all(torch.equal(reused[0][k], computed[0][k]) for k in reused[0])
