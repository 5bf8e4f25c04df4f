"""ONNX export: every block passes parity, a broken model fails it, bad input exits 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.decomposition import decompose
from bscompress.core.errors import BadInput, CheckFailed
from bscompress.deploy.export import export_onnx
from bscompress.methods import METHODS, RankOptions
from tests.nets import TinyNet

runner = CliRunner()
SHAPE = (1, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(width=16).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_block_exports_with_parity(tiny, method, tmp_path):
    model, plan = decompose(copy.deepcopy(tiny), method, SHAPE, RankOptions(rank=2, cp_iters=5))
    assert plan.replaced()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, SHAPE, path)
    assert report.passed and path.exists()
    assert {c.inputs for c in report.checks} == {"random batch 1", "random batch 3"}
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 18
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_static_batch(tiny, tmp_path):
    report = export_onnx(tiny, (2, 3, 16, 16), tmp_path / "s.onnx", dynamic_batch=False)
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 16, 16]
    assert [c.inputs for c in report.checks] == ["random batch 2"]


class ExportsDifferently(nn.Module):
    """Deliberately broken: its exported graph computes something else than eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 1.01 if torch.compiler.is_compiling() else y


def test_broken_model_fails_parity_and_leaves_no_file(tmp_path):
    path = tmp_path / "broken.onnx"
    with pytest.raises(CheckFailed, match="differs from PyTorch"):
        export_onnx(ExportsDifferently(), SHAPE, path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckFailed, match="kept"):
        export_onnx(ExportsDifferently(), SHAPE, path, keep_failed=True)
    assert path.exists()


def test_cli_export_archive_and_exit_codes(tiny, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    spec = f"{Path(__file__).parent / 'nets.py'}:TinyNet"
    archive = tmp_path / "tiny.bsc.pt"
    assert runner.invoke(app, ["decompose", str(ckpt), "--arch", spec, "-o",
                               str(archive)]).exit_code == 0
    out = tmp_path / "tiny.onnx"
    result = runner.invoke(app, ["export", str(archive), "-o", str(out), "--json",
                                 "--data", "synthetic:3x16x16:10", "--limit", "8"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] and data["opset"] == 18
    assert any(c["inputs"] == "data batch 0" for c in data["checks"])
    again = runner.invoke(app, ["export", str(archive), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    missing_dir = runner.invoke(app, ["export", str(archive), "-o",
                                      str(tmp_path / "no" / "x.onnx")])
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.stderr
    bad_data = runner.invoke(app, ["export", str(archive), "-o", str(tmp_path / "y.onnx"),
                                   "--data", "imagenet:/nowhere"])
    assert bad_data.exit_code == 2 and "unknown dataset kind" in bad_data.stderr
    with pytest.raises(BadInput, match="opset"):
        export_onnx(tiny, SHAPE, tmp_path / "z.onnx", opset=13)


def test_external_data_moves_with_the_file(tiny, tmp_path):
    path = tmp_path / "ext.onnx"
    report = export_onnx(tiny, SHAPE, path, external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert report.passed and report.external_data == str(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert report.file_bytes == path.stat().st_size + data.stat().st_size
    assert path.stat().st_size < data.stat().st_size  # the weights are outside the graph
    onnx.checker.check_model(str(path), full_check=True)
    with pytest.raises(BadInput, match="already exists"):
        export_onnx(tiny, SHAPE, path, external_data=True)
    export_onnx(tiny, SHAPE, path, external_data=True, force=True)


ZOO_METHODS = {  # every zoo model of the decomposition tests, the methods in turn; the
    # mobile nets hold only 1×1 and depthwise convs beyond the stem: their 1×1 convs go to svd
    "resnet18": "bsconv-u", "resnet50": "bsconv-s", "vgg11_bn": "dsc",
    "mobilenet_v2": "svd", "efficientnet_b0": "svd", "regnet_x_400mf": "cp4",
    "resnext50_32x4d": "cp", "densenet121": "bsconv-u", "shufflenet_v2_x1_0": "svd",
    "squeezenet1_0": "tucker2",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO_METHODS))
def test_torchvision_zoo_exports_with_parity(name, tmp_path):
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None).eval()
    shape = (1, 3, 64, 64)
    huge = tuple(n for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and m.weight.numel() > 4_000_000)
    from bscompress.core.surgery import Eligibility

    model, plan = decompose(base, ZOO_METHODS[name], shape, RankOptions(rank=2, cp_iters=5),
                            Eligibility(exclude=huge))
    assert plan.replaced()
    report = export_onnx(model, shape, tmp_path / f"{name}.onnx")
    assert report.passed and {c.inputs for c in report.checks} == {"random batch 1",
                                                                   "random batch 3"}


def test_an_exporter_failure_is_one_plain_sentence(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("\x1b[31mInvalid ranges [2:1]\x1b[0m for s0\nTraceback lines")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(CheckFailed) as err:
        export_onnx(TinyNet().eval(), (1, 3, 16, 16), tmp_path / "m.onnx")
    assert str(err.value).endswith("failed (with a dynamic batch axis: --static exports a "
                                   "fixed batch): Invalid ranges [2:1] for s0")
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_batch_is_traced_beyond_batch_one(tmp_path):
    """torch.export specialises a batch of 1; timm's ConvNeXt block then failed to export with
    a dynamic batch ("Invalid ranges [2:1]") although it runs at every batch (found by make
    zoo). The dynamic axis is traced at batch 3, and parity still covers batch 1."""
    convnext = pytest.importorskip("timm.models.convnext")
    torch.manual_seed(0)
    block = convnext.ConvNeXtBlock(16, conv_mlp=True).eval()
    report = export_onnx(block, (1, 16, 8, 8), tmp_path / "b.onnx")
    assert report.passed and report.dynamic_batch
    assert {c.inputs for c in report.checks} == {"random batch 1", "random batch 3"}


def test_a_folded_bsconv_s_exports_with_parity(tmp_path):
    """A BSConv-S whose pw2 runs inside its blueprint stage (``folded``: the weight product
    is part of the graph) exports, and the ONNX model matches PyTorch's."""
    from bscompress.layers.separable import BSConvS

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), BSConvS.from_conv(conv, 9, p=1.0))
    assert model[2].folded
    report = export_onnx(model.eval(), SHAPE, tmp_path / "folded.onnx")
    assert report.passed


def test_outputs_smaller_than_atol_are_named_as_unchecked(tmp_path):
    """A network whose outputs are below --atol passes parity whatever ONNX Runtime returns
    near zero: the report names those outputs, and the command warns, instead of a check
    that cannot fail passing in silence."""
    torch.manual_seed(0)
    net = TinyNet()
    ckpt = tmp_path / "tiny.pt"
    with torch.no_grad():
        net.fc.weight.mul_(1e-9)
        net.fc.bias.zero_()
    torch.save(net.state_dict(), ckpt)
    report = export_onnx(net, SHAPE, tmp_path / "a.onnx")
    assert report.passed and list(report.below_atol()) == [report.checks[0].output]
    assert export_onnx(net, SHAPE, tmp_path / "b.onnx", atol=0.0).below_atol() == {}
    spec = f"{Path(__file__).parent / 'nets.py'}:TinyNet"
    result = runner.invoke(app, ["export", str(ckpt), "--arch", spec,
                                 "-o", str(tmp_path / "c.onnx")])
    assert result.exit_code == 0, result.stderr
    assert "cannot tell it from zeros; pass --atol below" in " ".join(result.stderr.split())
    torch.save(TinyNet().state_dict(), ckpt)
    normal = runner.invoke(app, ["export", str(ckpt), "--arch", spec, "--force",
                                 "-o", str(tmp_path / "c.onnx")])
    assert normal.exit_code == 0 and "cannot tell" not in normal.stderr
