"""Calibration batches in channels-last layout (``calibrate.in_fast_layout``): taken only where
the model runs on it to the same output, and the statistics every method fits from are those
of the batches as given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bscompress.compress.calibrate import collect_patch_covariances, in_fast_layout
from tests.nets import TinyNet

LAST = torch.channels_last


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_the_statistics_from_channels_last_batches_are_those_of_the_batches_given():
    """Every kind of layer TinyNet has (a stride-1 3×3 conv from its map, a strided one and
    a 1×1 conv from im2col columns, a grouped and a depthwise conv, the Linear)."""
    torch.manual_seed(0)
    model = TinyNet(width=8).train()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    fast = in_fast_layout(model, batches)
    assert model.training  # its mode is given back
    assert all(x.is_contiguous(memory_format=LAST) and not x.is_contiguous() for x in fast)
    assert all(torch.equal(a, b) for a, b in zip(fast, batches, strict=True))
    given = collect_patch_covariances(model, batches, _layers(model))
    ours = collect_patch_covariances(model, fast, _layers(model))
    for name in _layers(model):
        assert torch.allclose(ours[name].full, given[name].full, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours[name].mean, given[name].mean, rtol=1e-5, atol=1e-7)


class Viewing(nn.Module):
    """Flattens its conv's output with ``view``: fails on a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).view(len(x), -1)


class LayoutDependent(nn.Module):
    """Gives another output for a channels-last input (a model reading raw memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if x.is_contiguous() else -y


@pytest.mark.parametrize("model", [Viewing(), LayoutDependent()], ids=["view", "output"])
def test_a_model_that_fails_or_differs_on_channels_last_keeps_the_batches_as_given(model):
    batches = [torch.randn(2, 3, 8, 8)]
    assert in_fast_layout(model, batches) is batches


def test_batches_not_4d_or_already_channels_last_are_kept():
    conv1d = nn.Conv1d(3, 4, 3)
    flat = [torch.randn(2, 3, 8)]
    assert in_fast_layout(conv1d, flat) is flat
    last = [torch.randn(2, 3, 8, 8).contiguous(memory_format=LAST)]
    assert in_fast_layout(TinyNet(width=8), last) is last
    assert in_fast_layout(TinyNet(width=8), []) == []


BLOCKS = [(method, {"rank": rank}) for method in ("bsconv-u", "bsconv-s", "dsc", "cp", "cp4")
          for rank in (1, 3)] + [("tucker2", {"in": 8, "out": 8})]


@pytest.mark.parametrize(("method", "ranks"), BLOCKS,
                         ids=[f"{m}-{'-'.join(map(str, r.values()))}" for m, r in BLOCKS])
def test_every_block_keeps_a_channels_last_input_channels_last(method, ranks):
    """A block that wrote NCHW (DSC's repeated channels, BSConv's blueprint sum) made every
    layer after it run NCHW, 2–3× slower in PyTorch's CPU convs: its output keeps the input's
    layout, with the values of the dense conv holding its reconstructed weight (the oracle)."""
    from bscompress.core.plan import LayerPlan
    from bscompress.methods.base import get_method

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=True)
    block, _ = get_method(method).build(conv, LayerPlan("c", "Conv2d", method, dict(ranks)))
    block.eval()
    x = torch.randn(2, 12, 9, 9)
    dense = nn.functional.conv2d(x, block.to_dense(), conv.bias, padding=1)
    with torch.no_grad():
        y = block(x.contiguous(memory_format=LAST))
        assert y.is_contiguous(memory_format=LAST) and not y.is_contiguous()
        assert torch.allclose(y, dense, atol=1e-5)
        assert torch.allclose(block(x), dense, atol=1e-5)
