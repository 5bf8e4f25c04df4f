"""Networks built in ways the plain conv stack is not: parametrized weights (weight norm,
spectral norm: ``torch.nn.utils.parametrizations``), a conv module the network runs twice
a pass, an ineligible 3-D conv among the 2-D ones. Each goes through a calibrated budget,
one-shot and sequential, and the oracle is the original network (full rank) or the block's
own dense weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from bscompress.compress.decomposition import Budget, decompose
from bscompress.core.errors import BadInput
from bscompress.core.stats import check_input_shape, module_macs
from bscompress.deploy.export import check_export_model
from bscompress.methods import RankOptions

SHAPE = (1, 3, 12, 12)


def _calibration(count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(count)]


class Net(nn.Module):
    """conv → conv (``twice``: run a second time on its own output) → conv3 → Linear;
    ``wrap`` applied to the middle convs, ``stem3d``: a Conv3d first."""

    def __init__(self, wrap=lambda m: m, twice: bool = False, stem3d: bool = False) -> None:
        super().__init__()
        self.stem3d = nn.Conv3d(3, 3, 3, padding=1) if stem3d else None
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = wrap(nn.Conv2d(16, 16, 3, padding=1))
        self.c3 = wrap(nn.Conv2d(16, 24, 3, padding=1))
        self.fc = nn.Linear(24, 10)
        self.twice = twice

    def forward(self, x):
        if self.stem3d is not None:
            x = self.stem3d(x.unsqueeze(2)).squeeze(2)
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        if self.twice:
            x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


WRAPS = {"weight_norm": parametrizations.weight_norm,
         "spectral_norm": parametrizations.spectral_norm}


def _net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Net(**kwargs).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_parametrized_convs_are_counted_and_factorized_from_their_weight(wrap):
    """MACs are counted through a parametrization (the flop counter's module tracker and
    inference mode do not mix with it); at full rank the block reproduces the parametrized
    conv; its weight is the one the parametrization computes."""
    net = _net(wrap=WRAPS[wrap])
    assert module_macs(net, SHAPE).module_macs["c2"] == 16 * 16 * 9 * 144
    x = torch.randn(2, *SHAPE[1:])
    model, plan = decompose(copy.deepcopy(net), "tucker2", SHAPE,
                            RankOptions(rank=99, allow_growth=True))
    assert {e.name for e in plan.replaced()} >= {"c2", "c3"}
    with torch.no_grad():
        assert _rel(model(x), net(x)) < 1e-5
        dense = model.c2.to_dense()
        assert _rel(dense, net.c2.weight) < 1e-5


@pytest.mark.parametrize(("wrap", "sequential"), [("weight_norm", True),
                                                   ("spectral_norm", False)])
def test_parametrized_convs_under_a_calibrated_budget(wrap, sequential):
    net = _net(wrap=WRAPS[wrap])
    model, plan = decompose(copy.deepcopy(net), "auto", SHAPE, budget=Budget("macs", 0.6),
                            calibration=_calibration(), sequential=sequential)
    assert plan.replaced() and plan.summary.macs_after <= 0.6 * plan.summary.macs_before
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_a_layer_run_twice_a_pass_is_fitted_one_shot_in_a_sequential_run():
    """The sequential fit pairs each layer's inputs in both networks, pass by pass; a module
    the network runs twice has two inputs a pass, so it is fitted on its one-shot statistics
    (of both calls) and the plan says so; the other layers are fitted sequentially."""
    net = _net(twice=True)
    model, plan = decompose(copy.deepcopy(net), "bsconv-u", SHAPE, RankOptions(rank=2),
                            calibration=_calibration(), sequential=True)
    fits = {e.name: e.fit for e in plan.replaced()}
    assert "one-shot (the network runs this layer 2 times a pass" in fits["c2"]
    assert "sequential" in fits["c3"] and "one-shot" not in fits["c3"]
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    one_shot, plan_one = decompose(copy.deepcopy(net), "bsconv-u", SHAPE, RankOptions(rank=2),
                                   calibration=_calibration())
    (c2_one,) = [e for e in plan_one.replaced() if e.name == "c2"]
    (c2_seq,) = [e for e in plan.replaced() if e.name == "c2"]
    assert c2_seq.predicted_error == pytest.approx(c2_one.predicted_error, rel=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_an_ineligible_3d_conv_is_left_alone_under_a_calibrated_budget(sequential):
    """The statistics are collected for the layers a method may rewrite: a Conv3d among the
    2-D convs is kept, with its reason, instead of breaking the 2-D patch statistics."""
    net = _net(stem3d=True)
    model, plan = decompose(copy.deepcopy(net), "auto", SHAPE, budget=Budget("macs", 0.7),
                            calibration=_calibration(), sequential=sequential)
    (stem,) = [e for e in plan.layers if e.name == "stem3d"]
    assert stem.method is None and "Conv3d" in stem.skip_reason
    assert model.stem3d is not net.stem3d and torch.equal(model.stem3d.weight,
                                                          net.stem3d.weight)
    assert plan.replaced()


class CastingNet(nn.Module):
    """A forward that converts its input to bfloat16 (a model trained in bf16)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x.to(torch.bfloat16)).mean((2, 3)))


def test_a_forward_that_changes_the_dtype_is_named_as_such():
    """Export runs a model in float32: a forward casting to bf16 then fails on its own
    weights, and the refusal says so instead of blaming the input shape."""
    model = CastingNet()
    check_input_shape(model.to(torch.bfloat16), (1, 3, 8, 8))  # runs in its own dtype
    with pytest.raises(BadInput, match=r"does not run with float32 inputs and parameters "
                                       r"\(Input type .*its forward converts a tensor"):
        check_export_model(model.float(), (1, 3, 8, 8))
