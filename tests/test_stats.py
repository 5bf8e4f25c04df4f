"""MAC and parameter counts against closed formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.stats import count_params, module_macs, parse_shape


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@pytest.mark.parametrize(
    ("m", "n", "k", "stride", "padding", "dilation", "groups", "size"),
    [
        (16, 32, (3, 3), 1, 1, 1, 1, (20, 20)),
        (16, 32, (3, 3), 2, 1, 1, 1, (21, 19)),
        (16, 48, (5, 3), 1, 0, 2, 4, (17, 23)),
        (32, 32, (3, 3), 1, 1, 1, 32, (12, 12)),
        (8, 24, (7,), 3, 2, 1, 1, (50,)),
    ],
)
def test_conv_macs_equal_the_formula(m, n, k, stride, padding, dilation, groups, size):
    conv_cls = nn.Conv1d if len(k) == 1 else nn.Conv2d
    conv = conv_cls(m, n, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    batch = 3
    stats = module_macs(nn.Sequential(conv), (batch, m, *size))
    out = [_out_size(s, kk, stride, padding, dilation) for s, kk in zip(size, k, strict=True)]
    expected = batch * n * math.prod(out) * (m // groups) * math.prod(k)
    assert stats.module_macs["0"] == expected
    assert stats.macs == expected
    assert stats.params == n * (m // groups) * math.prod(k) + n


def test_totals_are_the_sum_of_layers_and_linear_counts():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    stats = module_macs(net, (1, 3, 8, 8))
    assert stats.module_macs["3"] == 8 * 6 * 6 * 5
    assert stats.macs == stats.module_macs["0"] + stats.module_macs["3"]
    assert stats.module_macs[""] == stats.macs


def test_shared_parameters_count_once():
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20


def test_bad_shapes():
    with pytest.raises(BadInput, match="does not run on input shape"):
        module_macs(nn.Conv2d(3, 8, 3), (1, 4, 8, 8))
    assert parse_shape("1,3,224,224") == [1, 3, 224, 224] == parse_shape("1x3x224x224")
    for text in ("", "a,b", "1,0,3"):
        with pytest.raises(BadInput, match="--input-shape"):
            parse_shape(text)


def test_counting_leaves_mode_and_grad_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    module_macs(net, (1, 3, 8, 8))
    assert net.training
    assert torch.is_grad_enabled()
    assert all(p.requires_grad for p in net.parameters())


class _Tokens(nn.Module):
    """A view of a parameter passed on to a child in a tuple (timm's PiT:
    ``self.transformers((x, cls_tokens))``), which FlopCounterMode's module tracker asserted
    on under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.child = _Pair()

    def forward(self, x):
        return self.child((x.flatten(1), self.token.expand(x.shape[0], -1)))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, pair):
        x, token = pair
        return self.fc(x + token)


def test_a_parameter_passed_in_a_tuple_is_counted():
    net = _Tokens()
    assert module_macs(net, (1, 4, 1, 1)).macs == 8
    assert net.token.requires_grad and not net.frozen.requires_grad  # as they were
