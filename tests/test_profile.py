"""The ONNX Runtime profile maps kernel time back to the modules of the model."""

from __future__ import annotations

import pytest
import torch

from bscompress.compress.decomposition import decompose
from bscompress.deploy.export import export_onnx
from bscompress.deploy.profile import profile_onnx
from bscompress.methods import RankOptions
from tests.nets import INPUT_SHAPE, TinyNet


def _profile(model, tmp_path, shape=INPUT_SHAPE):
    path = tmp_path / "m.onnx"
    export_onnx(model, shape, path)
    return profile_onnx(path, shape, runs=3, warmup=1, threads=1)


def test_every_weighted_layer_is_named_and_shares_add_up(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    layers = _profile(model, tmp_path)
    modules = {t.module for t in layers}
    convs = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # every conv shows up under its own name, BatchNorm fused into the stem or not
    assert convs <= modules
    assert "fc" in modules
    assert sum(t.share for t in layers) == pytest.approx(1.0, abs=1e-6)
    assert all(t.ms >= 0 for t in layers)
    assert [t.ms for t in layers] == sorted((t.ms for t in layers), reverse=True)


@pytest.mark.parametrize("method,parts", [("bsconv-u", {"pw", "dw"}), ("dsc", {"dw", "pw"}),
                                          ("tucker2", {"pw1", "core", "pw2"})])
def test_decomposed_blocks_are_named_by_stage(method, parts, tmp_path):
    torch.manual_seed(0)
    model, plan = decompose(TinyNet(), method, INPUT_SHAPE, RankOptions(rank=2,
                                                                         allow_growth=True))
    replaced = plan.replaced()[0].name
    modules = {t.module for t in _profile(model, tmp_path)}
    # the rank-2 blueprint stage runs as a depthwise conv + sum, still named by its stage
    found = {m.removeprefix(replaced + ".") for m in modules if m.startswith(replaced + ".")}
    assert found == parts, (found, modules)
    assert not any(m.startswith("(op ") for m in modules), modules
