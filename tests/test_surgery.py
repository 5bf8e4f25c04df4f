"""Eligibility filter, glob selection and the replacement walk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.plan import LayerPlan, Plan
from bscompress.core.surgery import (
    Eligibility,
    apply_plan,
    eligibility,
    matching_pattern,
    replace_modules,
    skip_reason,
)
from tests.nets import TinyNet


def test_every_skip_reason_of_tinynet():
    reasons = eligibility(TinyNet())
    assert reasons["stem"].startswith("first layer, 3 input channels < --min-in-channels 8")
    assert reasons["features.0"] is None
    assert reasons["features.2"] is None  # grouped, 16 input channels per group
    assert reasons["features.4"] == "depthwise conv: already separable"
    assert reasons["features.5"] == "1×1 kernel: nothing to separate"
    assert set(reasons) == {"stem", "features.0", "features.2", "features.4", "features.5"}


def test_unsupported_convs_and_channel_floor():
    assert skip_reason("t", nn.ConvTranspose2d(16, 16, 3)) == "transposed conv: not supported"
    assert "Conv3d" in skip_reason("c", nn.Conv3d(16, 16, 3))
    assert skip_reason("c", nn.Conv1d(16, 32, 5)) is None
    grouped = nn.Conv2d(32, 32, 3, groups=8)  # 4 input channels per group
    assert skip_reason("g", grouped) == "4 input channels per group < --min-in-channels 8"
    assert skip_reason("g", grouped, Eligibility(min_in_channels=4)) is None


def test_include_exclude_globs_match_prefixes():
    assert matching_pattern("layer4.0.conv1", ["layer4"]) == "layer4"
    assert matching_pattern("layer4.0.conv1", ["layer*.0"]) == "layer*.0"
    assert matching_pattern("layer4.0.conv1", ["layer3"]) is None
    assert matching_pattern("layer40.conv", ["layer4"]) is None
    options = Eligibility(include=("features",), exclude=("features.2",))
    reasons = eligibility(TinyNet(), options)
    assert reasons["features.0"] is None
    assert reasons["features.2"] == "excluded by --exclude 'features.2'"
    assert reasons["stem"] == "not matched by --include"


class Wrapper(nn.Module):
    """A replacement that itself holds a conv the filter would select."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.inner = conv


def test_walk_does_not_descend_into_replacements_and_keeps_names():
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def transform(name, module):
        calls.append(name)
        return Wrapper(module)

    done = replace_modules(net, lambda name, m: isinstance(m, nn.Conv2d), transform)
    assert done == calls == ["stem", "features.0", "features.2", "features.4", "features.5"]
    assert isinstance(net.features[0], Wrapper)
    after = net.state_dict()
    for name in calls:
        assert torch.equal(after[f"{name}.inner.weight"], before[f"{name}.weight"])
    assert torch.equal(after["fc.weight"], before["fc.weight"])  # untouched keys unchanged


def test_shared_module_is_replaced_once_and_stays_shared():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    built = []

    def transform(name, module):
        built.append(name)
        return Wrapper(module)

    done = replace_modules(net, lambda name, m: isinstance(m, nn.Conv2d), transform)
    assert done == ["0", "2"] and built == ["0"]
    assert net[0] is net[2]


def test_apply_plan_errors_name_the_layer():
    with pytest.raises(BadInput, match="'nope'"):
        apply_plan(TinyNet(), Plan([LayerPlan("nope", "Conv2d", method="x")]))
    with pytest.raises(BadInput, match="method 'unregistered'"):
        apply_plan(TinyNet(), Plan([LayerPlan("features.0", "Conv2d", method="unregistered")]))


def test_apply_plan_with_builder_replaces_only_planned_layers():
    net = TinyNet()
    plan = Plan([LayerPlan("features.0", "Conv2d", method="m"),
                 LayerPlan("features.2", "Conv2d", skip_reason="kept")])
    apply_plan(net, plan, build=lambda module, entry: Wrapper(module))
    assert isinstance(net.features[0], Wrapper)
    assert isinstance(net.features[2], nn.Conv2d)
