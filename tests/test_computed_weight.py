"""Convs whose forward computes the weight it convolves with (weight standardisation, as timm's
``StdConv2d`` / ``ScaledStdConv2d`` / ``StdConv2dSame`` of BiT and NFNet): factorized from that
weight, the layers left dense kept as they are, archives rebuilt from the architecture.

Oracles: the weight standardised here by its formula (not by capturing a forward), the original
module's output (full rank), an ``nn.Conv2d`` holding a block's ``to_dense()`` after the
padding (any rank), and ‖W − Ŵ‖²/‖W‖² of that standardised W.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bscompress.analysis.analyze import inspect_model
from bscompress.compress.decomposition import Budget, decompose
from bscompress.compress.reconstruct import ReconstructionOptions
from bscompress.core.computed_weight import stand_in, standing_in
from bscompress.core.padding import PaddedConv2d, input_padding
from bscompress.core.plan import Plan
from bscompress.core.surgery import Eligibility, apply_plan, eligibility
from bscompress.layers.condconv import CondConv2d
from bscompress.methods import RankOptions
from bscompress.transforms.upcycle import UpcycleOptions, upcycle

# ----------------------------------------------------------------- the subclasses (timm 1.0)


class StdConv2d(nn.Conv2d):
    """timm/layers/std_conv.py ``StdConv2d``: weight standardisation through ``batch_norm``."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNet): a learnt gain and a fan-in scale, a bias."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.0))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class StdConv2dSame(StdConv2d):
    """timm's ``StdConv2dSame``: TensorFlow's "same" padding, then the standardised conv."""

    def forward(self, x):
        pads = []
        for n, k, s, d in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride,
                                            self.dilation, strict=True))):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class ConvReLU2d(nn.Conv2d):
    """A conv with an activation in its forward: not one conv of any weight."""

    def forward(self, x):
        return F.relu(super().forward(x))


class InputScaledConv2d(nn.Conv2d):
    """A weight that depends on the input: no fixed weight explains it."""

    def forward(self, x):
        return F.conv2d(x, self.weight * x.mean(), self.bias, self.stride, self.padding)


class TwiceConv2d(nn.Conv2d):
    """Two conv calls in one forward."""

    def forward(self, x):
        return super().forward(x) + F.conv2d(x, self.weight, None, self.stride, self.padding)


def standardised(conv: nn.Module) -> torch.Tensor:
    """The oracle: W − mean, over the biased std (+ eps), times the gain, per output channel."""
    w = conv.weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    out = (flat - mean) / torch.sqrt(var + conv.eps)
    if hasattr(conv, "gain"):
        out = out * (conv.gain.detach().double().reshape(-1, 1) * conv.scale)
    return out.reshape(w.shape)


class Block(nn.Module):
    """A BiT-style pre-activation bottleneck of standardised convs."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c), StdConv2d(c, c // 2, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c // 2)
        self.conv2 = StdConv2d(c // 2, c // 2, 3, padding=1, bias=False)
        self.norm3, self.conv3 = nn.BatchNorm2d(c // 2), StdConv2d(c // 2, c, 1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return x + self.conv3(F.relu(self.norm3(y)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv2dSame(3, 16, 3, stride=2)
        self.scaled = ScaledStdConv2d(16, 16, 3, padding=1)
        self.block = Block(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(F.relu(self.scaled(F.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


ANY = Eligibility(min_in_channels=1)
SHAPE = (1, 3, 15, 13)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():  # the gains and BatchNorms away from their initial values
        model.scaled.gain.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def rebuilt(original: nn.Module, compressed: nn.Module, plan: Plan) -> nn.Module:
    """What loading an archive does: the original architecture, the plan after a JSON round
    trip applied structurally, the weights loaded strictly."""
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    model = apply_plan(copy.deepcopy(original), again)
    model.load_state_dict(compressed.state_dict())
    return model.eval()


# ------------------------------------------------------------------------------ the stand-ins


@pytest.mark.parametrize(("make", "cls", "padding"), [
    (lambda: StdConv2d(4, 6, 3, padding=1), nn.Conv2d, (1, 1)),
    (lambda: ScaledStdConv2d(4, 6, 3, stride=2, gamma=1.7), nn.Conv2d, (0, 0)),
    (lambda: StdConv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.Conv2d, (1, 1)),
    (lambda: StdConv2dSame(4, 6, 3, stride=2), PaddedConv2d, (0, 0)),
    (lambda: StdConv2dSame(4, 6, 5, stride=1), nn.Conv2d, (2, 2)),  # "same" at stride 1
], ids=["std", "scaled-s2", "reflect", "same-s2", "same-s1"])
def test_a_stand_in_holds_the_standardised_weight_and_computes_the_same(make, cls, padding):
    torch.manual_seed(0)
    conv = make().eval()
    with torch.no_grad():
        if hasattr(conv, "gain"):
            conv.gain.uniform_(0.5, 1.5)
    assert input_padding(conv).kind == "refused"  # its own weight does not explain it
    plain = stand_in(conv)
    assert type(plain) is cls and tuple(plain.padding) == padding
    torch.testing.assert_close(plain.weight.double(), standardised(conv), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in plain.parameters())
    for size in [(13, 11), (16, 9)]:
        x = torch.randn(2, 4, *size)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: ConvReLU2d(4, 6, 3), lambda: InputScaledConv2d(4, 6, 3),
                                  lambda: TwiceConv2d(4, 6, 3, padding=1)],
                         ids=["activation", "input-dependent", "two-convs"])
def test_forwards_that_are_not_one_conv_of_a_fixed_weight_get_no_stand_in(make):
    torch.manual_seed(0)
    conv = make()
    assert stand_in(conv) is None
    model = nn.Sequential(conv)
    assert "overrides forward in a way bscompress cannot reproduce" in eligibility(
        model, Eligibility(min_in_channels=1, classifier=True))["0"]


def test_standing_in_swaps_back_what_stays_and_shares_one_stand_in_per_module():
    torch.manual_seed(0)
    shared = StdConv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Conv2d(4, 4, 1))
    with standing_in(model) as swapped:
        assert [name for name, _, _ in swapped] == ["0", "2"]
        assert type(model[0]) is nn.Conv2d and model[0] is model[2]
        model[2] = nn.Identity()  # a rewrite: stays
    assert model[0] is shared and isinstance(model[2], nn.Identity)
    with pytest.raises(RuntimeError), standing_in(model):
        raise RuntimeError("a failure inside")
    assert model[0] is shared


# ------------------------------------------------------------------------ decompose and reload


@pytest.mark.parametrize("method", ["tucker2", "bsconv-u", "dsc"])
def test_full_rank_blocks_of_standardised_convs_reproduce_the_network(method):
    original = net()
    compressed, plan = decompose(copy.deepcopy(original), method, SHAPE,
                                 RankOptions(rank=99, tucker_ranks=1.0, allow_growth=True), ANY)
    entries = {e.name: e for e in plan.layers}
    assert {n for n, e in entries.items() if e.method} == {"stem", "scaled", "block.conv2"}
    assert entries["stem"].module_type == "StdConv2dSame" and entries["stem"].options["pad"] == \
        "same"
    assert entries["scaled"].module_type == "ScaledStdConv2d"
    # the 1×1 convs stay: as they were, standardisation and stored weight
    for name in ("conv1", "conv3"):
        layer = getattr(compressed.block, name)
        assert type(layer) is StdConv2d
        assert torch.equal(layer.weight, getattr(original.block, name).weight)
    x = torch.randn(3, 3, 15, 13)
    assert rel(compressed(x), original(x)) < 1e-5
    assert torch.equal(rebuilt(original, compressed, plan)(x), compressed(x))


def test_a_truncated_block_is_the_truncation_of_the_standardised_weight():
    """Tucker-2 at half the channels of ``scaled``: its dense kernel, convolved, is the layer
    (the independent oracle), and the plan's error is ‖W − Ŵ‖²/‖W‖² of the standardised W."""
    original = net()
    compressed, plan = decompose(copy.deepcopy(original), "tucker2", SHAPE,
                                 RankOptions(tucker_ranks=0.5), ANY)
    block = compressed.scaled
    dense = block.to_dense().detach().double()
    w = standardised(original.scaled)
    entry = {e.name: e for e in plan.layers}["scaled"]
    assert entry.predicted_error == pytest.approx(float((w - dense).square().sum()
                                                         / w.square().sum()), rel=1e-4)
    assert 0.01 < entry.predicted_error < 0.9
    oracle = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        oracle.weight.copy_(dense)
        oracle.bias.copy_(original.scaled.bias)
        x = torch.randn(2, 16, 9, 7)
        torch.testing.assert_close(block(x), oracle(x), rtol=1e-4, atol=1e-5)


def test_calibrated_sequential_auto_with_reconstruction_keeps_the_dense_layers_frozen():
    original = net()
    calibration = [torch.randn(16, 3, 15, 13) for _ in range(3)]
    model = copy.deepcopy(original)
    compressed, plan = decompose(
        model, "auto", SHAPE, RankOptions(allow_growth=True), ANY, budget=Budget("macs", 0.6),
        calibration=calibration, sequential=True,
        reconstruction=ReconstructionOptions(steps=5))
    assert plan.replaced() and plan.summary.reconstruction is not None
    for name in ("conv1", "conv3"):  # dense, inside a reconstructed block: not trained
        layer = getattr(compressed.block, name)
        if {e.name: e for e in plan.layers}[f"block.{name}"].method is None:
            assert type(layer) is StdConv2d
            assert torch.equal(layer.weight, getattr(original.block, name).weight)
    x = calibration[0][:4]
    assert torch.equal(rebuilt(original, compressed, plan)(x), compressed(x))
    assert rel(compressed(x), original(x)) < 0.5


# ------------------------------------------------------------------------ inspect and upcycle


def test_inspect_judges_standardised_convs_on_their_computed_weight():
    model = net()
    report = inspect_model(model, list(SHAPE), ANY)
    rows = {row.name: row for row in report.layers}
    assert rows["scaled"].eligible and rows["scaled"].module_type == "ScaledStdConv2d"
    assert rows["stem"].padding == "same" and rows["stem"].module_type == "StdConv2dSame"
    assert type(model.scaled) is ScaledStdConv2d  # swapped back


def test_upcycled_standardised_convs_keep_the_output():
    original = net()
    up, plan = upcycle(copy.deepcopy(original), SHAPE,
                       UpcycleOptions(experts=3, include=("scaled", "block.conv2")))
    assert isinstance(up.scaled, CondConv2d) and isinstance(up.block.conv2, CondConv2d)
    assert type(up.stem) is StdConv2dSame
    x = torch.randn(2, 3, 15, 13)
    assert rel(up(x), original(x)) < 1e-5
    assert torch.equal(rebuilt(original, up, plan)(x), up(x))


def test_timm_standardised_convs_when_installed():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(layers.StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          layers.ScaledStdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          layers.StdConv2dSame(8, 8, 3, stride=2)).eval()
    original = copy.deepcopy(model)
    compressed, plan = decompose(model, "tucker2", (1, 8, 11, 11),
                                 RankOptions(tucker_ranks=1.0, allow_growth=True), ANY)
    assert len(plan.replaced()) == 3
    x = torch.randn(2, 8, 11, 9)
    assert rel(compressed(x), original(x)) < 1e-5


def test_fixed_kernels_replace_standardised_depthwise_kernels_by_their_bank_members():
    """Zero-mean bank members (Sobel, Laplacian) stay themselves, scaled, under weight
    standardisation: the depthwise conv's computed kernels are matched and fixed, exactly."""
    from bscompress.factorize.kernel_bank import kernel_bank
    from bscompress.layers.fixed import FixedKernelConv
    from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

    names, bank = kernel_bank((3, 3))
    zero_mean = [i for i, name in enumerate(names) if name.startswith(("sobel", "laplacian"))]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StdConv2d(4, 4, 3, padding=1, groups=4)).eval()
    with torch.no_grad():
        for c in range(4):
            model[1].weight[c, 0] = (c + 0.5) * bank[zero_mean[c]] + 0.3  # any mean, any scale
    original = copy.deepcopy(model)
    fixed, plan = fix_kernels(model, None, (1, 3, 11, 9), FixedKernelOptions("bank", 0.999))
    assert isinstance(fixed[1], FixedKernelConv) and plan.summary.fixed_kernels.kernels == 4
    assert {e.name: e for e in plan.layers}["1"].module_type == "StdConv2d"
    x = torch.randn(2, 3, 11, 9)
    assert rel(fixed(x), original(x)) < 1e-5
    assert torch.equal(rebuilt(original, fixed, plan)(x), fixed(x))
