"""Conv subclasses that change ``forward`` (issue 19, item 3): TF-style "same" padding, static
(a ``ZeroPad2d`` before the conv, as ports of TF EfficientNets) and dynamic (computed from the
input size, as timm's ``Conv2dSame``), rewritten by every transform with their padding kept,
or refused with a reason.

Oracles: the original subclass module's output (full rank), the original subclass module
holding the block's ``to_dense()`` weight (any rank), and the padding rule computed here.
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
from bscompress.core.errors import BadInput
from bscompress.core.padding import SAME, input_padding, same_pad
from bscompress.core.plan import Plan
from bscompress.core.surgery import Eligibility, apply_plan, eligibility
from bscompress.factorize.kernel_bank import kernel_bank
from bscompress.layers.condconv import CondConv2d
from bscompress.layers.fixed import FixedKernelConv
from bscompress.methods import RankOptions
from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels
from bscompress.transforms.upcycle import UpcycleOptions, upcycle

# --------------------------------------------------------------------------- the subclasses


def _get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    # timm/layers/padding.py (timm 0.9–1.0), ``get_same_padding``, int branch
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def _pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
    # timm/layers/padding.py, ``pad_same``
    ih, iw = x.size()[-2:]
    pad_h = _get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = _get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                 value=value)


class Conv2dSame(nn.Conv2d):
    """timm/layers/conv2d_same.py ``Conv2dSame`` (with ``conv2d_same``): TensorFlow-like
    'SAME' padding computed from the input size in forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups,
                         bias)

    def forward(self, x):
        x = _pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation,
                        self.groups)


class Conv2dStaticSamePadding(nn.Conv2d):
    """efficientnet_pytorch/utils.py ``Conv2dStaticSamePadding`` (lukemelas/EfficientNet-
    PyTorch): the 'SAME' padding of a given image size, held as ``nn.ZeroPad2d``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None,
                 **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        assert image_size is not None
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2,
                                                pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return x


class Conv1dSame(nn.Conv1d):
    """timm's ``Conv2dSame`` in one dimension."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1,
                 bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups,
                         bias)

    def forward(self, x):
        total = _get_same_padding(x.shape[-1], self.kernel_size[0], self.stride[0],
                                  self.dilation[0])
        x = F.pad(x, (total // 2, total - total // 2))
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv1dStaticPad(nn.Conv1d):
    """A fixed asymmetric ``ConstantPad1d`` before a Conv1d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad=(1, 2)):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.static_padding = nn.ConstantPad1d(pad, 0.0)

    def forward(self, x):
        return super().forward(self.static_padding(x))


class PadThenConv2d(nn.Conv2d):
    """A fixed ``ZeroPad2d`` before a Conv2d (any kernel, 1×1 included)."""

    def __init__(self, in_channels, out_channels, kernel_size, pad=(0, 1, 1, 0), **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.pad = nn.ZeroPad2d(pad)

    def forward(self, x):
        return super().forward(self.pad(x))


class LoggedConv2d(nn.Conv2d):
    """Overrides forward without changing what it computes."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (as timm's ``StdConv2d``): not a plain conv."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ActConv2d(nn.Conv2d):
    """An activation after the conv in its forward: no conv of any weight computes it (a
    weight-standardised conv is stood in for: tests/test_computed_weight.py)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class ClipConv2d(nn.Conv2d):
    """Clips its input before the conv (PACT-style activation clipping at 6): no conv of
    unit-variance inputs shows it."""

    def forward(self, x):
        return super().forward(x.clamp(max=6.0))


class OddPadConv2d(nn.Conv2d):
    """Pads by an amount that depends on the input size, not as TF's 'same' does."""

    def forward(self, x):
        extra = x.shape[-1] % 3
        x = F.pad(x, (extra, 1, 1, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


REFUSED = "overrides forward in a way bscompress cannot reproduce"

# --------------------------------------------------------------------------- helpers

M, N = 6, 8  # in, out channels (different, to catch transposes)

#: style → (conv factory, the options["pad"] its plan entry records)
STYLES = {
    "static": (lambda: Conv2dStaticSamePadding(M, N, 3, stride=2, image_size=16), [0, 1, 0, 1]),
    "static-sym": (lambda: Conv2dStaticSamePadding(M, N, 5, stride=1, image_size=15),
                   [2, 2, 2, 2]),
    "dynamic": (lambda: Conv2dSame(M, N, 3, stride=2), SAME),
    "dynamic-rect": (lambda: Conv2dSame(M, N, (3, 5), stride=(2, 1), dilation=(1, 2)), SAME),
    "static-1d": (lambda: Conv1dStaticPad(M, N, 3, stride=2), [1, 2]),
    "dynamic-1d": (lambda: Conv1dSame(M, N, 5, stride=2), SAME),
}
METHODS = ("bsconv-u", "bsconv-s", "dsc", "tucker2", "cp", "cp4")
CP_RANK = 2


def make(style: str, method: str = "", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = STYLES[style][0]()
    if method in ("cp", "cp4"):  # a weight of exact CP rank, so that CP at that rank is exact
        g = torch.Generator().manual_seed(seed)
        kernel = conv.kernel_size
        a, b = torch.randn(CP_RANK, N, generator=g), torch.randn(CP_RANK, M, generator=g)
        factors = [torch.randn(CP_RANK, k, generator=g) for k in kernel]
        spatial = factors[0] if len(factors) == 1 else torch.einsum("ri,rj->rij", *factors)
        weight = torch.einsum("rn,rm,r...->nm...", a, b, spatial)
        with torch.no_grad():
            conv.weight.copy_(weight)
    return conv


def inputs(conv: nn.Module, channels: int = M) -> list[torch.Tensor]:
    """Two batches of different, odd and even, sizes (the dynamic padding differs)."""
    g = torch.Generator().manual_seed(1)
    sizes = [(13, 11), (16, 9)] if isinstance(conv, nn.Conv2d) else [(17,), (16,)]
    return [torch.randn(2, channels, *s, generator=g) for s in sizes]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).detach().norm() / b.detach().norm())


def holding(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The original subclass module with another weight (the oracle of a block)."""
    oracle = copy.deepcopy(conv)
    with torch.no_grad():
        oracle.weight.copy_(weight.reshape(oracle.weight.shape))
    return oracle


def rebuilt(original: nn.Module, compressed: nn.Module, plan: Plan) -> nn.Module:
    """What loading an archive does: the original architecture, the plan applied
    structurally (after a JSON round trip), then the weights loaded strictly."""
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    model = apply_plan(copy.deepcopy(original), again)
    model.load_state_dict(compressed.state_dict())
    return model


def input_shape(conv: nn.Module, channels: int = M) -> tuple[int, ...]:
    return (1, channels, 13, 11) if isinstance(conv, nn.Conv2d) else (1, channels, 17)


ANY = Eligibility(min_in_channels=1, classifier=True)  # single-layer models: the layer is last
#: float32 rounding (the tests run in float32: float64 depthwise convs of some odd sizes take
#: CPU PyTorch a second each)
EXACT = 1e-5

# --------------------------------------------------------------------------- the probe


@pytest.mark.parametrize(("make_conv", "kind", "pad"), [
    (lambda: Conv2dSame(4, 6, 3, stride=2), "same", None),
    (lambda: Conv2dSame(4, 6, 4, stride=3), "same", None),
    (lambda: Conv2dSame(4, 6, 3, stride=1), "static", (1, 1, 1, 1)),  # does not vary
    (lambda: Conv2dSame(4, 6, 1, stride=2), "plain", None),  # pads nothing
    (lambda: Conv2dStaticSamePadding(4, 6, 3, stride=2, image_size=224), "static", (0, 1, 0, 1)),
    (lambda: Conv2dStaticSamePadding(4, 6, 1, image_size=224), "plain", None),
    (lambda: Conv2dStaticSamePadding(4, 6, 5, stride=2, image_size=17, groups=2), "static",
     (2, 2, 2, 2)),
    (lambda: Conv1dSame(4, 6, 5, stride=2, dilation=2), "same", None),
    (lambda: Conv1dStaticPad(4, 6, 3, stride=2), "static", (1, 2)),
    (lambda: LoggedConv2d(4, 6, 3, padding=1, padding_mode="reflect"), "plain", None),
    (lambda: nn.Conv2d(4, 6, 3), "plain", None),
    (lambda: StdConv2d(4, 6, 3), "refused", None),
    (lambda: OddPadConv2d(4, 6, 3), "refused", None),
], ids=["same-s2", "same-k4s3", "same-s1", "same-1x1", "static-224", "static-1x1",
        "static-k5-g2", "same-1d", "static-1d", "logged", "conv2d", "std", "oddpad"])
def test_the_probe_tells_how_a_conv_pads(make_conv, kind, pad):
    torch.manual_seed(0)
    conv = make_conv()
    found = input_padding(conv)
    assert (found.kind, found.pad) == (kind, pad)
    if kind == "refused":
        assert found.reason.startswith(f"{type(conv).__name__} {REFUSED}")
    else:
        assert found.reason is None


def test_same_pad_is_timms_rule():
    for n in range(5, 20):
        for k, s, d in [(3, 2, 1), (5, 2, 1), (3, 1, 2), (4, 3, 1), (1, 2, 1)]:
            total = _get_same_padding(n, k, s, d)
            assert same_pad([n], [k], [s], [d]) == [total // 2, total - total // 2]


# --------------------------------------------------------------------------- decompose


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", list(STYLES))
def test_full_rank_decomposition_reproduces_the_subclass(style, method):
    conv = make(style, method)
    if method == "cp4" and isinstance(conv, nn.Conv1d):
        _, plan = decompose(nn.Sequential(conv), method, input_shape(conv),
                            RankOptions(rank=CP_RANK, allow_growth=True), ANY)
        assert "cp4 needs a 2-D kernel" in plan.layers[0].skip_reason
        return
    original = nn.Sequential(conv)
    model = copy.deepcopy(original)
    rank = CP_RANK if method in ("cp", "cp4") else 99
    compressed, plan = decompose(model, method, input_shape(conv),
                                 RankOptions(rank=rank, p=1.0, allow_growth=True, cp_iters=15),
                                 ANY)
    (entry,) = plan.layers
    assert entry.method == method and entry.options["pad"] == STYLES[style][1]
    block = compressed[0]
    again = rebuilt(original, compressed, plan)
    exact = 1e-4 if method in ("cp", "cp4") else EXACT  # CP: ALS on an exact CP tensor
    for x in inputs(conv):
        y = block(x)
        assert rel(y, conv(x)) < exact
        assert rel(y, holding(conv, block.to_dense())(x)) < EXACT
        assert torch.equal(again(x), compressed(x))


@pytest.mark.parametrize("method", ["bsconv-u", "dsc", "tucker2", "cp4"])
def test_reduced_rank_blocks_keep_the_padding(method):
    """Below full rank the block is the original subclass holding its dense weight."""
    conv = make("dynamic-rect")
    compressed, plan = decompose(nn.Sequential(copy.deepcopy(conv)), method, input_shape(conv),
                                 RankOptions(rank=1, tucker_ranks=0.5, cp_rank=0.5,
                                             allow_growth=True, cp_iters=5), ANY)
    block = compressed[0]
    for x in inputs(conv):
        y = block(x)
        assert rel(y, holding(conv, block.to_dense())(x)) < EXACT
        assert rel(y, conv(x)) > 1e-3  # truncated: not the original


def test_a_budget_allocates_over_padded_subclasses():
    torch.manual_seed(0)
    original = nn.Sequential(Conv2dSame(8, 16, 3, stride=2), nn.ReLU(),
                             Conv2dStaticSamePadding(16, 16, 3, stride=2, image_size=8))
    compressed, plan = decompose(copy.deepcopy(original), "auto", (1, 8, 17, 15),
                                 eligibility=ANY, budget=Budget("macs", 0.3))
    pads = {e.name: e.options.get("pad") for e in plan.replaced()}
    assert pads == {"0": SAME, "2": [0, 1, 0, 1]}, plan.layers
    again = rebuilt(original, compressed, plan)
    for size in [(17, 15), (16, 14)]:
        x = torch.randn(2, 8, *size)
        y = compressed(x)
        assert y.shape == original(x).shape and torch.equal(again(x), y)


@pytest.mark.parametrize("pad", [[1, -1, 0, 0], [1, 1], "valid", [True, 0, 0, 0]])
def test_an_altered_pad_in_a_plan_is_refused(pad):
    conv = make("dynamic")
    original = nn.Sequential(conv)
    _, plan = decompose(copy.deepcopy(original), "dsc", input_shape(conv),
                        RankOptions(rank=1, allow_growth=True), ANY)
    plan.layers[0].options["pad"] = pad
    with pytest.raises(BadInput, match="cannot be built .*input padding"):
        apply_plan(copy.deepcopy(original), plan)


@pytest.mark.parametrize(("conv", "pad"), [
    (lambda: PadThenConv2d(M, N, 1, pad=(0, 1, 1, 0)), [0, 1, 1, 0]),
    (lambda: Conv2dSame(M, N, 1, stride=2), None),
    (lambda: Conv2dStaticSamePadding(M, N, 1, stride=2, image_size=15), None),
], ids=["padded-1x1", "same-1x1", "static-1x1"])
def test_svd_of_1x1_subclasses_is_exact_at_full_rank(conv, pad):
    torch.manual_seed(0)
    conv = conv()
    original = nn.Sequential(conv)
    compressed, plan = decompose(copy.deepcopy(original), "svd", input_shape(conv),
                                 RankOptions(rank=99, allow_growth=True), ANY)
    (entry,) = plan.layers
    assert entry.method == "svd" and entry.options.get("pad") == pad
    again = rebuilt(original, compressed, plan)
    for x in inputs(conv):
        assert rel(compressed[0](x), conv(x)) < EXACT
        assert torch.equal(again(x), compressed(x))


def test_refused_subclasses_are_named_with_the_reason_and_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(ActConv2d(M, N, 3, padding=1), OddPadConv2d(N, N, 3),
                          LoggedConv2d(N, N, 3, padding=1), ActConv2d(N, N, 1))
    reasons = eligibility(model, ANY)
    assert reasons["0"] == f"ActConv2d {REFUSED} (not a plain or 'same'-padded convolution)"
    assert reasons["1"].startswith(f"OddPadConv2d {REFUSED}") and "TensorFlow" in reasons["1"]
    assert reasons["2"] is None  # forward overridden, but a plain conv
    original = copy.deepcopy(model)
    compressed, plan = decompose(model, "bsconv-u", (1, M, 12, 12),
                                 RankOptions(rank=1, allow_growth=True), ANY)
    entries = {e.name: e for e in plan.layers}
    assert REFUSED in entries["0"].skip_reason and REFUSED in entries["1"].skip_reason
    assert entries["2"].method == "bsconv-u"
    assert type(compressed[0]) is ActConv2d and type(compressed[1]) is OddPadConv2d
    _, svd_plan = decompose(copy.deepcopy(original), "svd", (1, M, 12, 12),
                            RankOptions(rank=1, allow_growth=True), ANY)
    assert REFUSED in {e.name: e for e in svd_plan.layers}["3"].skip_reason


def test_data_aware_decomposition_of_padded_subclasses_runs():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(M, N, 3, stride=2), nn.ReLU(),
                          Conv2dStaticSamePadding(N, N, 3, stride=2, image_size=8))
    original = copy.deepcopy(model)
    calibration = [torch.randn(16, M, 13, 11) for _ in range(2)]
    compressed, plan = decompose(model, "dsc", (1, M, 13, 11),
                                 RankOptions(rank=99, allow_growth=True), ANY,
                                 calibration=calibration)
    assert [e.method for e in plan.replaced()] == ["dsc", "dsc"]
    x = inputs(original[0])[0]
    assert rel(compressed(x), original(x)) < 1e-3


@pytest.mark.parametrize("make", [lambda: Conv2dSame(M, N, 3, stride=2),
                                  lambda: Conv2dStaticSamePadding(M, N, 3, stride=2,
                                                                  image_size=13)])
def test_calibration_patches_see_the_subclass_padding(make):
    """The patches Σ is built from are the ones the subclass convolves: W·p gives its output
    at every position (the border ones included)."""
    from bscompress.compress.calibrate import patches
    from bscompress.core.padding import input_padding

    torch.manual_seed(0)
    conv = make().eval()
    x = torch.randn(2, M, 13, 13)
    p = patches(conv, x, input_padding(conv).spec)[0]  # [B·L, M·K]
    y = p @ conv.weight.reshape(N, -1).T + conv.bias
    with torch.no_grad():
        expected = conv(x).permute(0, 2, 3, 1).reshape(-1, N)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_subclasses_with_their_padding_or_reason():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(M, N, 3, stride=2), Conv2dStaticSamePadding(
        N, N, 3, stride=2, image_size=8), Conv2dSame(N, N, 3, groups=N, stride=2),
        ActConv2d(N, N, 3, padding=1), LoggedConv2d(N, N, 3, padding=1))
    report = inspect_model(model, [1, M, 17, 15], ANY)
    rows = {row.name: row for row in report.layers}
    assert len(rows) == 5
    assert rows["0"].eligible and rows["0"].padding == SAME and rows["0"].blueprint_rank1
    assert rows["1"].eligible and rows["1"].padding == [0, 1, 0, 1]
    assert rows["2"].padding == SAME and rows["2"].skip_reason.startswith("depthwise")
    assert rows["3"].skip_reason.startswith(f"ActConv2d {REFUSED}")
    assert rows["3"].padding is None and rows["3"].module_type == "ActConv2d"
    assert rows["4"].eligible and rows["4"].padding is None
    json.dumps(report.to_dict())


# --------------------------------------------------------------------------- fixed kernels


class DepthwiseNet(nn.Module):
    """Depthwise convs that are subclasses: dynamic 'same', static 'same', a refused one."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.pw = nn.Conv2d(3, c, 1)
        self.dw_same = Conv2dSame(c, c, 3, stride=2, groups=c)
        self.dw_static = Conv2dStaticSamePadding(c, c, 3, stride=2, groups=c, image_size=8)
        self.dw_std = ActConv2d(c, c, 3, groups=c, padding=1)

    def forward(self, x):
        return self.dw_std(self.dw_static(self.dw_same(self.pw(x))))


def _plant_bank_kernels(conv: nn.Module, offset: int = 0) -> None:
    names, bank = kernel_bank((3, 3))
    with torch.no_grad():
        for c in range(conv.out_channels):
            conv.weight[c, 0] = (0.5 + c) * bank[(c + offset) % len(names)]


def test_fixed_kernels_examine_depthwise_subclasses_and_keep_their_padding():
    torch.manual_seed(0)
    model = DepthwiseNet()
    _plant_bank_kernels(model.dw_same)
    _plant_bank_kernels(model.dw_static, offset=3)
    original = copy.deepcopy(model)
    shape = (1, 3, 17, 15)
    fixed, plan = fix_kernels(model, None, shape, FixedKernelOptions("bank", 0.9))
    counts = plan.summary.fixed_kernels
    assert counts.kernels == 8 and counts.layers == 2 and counts.refused == 1
    entries = {e.name: e for e in plan.layers}
    assert entries["dw_same"].options["pad"] == SAME
    assert entries["dw_static"].options["pad"] == [0, 1, 0, 1]
    assert entries["dw_std"].method is None and REFUSED in entries["dw_std"].skip_reason
    assert isinstance(fixed.dw_same, FixedKernelConv) and type(fixed.dw_std) is ActConv2d
    again = rebuilt(original, fixed, plan)
    for size in [(17, 15), (16, 16)]:
        x = torch.randn(2, 3, *size)
        assert rel(fixed(x), original(x)) < EXACT  # the planted kernels are bank members
        assert torch.equal(again(x), fixed(x))


def test_fixed_kernels_inside_blocks_of_padded_subclasses():
    conv = make("dynamic")
    original = nn.Sequential(conv)
    compressed, plan = decompose(copy.deepcopy(original), "dsc", input_shape(conv),
                                 RankOptions(rank=1, allow_growth=True), ANY)
    fixed, plan = fix_kernels(compressed, plan, input_shape(conv),
                              FixedKernelOptions("bank", 1e-6))
    assert plan.summary.fixed_kernels.kernels == M
    stage = fixed[0].dw
    assert isinstance(stage, FixedKernelConv) and stage.bscompress_pad == SAME
    again = rebuilt(original, fixed, plan)
    for x in inputs(conv):
        y = fixed(x)
        assert rel(y, holding(conv, fixed[0].to_dense())(x)) < EXACT
        assert torch.equal(again(x), y)


# --------------------------------------------------------------------------- upcycle


def test_upcycling_subclasses_keeps_the_output_and_refuses_with_a_reason():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(M, N, 3, stride=2), nn.ReLU(),
                          Conv2dStaticSamePadding(N, N, 3, stride=2, image_size=8),
                          ActConv2d(N, N, 1))
    original = copy.deepcopy(model)
    up, plan = upcycle(model, (1, M, 13, 11), UpcycleOptions(experts=3, include=("0", "2", "3")))
    assert isinstance(up[0], CondConv2d) and up[0].bscompress_pad == SAME
    assert isinstance(up[2], CondConv2d) and up[2].bscompress_pad == (0, 1, 0, 1)
    assert type(up[3]) is ActConv2d
    entries = {e.name: e for e in plan.layers}
    assert entries["0"].options["pad"] == SAME and entries["2"].options["pad"] == [0, 1, 0, 1]
    assert REFUSED in entries["3"].skip_reason and REFUSED in plan.summary.upcycle.refused["3"]
    assert plan.summary.upcycle.convs == 2
    again = rebuilt(original, up, plan)
    for x in inputs(original[0]):
        assert rel(up(x), original(x)) < EXACT
        assert torch.equal(again(x), up(x))


# --------------------------------------------------------------------------- export


class SameNet(nn.Module):
    """Both padding styles, strided, on odd input sizes."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=16, bias=False)
        self.conv = Conv2dSame(8, 12, 3, stride=2)
        self.dw = Conv2dSame(12, 12, 3, groups=12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.dw(self.conv(self.stem(x).relu()).relu())
        return self.head(x.mean((2, 3)))


def test_onnx_export_of_decomposed_subclasses_passes_parity(tmp_path):
    from bscompress.deploy.export import export_onnx

    torch.manual_seed(0)
    model = SameNet().eval()
    original = copy.deepcopy(model)
    shape = (1, 3, 17, 15)
    compressed, plan = decompose(model, "bsconv-u", shape,
                                 RankOptions(rank=99, allow_growth=True), ANY)
    assert {e.name for e in plan.replaced()} == {"stem", "conv"}
    x = torch.randn(2, 3, 17, 15)
    assert rel(compressed(x), original(x)) < 1e-4
    report = export_onnx(compressed, shape, tmp_path / "same.onnx", dynamic_batch=True)
    assert report.passed and report.dynamic_batch


# --------------------------------------------------------------------------- timm itself


def test_timms_own_conv2d_same():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    dynamic = timm_layers.create_conv2d(M, N, 3, stride=2, padding="same")
    assert type(dynamic).__name__ == "Conv2dSame"
    assert input_padding(dynamic).kind == SAME
    static = timm_layers.create_conv2d(M, N, 3, stride=1, padding="same")
    assert input_padding(static).kind == "plain"
    for conv in (dynamic, static):
        original = nn.Sequential(conv)
        compressed, plan = decompose(copy.deepcopy(original), "dsc", input_shape(conv),
                                     RankOptions(rank=99, allow_growth=True), ANY)
        again = rebuilt(original, compressed, plan)
        for x in inputs(conv):
            assert rel(compressed(x), conv(x)) < EXACT
            assert torch.equal(again(x), compressed(x))


def test_a_conv_that_clips_its_input_is_refused():
    """The probe ran on unit-variance inputs only, so a forward clipping at 6 passed as a
    plain conv and was rewritten without its clamp (a full-rank model 19% off, exit 0)."""
    model = nn.Sequential(ClipConv2d(M, N, 3, padding=1), nn.Conv2d(N, N, 3, padding=1))
    reasons = eligibility(model, ANY)
    assert reasons["0"] == f"ClipConv2d {REFUSED} (not a plain or 'same'-padded convolution)"
    assert reasons["1"] is None


@pytest.mark.parametrize("method", ["bsconv-u", "svd"])
def test_layers_with_forward_hooks_stay_as_they_are(method):
    """A hook on a layer changes what it computes, and a replacement dropped it without a
    word (a full-rank model 96% off with exit 0). Such a layer now stays, with the hook
    named; the weight-computing pre-hooks of torch.nn.utils (pruning) do not count."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    kernel = 3 if method == "bsconv-u" else 1
    model = nn.Sequential(*(nn.Conv2d(N, N, kernel, padding=kernel // 2) for _ in range(4)))

    def doubled(module, args, output):
        return output * 2.0 + 1.0

    model[0].register_forward_hook(doubled)
    model[1].register_forward_pre_hook(lambda module, args: (args[0].flip(-1),))
    with torch.no_grad():  # (a weight computed with grad cannot be deep-copied)
        prune.l1_unstructured(model[2], "weight", amount=0.3)
    original = copy.deepcopy(model)
    compressed, plan = decompose(model, method, (1, N, 12, 12),
                                 RankOptions(energy=1.0, allow_growth=True), ANY)
    entries = {e.name: e for e in plan.layers}
    assert entries["0"].skip_reason == (
        "a forward hook registered on it (test_layers_with_forward_hooks_stay_as_they_are."
        "doubled) would be lost with it: register it on the parent module to let "
        "bscompress rewrite the layer")
    assert "forward pre-hook registered on it (" in entries["1"].skip_reason
    assert entries["2"].method == method and entries["3"].method == method  # pruned: rewritten
    x = torch.randn(2, N, 12, 12)
    with torch.no_grad():
        assert torch.allclose(compressed(x), original(x), rtol=1e-4, atol=1e-4)
