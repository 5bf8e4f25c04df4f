"""Layers whose weight the model's code reads outside their forward stay as they are
(``core.foreign_reads``): timm's EdgeNeXt reads ``token_projection.weight.device`` before
calling it, which a replacement block has no answer to (an internal error before this)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bscompress.analysis.analyze import inspect_model
from bscompress.compress.decomposition import Budget, decompose
from bscompress.core.foreign_reads import watch_reads
from bscompress.core.surgery import Eligibility
from bscompress.methods import RankOptions

SHAPE = (1, 8, 10, 10)
ANY = Eligibility(min_in_channels=1)


class Encoding(nn.Module):
    """Reads its projection's weight for the device and dtype, then calls it (EdgeNeXt's
    ``PositionalEncodingFourier``)."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        device = self.projection.weight.device
        return self.projection(x.to(device))


class Reader(nn.Module):
    """``encoding`` (reads, then calls), ``direct`` (convolved with by the parent: never
    called), ``plain`` and a conv that reads its own weight in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoding = Encoding()
        self.direct = nn.Conv2d(8, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)
        self.own = OwnReader(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.encoding(x))
        x = torch.relu(F.conv2d(x, self.direct.weight, self.direct.bias, padding=1))
        return self.own(torch.relu(self.plain(x)))


class OwnReader(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight * 1.0, self.bias, padding=self.padding)


def _net() -> Reader:
    torch.manual_seed(0)
    return Reader().eval()


def test_reads_from_outside_a_layer_are_seen_with_where_they_were_made():
    model = _net()
    with watch_reads(model) as reads:
        model(torch.randn(SHAPE))
    assert set(reads) == {"encoding.projection", "direct"}
    assert reads["encoding.projection"].startswith("weight (test_foreign_reads.py:")
    assert reads["direct"].startswith("weight (")
    # the classes are the model's own again, and nothing is watched any more
    assert type(model.plain) is nn.Conv2d and type(model.own) is OwnReader
    assert not model.plain._forward_pre_hooks and not model.plain._forward_hooks
    with watch_reads(model) as reads:
        pass
    model(torch.randn(SHAPE))
    assert reads == {}


def test_the_classes_are_restored_when_the_forward_fails():
    model = _net()
    with pytest.raises(RuntimeError), watch_reads(model):
        model(torch.randn(1, 3, 10, 10))  # wrong channels
    assert type(model.encoding.projection) is nn.Conv2d


@pytest.mark.parametrize("method", ["tucker2", "bsconv-u", "cp"])
def test_layers_read_from_outside_stay_dense(method):
    """The oracle: the original network; at full Tucker-2 rank the output is kept."""
    model = _net()
    original = copy.deepcopy(model)
    compressed, plan = decompose(model, method, SHAPE,
                                 RankOptions(tucker_ranks=1.0, allow_growth=True), ANY)
    entries = {e.name: e for e in plan.layers}
    for name in ("encoding.projection", "direct"):
        assert entries[name].method is None
        assert "the model reads its weight (test_foreign_reads.py:" in entries[name].skip_reason
    assert {e.name for e in plan.replaced()} == {"plain", "own"}
    x = torch.randn(2, *SHAPE[1:])
    out = compressed(x)  # runs: the read layer is still a conv
    if method == "tucker2":
        torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)


def test_a_budget_with_calibration_leaves_them_out():
    model = _net()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, *SHAPE[1:], generator=gen) for _ in range(2)]
    compressed, plan = decompose(model, "auto", SHAPE, RankOptions(), ANY,
                                 budget=Budget("macs", 0.7), calibration=batches)
    assert {"encoding.projection", "direct"}.isdisjoint(e.name for e in plan.replaced())
    compressed(batches[0])


def test_inspect_names_the_read():
    report = inspect_model(_net(), list(SHAPE), ANY, analyse=False)
    rows = {row.name: row for row in report.layers}
    assert "the model reads its weight" in rows["encoding.projection"].skip_reason
    assert rows["plain"].eligible and rows["own"].eligible


def test_upcycle_leaves_them_out():
    from bscompress.transforms.upcycle import UpcycleOptions, upcycle

    model = _net()
    original = copy.deepcopy(model)
    up, plan = upcycle(model, SHAPE, UpcycleOptions(experts=2, include=("*",)))
    reasons = {e.name: e.skip_reason for e in plan.layers}
    assert {e.name for e in plan.replaced()} == {"plain", "own"}
    assert "the model reads its weight" in reasons["encoding.projection"]
    assert "the model reads its weight" in reasons["direct"]
    x = torch.randn(2, *SHAPE[1:])
    torch.testing.assert_close(up(x), original(x), rtol=1e-4, atol=1e-5)  # experts start equal


class DepthwiseReader(nn.Module):
    """Two depthwise convs with Sobel kernels; the first is read from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.read = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.free = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        with torch.no_grad():
            self.read.weight.copy_(sobel.expand(4, 1, 3, 3))
            self.free.weight.copy_(sobel.expand(4, 1, 3, 3))

    def forward(self, x):
        return self.free(self.read(x.to(self.read.weight.dtype)))


def test_fixed_kernels_leave_them_out():
    from bscompress.layers.fixed import FixedKernelConv
    from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

    model = DepthwiseReader().eval()
    original = copy.deepcopy(model)
    fixed, plan = fix_kernels(model, None, (1, 4, 9, 9), FixedKernelOptions("bank", 0.999))
    assert isinstance(fixed.free, FixedKernelConv) and type(fixed.read) is nn.Conv2d
    assert "the model reads its weight" in {e.name: e for e in plan.layers}["read"].skip_reason
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fixed(x), original(x))


class _Demanding(nn.Conv2d):
    """A conv class whose subclasses must name a registry key (as some libraries ask)."""

    def __init_subclass__(cls, key: str, **kwargs) -> None:
        super().__init_subclass__(**kwargs)


def test_a_class_that_cannot_be_subclassed_is_left_unwatched():
    model = nn.Sequential(_Demanding(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    with watch_reads(model) as reads:
        model(torch.randn(1, 3, 8, 8))
        _ = model[0].weight, model[1].weight  # read from outside: only the second is seen
    assert list(reads) == ["1"] and type(model[0]) is _Demanding
