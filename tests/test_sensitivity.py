"""Sensitivity probes and data-aware allocation: one layer swapped at a time, the model put
back, the results cached by a fingerprint of model and data."""

from __future__ import annotations

import copy

import pytest
import torch

from bscompress.compress.decomposition import (
    HELD_OUT_ERROR,
    OUTPUT_ERROR,
    SENSITIVITY,
    Budget,
    decompose,
)
from bscompress.compress.sensitivity import SensitivityProbe
from bscompress.core.errors import BadInput
from bscompress.core.plan import LayerPlan
from bscompress.methods import get_method
from tests.nets import INPUT_SHAPE, TinyNet


def _setup():
    torch.manual_seed(0)
    model = TinyNet(width=32).eval()
    batches = [torch.randn(8, *INPUT_SHAPE[1:]) for _ in range(3)]
    return model, batches


def _build(name, module, entry):
    return get_method(entry.method).build(module, entry)[0]


def test_probe_swaps_one_layer_and_puts_it_back(tmp_path):
    model, batches = _setup()
    x = batches[0]
    before = model(x)
    probe = SensitivityProbe(model, batches, _build, tmp_path)
    layer = "features.0"  # 16 → 32 channels, 3×3: full BSConv-U rank is 9
    exact = probe(layer, LayerPlan(layer, "Conv2d", "bsconv-u", {"rank": 9}))
    lossy = probe(layer, LayerPlan(layer, "Conv2d", "bsconv-u", {"rank": 1}))
    assert exact["kl"] == pytest.approx(0.0, abs=1e-8) and exact["disagreement"] == 0.0
    assert lossy["kl"] > 1e-7  # a random net's outputs are flat: small, but not zero
    assert torch.equal(model(x), before)  # the original layer is back
    assert probe.measured == 2
    # the same model and data: nothing measured again; other data: measured again
    again = SensitivityProbe(model, batches, _build, tmp_path)
    assert again(layer, LayerPlan(layer, "Conv2d", "bsconv-u", {"rank": 1})) == lossy
    assert again.measured == 0
    other = SensitivityProbe(model, [b + 1 for b in batches], _build, tmp_path)
    other(layer, LayerPlan(layer, "Conv2d", "bsconv-u", {"rank": 1}))
    assert other.measured == 1


def test_sensitivity_allocation_is_cached_and_reported(tmp_path):
    model, batches = _setup()
    kwargs = dict(budget=Budget("macs", 0.6), calibration=batches, sensitivity=True,
                  sensitivity_cache=tmp_path)
    _, plan = decompose(copy.deepcopy(model), "bsconv-u", INPUT_SHAPE, **kwargs)
    assert plan.summary.budget.error == SENSITIVITY
    assert plan.summary.sensitivity.measured > 0
    assert all(e.sensitivity is not None for e in plan.replaced())
    assert plan.summary.macs_after <= 0.6 * plan.summary.macs_before
    _, again = decompose(copy.deepcopy(model), "bsconv-u", INPUT_SHAPE, **kwargs)
    assert again.summary.sensitivity.measured == 0
    assert [e.ranks for e in again.layers] == [e.ranks for e in plan.layers]


def test_calibrated_budget_allocates_by_output_error():
    model, batches = _setup()
    _, plan = decompose(copy.deepcopy(model), "auto", INPUT_SHAPE, budget=Budget("macs", 0.5),
                        calibration=batches)
    assert plan.summary.budget.error == HELD_OUT_ERROR  # a quarter held out by default
    assert plan.summary.macs_after <= 0.5 * plan.summary.macs_before
    _, plan = decompose(copy.deepcopy(model), "auto", INPUT_SHAPE, budget=Budget("macs", 0.5),
                        calibration=batches, holdout=0)
    assert plan.summary.budget.error == OUTPUT_ERROR
    assert plan.summary.calibration.layers == len(plan.replaced())


def test_sensitivity_needs_calibration_and_a_budget():
    model, batches = _setup()
    with pytest.raises(BadInput, match="--sensitivity"):
        decompose(model, "bsconv-u", INPUT_SHAPE, budget=Budget("macs", 0.5), sensitivity=True)
    with pytest.raises(BadInput, match="--sensitivity"):
        decompose(model, "bsconv-u", INPUT_SHAPE, calibration=batches, sensitivity=True)


class _Returns(torch.nn.Module):
    """TinyNet whose output is wrapped: ``{"logits": y, "aux": …}``, ``(y, …)`` or none."""

    def __init__(self, net: torch.nn.Module, form: str) -> None:
        super().__init__()
        self.net, self.form = net, form

    def forward(self, x):
        y = self.net(x)
        return {"dict": {"logits": y, "aux": y.sum()}, "tuple": (y, y.sum()),
                "none": {"n": 3}}[self.form]


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_the_probe_compares_the_first_output_of_a_model_returning_several(form):
    model, batches = _setup()
    wrapped = _Returns(model, form)
    layer = "net.features.0"
    probe = SensitivityProbe(wrapped, batches, _build)
    lossy = probe(layer, LayerPlan(layer, "Conv2d", "bsconv-u", {"rank": 1}))
    plain = SensitivityProbe(model, batches, _build)("features.0", LayerPlan(
        "features.0", "Conv2d", "bsconv-u", {"rank": 1}))
    assert lossy == pytest.approx(plain)


def test_a_model_without_a_tensor_output_is_refused_with_what_to_do():
    model, batches = _setup()
    probe = SensitivityProbe(_Returns(model, "none"), batches, _build)
    with pytest.raises(BadInput, match="returns no tensor.*without --sensitivity"):
        probe("net.features.0", LayerPlan("net.features.0", "Conv2d", "bsconv-u", {"rank": 1}))
